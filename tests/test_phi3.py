"""Phi-3 in plain torch: config, architecture facts against small dense references, masks, cache,
loss, gradient checkpointing and generation. None of these needs transformers (see test_phi3_parity)."""

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny import LONGROPE
from tiny import TINY_PHI3 as TINY

import lora.models.phi3 as phi3
from lora.models import CausalLMOutput, Phi3Config, Phi3ForCausalLM
from lora.models.phi3 import build_attention_mask, position_ids_from_mask

FIXTURE = Path(__file__).parent / "fixtures" / "phi3_mini_4k_instruct_config.json"
PACKAGE = Path(phi3.__file__).parent


def tiny(**overrides) -> Phi3ForCausalLM:
    return Phi3ForCausalLM(Phi3Config(**{**TINY, **overrides})).eval()


def max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


# -- config ------------------------------------------------------------------------------------


def test_config_reads_a_real_config_json_and_keeps_unknown_keys():
    raw = json.loads(FIXTURE.read_text())
    config = Phi3Config(**raw)
    assert (config.vocab_size, config.hidden_size, config.head_dim, config.sliding_window) == (
        32064,
        3072,
        96,
        2047,
    )
    assert config.extra["auto_map"] == raw["auto_map"] and config.extra["attention_bias"] is False
    out = config.to_dict()
    assert {k: v for k, v in out.items() if k in raw} == raw  # every key, same value
    assert Phi3Config(**out) == config
    assert Phi3Config.from_json_file(FIXTURE) == config


def test_config_save_to_dir_or_file_round_trips(tmp_path):
    config = Phi3Config(**TINY, foo={"bar": [1, 2]}, rope_scaling=None)
    assert config.save(tmp_path) == tmp_path / "config.json"
    assert Phi3Config.from_json_file(tmp_path) == config
    assert config.save(tmp_path / "other.json") == tmp_path / "other.json"
    assert Phi3Config.from_json_file(tmp_path / "other.json").extra["foo"] == {"bar": [1, 2]}


@pytest.mark.parametrize(
    "key",
    ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"],
)
def test_config_missing_required_key_is_named(key):
    raw = dict(TINY)
    del raw[key]
    with pytest.raises(ValueError, match=key):
        Phi3Config(**raw)


@pytest.mark.parametrize(
    "overrides, named",
    [
        (dict(num_key_value_heads=3), "num_key_value_heads"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(hidden_size=30), "hidden_size"),
        (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), "rope_type"),
        (
            dict(
                rope_scaling={"type": "longrope", "short_factor": [1.0], "long_factor": [1.0] * 4}
            ),
            "short_factor",
        ),
        (dict(sliding_window=0), "sliding_window"),
        (dict(model_type="llama"), "model_type"),
    ],
)
def test_config_rejects_inconsistent_values_naming_the_key(overrides, named):
    with pytest.raises(ValueError, match=named):
        Phi3Config(**{**TINY, **overrides})


@pytest.mark.parametrize("legacy", ["su", "yarn", "longrope"])
def test_legacy_rope_type_names_mean_longrope(legacy):
    rope = Phi3Config(
        **TINY, **{**LONGROPE, "rope_scaling": {**LONGROPE["rope_scaling"], "type": legacy}}
    ).rope
    assert rope.rope_type == "longrope"
    assert rope.attention_factor == pytest.approx(math.sqrt(1 + math.log(64 / 16) / math.log(16)))


def test_transformers5_rope_parameters_are_read():
    config = Phi3Config(
        **TINY,
        max_position_embeddings=64,
        partial_rotary_factor=0.75,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 500.0,
            "partial_rotary_factor": 0.5,
            "original_max_position_embeddings": 16,
            "short_factor": [1.0, 1.0],
            "long_factor": [2.0, 2.0],
        },
    )
    rope = config.rope
    assert (rope.rope_type, rope.theta, rope.rotary_dim, rope.original_max_position_embeddings) == (
        "longrope",
        500.0,
        4,
        16,
    )


# -- parameters, names, counts ----------------------------------------------------------------------


def test_phi3_mini_parameter_count_on_meta():
    with torch.device("meta"):
        model = Phi3ForCausalLM(Phi3Config.from_json_file(FIXTURE))
    assert model.num_parameters() == 3_821_079_552
    assert all(p.device.type == "meta" for p in model.parameters())


def test_parameter_names_are_transformers():
    model = tiny(num_hidden_layers=1)
    assert sorted(model.state_dict()) == sorted(
        [
            "model.embed_tokens.weight",
            "model.layers.0.self_attn.qkv_proj.weight",
            "model.layers.0.self_attn.o_proj.weight",
            "model.layers.0.mlp.gate_up_proj.weight",
            "model.layers.0.mlp.down_proj.weight",
            "model.layers.0.input_layernorm.weight",
            "model.layers.0.post_attention_layernorm.weight",
            "model.norm.weight",
            "lm_head.weight",
        ]
    )  # rope frequencies are non-persistent buffers


def test_projections_are_plain_linear_without_bias():
    model = tiny()
    for name, module in model.named_modules():
        if name.endswith(("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head")):
            assert type(module) is torch.nn.Linear and module.bias is None, name


def test_fused_splits_give_output_rows_in_order():
    splits = tiny().fused_splits
    assert list(splits) == ["qkv_proj", "gate_up_proj"]
    assert list(splits["qkv_proj"].items()) == [("q", 32), ("k", 16), ("v", 16)]
    assert list(splits["gate_up_proj"].items()) == [("gate", 48), ("up", 48)]
    model = tiny()
    assert sum(splits["qkv_proj"].values()) == model.model.layers[0].self_attn.qkv_proj.out_features


def test_tied_embeddings_share_one_parameter():
    model = tiny(tie_word_embeddings=True)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert model.num_parameters() == tiny().num_parameters() - 96 * 32
    assert model.num_parameters(exclude_embeddings=True) == tiny().num_parameters(
        exclude_embeddings=True
    )


def test_rope_frequencies_stay_fp32_and_out_of_the_state_dict():
    model = tiny(**LONGROPE).to(torch.bfloat16)
    rotary = model.model.rotary_emb
    assert rotary.inv_freq.dtype == torch.float32 and rotary.long_inv_freq.dtype == torch.float32
    assert torch.equal(rotary.inv_freq, tiny(**LONGROPE).model.rotary_emb.inv_freq)
    assert not any("inv_freq" in k for k in model.state_dict())


# -- architecture facts, against dense references ---------------------------------------------------


def reference_rotate(x, positions, theta, rotary_dim, factors=None, scale=1.0):
    """x (s, d): rotate-half on the first rotary_dim channels, pair (i, i + r/2) by angle pos * theta^(-2i/r) / f_i."""
    half = rotary_dim // 2
    out = x.clone()
    for i in range(half):
        freq = theta ** (-2 * i / rotary_dim) / (factors[i] if factors else 1.0)
        angle = positions.double() * freq
        c, s = torch.cos(angle) * scale, torch.sin(angle) * scale
        a, b = x[:, i].double(), x[:, i + half].double()
        out[:, i] = (a * c - b * s).to(x.dtype)
        out[:, i + half] = (b * c + a * s).to(x.dtype)
    return out


@pytest.mark.parametrize(
    "overrides",
    [dict(), dict(partial_rotary_factor=0.5, num_key_value_heads=1), dict(num_key_value_heads=4)],
)
def test_attention_matches_per_head_reference(overrides):
    """Fused qkv slices q | k | v, query head h reads kv head h // (H / KV), partial rotary, causal softmax."""
    config = Phi3Config(**{**TINY, **overrides})
    model = Phi3ForCausalLM(config).eval()
    attn = model.model.layers[0].self_attn
    s, H, KV, d = 7, config.num_attention_heads, config.num_key_value_heads, config.head_dim
    r = config.rope.rotary_dim
    x = torch.randn(1, s, config.hidden_size)
    pos = torch.arange(s)
    cos, sin = model.model.rotary_emb(pos[None])
    got, _ = attn(x, cos, sin, build_attention_mask(None, 1, s, 0, None, x.device))

    qkv = x[0] @ attn.qkv_proj.weight.T
    q, k, v = qkv[:, : H * d], qkv[:, H * d : (H + KV) * d], qkv[:, (H + KV) * d :]
    heads = []
    for h in range(H):
        g = h // (H // KV)
        qh = reference_rotate(q[:, h * d : (h + 1) * d], pos, config.rope_theta, r)
        kh = reference_rotate(k[:, g * d : (g + 1) * d], pos, config.rope_theta, r)
        scores = qh @ kh.T / math.sqrt(d) + torch.full((s, s), float("-inf")).triu(1)
        heads.append(scores.softmax(-1) @ v[:, g * d : (g + 1) * d])
    want = torch.cat(heads, dim=-1) @ attn.o_proj.weight.T
    assert max_diff(got[0], want) < 1e-5


def test_mlp_is_down_of_up_times_silu_gate_with_gate_first():
    mlp = tiny().model.layers[0].mlp
    x = torch.randn(3, 32)
    gate_w, up_w = mlp.gate_up_proj.weight[:48], mlp.gate_up_proj.weight[48:]
    want = ((x @ up_w.T) * F.silu(x @ gate_w.T)) @ mlp.down_proj.weight.T
    assert max_diff(mlp(x), want) < 1e-6


def test_rmsnorm_normalises_in_fp32_then_casts_back_before_the_weight():
    norm = phi3.Phi3RMSNorm(32, eps=1e-5).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = (torch.randn(4, 32) * 30).to(torch.bfloat16)
    xf = x.float()
    want = norm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(
        torch.bfloat16
    )
    got = norm(x)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    assert Phi3Config(**TINY).rms_norm_eps == 1e-5


def test_longrope_picks_factors_per_call_and_scales_both_modes():
    config = Phi3Config(**TINY, **LONGROPE)
    rotary = phi3.Phi3RotaryEmbedding(config)
    scale = math.sqrt(1 + math.log(64 / 16) / math.log(16))
    short = config.rope.short_factor
    long = config.rope.long_factor
    for positions, factors in [
        (torch.arange(16), short),
        (torch.arange(17), long),
        (torch.tensor([3, 16]), long),
    ]:
        cos, sin = rotary(positions[None])
        half = config.rope.rotary_dim // 2
        for i in range(half):
            angle = (
                positions.double()
                * config.rope_theta ** (-2 * i / config.rope.rotary_dim)
                / factors[i]
            )
            assert torch.allclose(cos[0, :, i].double(), torch.cos(angle) * scale, atol=1e-5)
            assert torch.allclose(sin[0, :, i + half].double(), torch.sin(angle) * scale, atol=1e-5)


def test_sliding_window_mask_is_self_plus_previous_window_minus_one():
    W = 3
    for past in (0, 4):
        mask = build_attention_mask(None, 1, 6, past, W, torch.device("cpu")).mask[0, 0]
        for i in range(6):
            for j in range(past + 6):
                assert bool(mask[i, j]) == (0 <= past + i - j < W), (past, i, j)


def test_sliding_window_behaviour_in_a_one_layer_model():
    model = tiny(num_hidden_layers=1, sliding_window=4)
    ids = torch.randint(3, 96, (1, 10))
    base = model(ids).logits
    far, near = ids.clone(), ids.clone()
    far[0, 5] = (far[0, 5] + 1) % 96  # 4 tokens before position 9: outside the window
    near[0, 6] = (near[0, 6] + 1) % 96  # 3 tokens before: inside
    assert max_diff(model(far).logits[0, 9], base[0, 9]) == 0
    assert max_diff(model(near).logits[0, 9], base[0, 9]) > 0


# -- masks and positions ---------------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [dict(), dict(sliding_window=3), LONGROPE])
def test_left_and_right_padding_equal_unpadded_runs(overrides):
    model = tiny(**overrides)
    a, b = torch.randint(3, 96, (1, 9)), torch.randint(3, 96, (1, 6))
    left = torch.cat([torch.zeros(1, 3, dtype=torch.long), b], dim=1)
    right = torch.cat([b, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    for padded, real in [(left, slice(3, 9)), (right, slice(0, 6))]:
        ids = torch.cat([a, padded])
        mask = torch.ones_like(ids)
        mask[1] = 0
        mask[1, real] = 1
        logits = model(ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
        assert torch.isfinite(logits).all()
        assert max_diff(logits[0], model(a).logits[0]) < 1e-5
        assert max_diff(logits[1, real], model(b).logits[0]) < 1e-5


def test_left_padding_backward_is_finite():
    model = tiny().train()
    ids = torch.randint(3, 96, (2, 8))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    labels = ids.masked_fill(mask == 0, -100)
    model(ids, attention_mask=mask, labels=labels).loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_forward_numbers_every_position_and_generate_counts_real_tokens():
    model = tiny(**LONGROPE)
    seen = []
    model.model.rotary_emb.register_forward_hook(lambda m, args, out: seen.append(args[0].clone()))
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    ids = torch.randint(3, 96, (2, 5))
    model(ids, attention_mask=mask)  # as transformers' forward: padding is numbered too
    assert seen[-1].tolist() == [[0, 1, 2, 3, 4]]
    model.generate(ids, max_new_tokens=2, attention_mask=mask)  # as transformers' generate
    assert seen[-2].tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    assert seen[-1].tolist() == [[3], [5]]  # the next token continues each row's count
    assert position_ids_from_mask(mask).tolist() == seen[-2].tolist()


def test_4d_mask_keeps_packed_documents_apart():
    model = tiny()
    a, b = torch.randint(3, 96, (1, 5)), torch.randint(3, 96, (1, 4))
    ids = torch.cat([a, b], dim=1)
    document = torch.tensor([0] * 5 + [1] * 4)
    mask = (document[:, None] == document[None, :])[None, None]  # (1, 1, 9, 9), True = may attend
    positions = torch.cat([torch.arange(5), torch.arange(4)])[None]
    packed = model(ids, attention_mask=mask, position_ids=positions).logits[0]
    assert max_diff(packed[:5], model(a).logits[0]) < 1e-5
    assert max_diff(packed[5:], model(b).logits[0]) < 1e-5
    # transformers 5 infers the same from restarting position ids alone, with no mask and no cache
    assert max_diff(model(ids, position_ids=positions, use_cache=False).logits[0], packed) < 1e-6
    # ... but not when a cache is built (use_cache None -> config.use_cache = True), nor with a mask
    with_mask = {"use_cache": False, "attention_mask": torch.ones_like(ids)}
    for kwargs in ({}, {"use_cache": True}, with_mask):
        logits = model(ids, position_ids=positions, **kwargs).logits[0]
        assert max_diff(logits, packed) > 1e-3, kwargs


def test_restarting_position_ids_pack_in_a_checkpointed_training_step():
    model = tiny().train()  # dropout is 0 in TINY
    ids = torch.randint(3, 96, (1, 9))
    positions = torch.cat([torch.arange(5), torch.arange(4)])[None]
    apart = model(ids, position_ids=positions, use_cache=False).logits
    model.gradient_checkpointing_enable()  # use_cache off in training: restarting ids = packing
    out = model(ids, position_ids=positions)
    assert out.past_key_values is None
    assert max_diff(out.logits, apart) < 1e-6


def test_4d_mask_is_anded_with_the_causal_mask():
    model = tiny(sliding_window=3)
    ids = torch.randint(3, 96, (2, 7))
    everything = torch.ones(2, 1, 7, 7, dtype=torch.bool)
    assert max_diff(model(ids, attention_mask=everything).logits, model(ids).logits) < 1e-6


def test_bad_masks_are_named():
    model = tiny()
    ids = torch.randint(3, 96, (2, 5))
    with pytest.raises(TypeError, match="torch.bool"):
        model(ids, attention_mask=torch.zeros(2, 1, 5, 5))
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 4, 5, 5\)"):
        model(ids, attention_mask=torch.ones(2, 4, 5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 4\)"):
        model(ids, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="labels"):
        model(ids, labels=ids[:, :3])


# -- KV cache --------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [dict(), dict(sliding_window=3, num_key_value_heads=1)])
def test_kv_cache_decoding_equals_full_forward(overrides):
    model = tiny(**overrides)
    ids = torch.randint(3, 96, (2, 11))
    full = model(ids).logits
    out = model(ids[:, :4], use_cache=True)  # prefill
    steps = [out.logits]
    out = model(ids[:, 4:7], past_key_values=out.past_key_values, use_cache=True)  # a chunk of 3
    steps.append(out.logits)
    for t in range(7, 11):  # one at a time
        out = model(ids[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
        steps.append(out.logits)
    assert max_diff(torch.cat(steps, dim=1), full) < 1e-5
    k, v = out.past_key_values[0]
    assert k.shape == v.shape == (2, model.config.num_key_value_heads, 11, model.config.head_dim)
    assert model(ids, use_cache=False).past_key_values is None
    assert model(ids).past_key_values is not None  # None -> config.use_cache, as transformers
    assert tiny(**overrides, use_cache=False)(ids).past_key_values is None


def test_kv_cache_with_left_padding_mask():
    model = tiny()
    ids = torch.randint(3, 96, (2, 8))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    full = model(ids, attention_mask=mask).logits
    out = model(ids[:, :5], attention_mask=mask[:, :5], use_cache=True)
    for t in range(5, 8):
        out = model(
            ids[:, t : t + 1],
            attention_mask=mask[:, : t + 1],
            past_key_values=out.past_key_values,
            use_cache=True,
        )
        assert max_diff(out.logits[:, 0], full[:, t]) < 1e-5


# -- loss ------------------------------------------------------------------------------------------


def test_loss_equals_full_logits_loss_and_logits_are_skipped():
    model = tiny()
    ids = torch.randint(3, 96, (3, 10))
    labels = ids.clone()
    labels[:, :6] = -100
    labels[2, -1] = -100
    out = model(ids, labels=labels)
    assert (
        isinstance(out, CausalLMOutput) and out.logits is None and out.loss.dtype == torch.float32
    )
    logits = model(ids).logits
    want = F.cross_entropy(
        logits[:, :-1].reshape(-1, 96).float(), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    assert abs(out.loss.item() - want.item()) < 1e-6
    both = model(ids, labels=labels, return_logits=True)
    assert torch.equal(both.logits, logits) and abs(both.loss.item() - want.item()) < 1e-6
    summed = model(ids, labels=labels, num_items_in_batch=100).loss
    counted = int((labels[:, 1:] != -100).sum())
    assert abs(summed.item() - want.item() * counted / 100) < 1e-6


def test_loss_in_bf16_is_computed_in_fp32():
    model = tiny().to(torch.bfloat16)
    ids = torch.randint(3, 96, (2, 6))
    assert model(ids, labels=ids).loss.dtype == torch.float32


def test_loss_without_any_counted_label_is_zero_with_a_graph():
    model = tiny().train()
    ids = torch.randint(3, 96, (2, 6))
    loss = model(ids, labels=torch.full_like(ids, -100)).loss
    assert loss.item() == 0.0
    loss.backward()


def test_logits_to_keep_returns_the_last_positions():
    model = tiny()
    ids = torch.randint(3, 96, (2, 6))
    assert max_diff(model(ids, logits_to_keep=1).logits, model(ids).logits[:, -1:]) < 1e-6


@pytest.mark.parametrize("frozen", [False, True])
def test_logits_to_keep_never_copies_the_head_weight(frozen):
    """A frozen head (every LoRA model's) and a strided last-position slice once sent torch's
    matmul down a batched path that copied the whole weight, expanded to (b, h, V), on every call:
    1.3 s of a 1.4 s prefill at Phi-3's shapes. No tensor that size may be made."""
    from torch.utils._python_dispatch import TorchDispatchMode

    model = tiny()
    model.requires_grad_(not frozen)
    b, h, v = 3, model.config.hidden_size, model.config.vocab_size
    made = []

    class Sizes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            made.extend(
                t.numel()
                for t in torch.utils._pytree.tree_leaves(out)
                if isinstance(t, torch.Tensor)
            )
            return out

    ids = torch.randint(3, 96, (b, 6))
    with torch.no_grad(), Sizes():
        logits = model(ids, logits_to_keep=1).logits
    assert logits.shape == (b, 1, v)
    assert made and max(made) < b * h * v


# -- gradient checkpointing ---------------------------------------------------------------------------


def test_gradient_checkpointing_gives_equal_gradients_with_dropout():
    grads = []
    for enable in (False, True):
        torch.manual_seed(0)
        model = tiny(resid_pdrop=0.2, attention_dropout=0.1).train()
        if enable:
            model.gradient_checkpointing_enable()
        assert model.gradient_checkpointing is enable
        torch.manual_seed(1)
        ids = torch.randint(3, 96, (2, 9))
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        assert max_diff(grads[0][name], grads[1][name]) < 1e-6, name


def test_gradient_checkpointing_runs_only_while_training(monkeypatch):
    calls = []
    real = phi3.checkpoint
    monkeypatch.setattr(phi3, "checkpoint", lambda *a, **k: calls.append(k) or real(*a, **k))
    model = tiny()
    model.gradient_checkpointing_enable()
    ids = torch.randint(3, 96, (1, 5))
    model.eval()(ids)
    assert calls == []
    model.train()(ids)
    assert len(calls) == 2 and all(k["use_reentrant"] is False for k in calls)
    model.gradient_checkpointing_disable()
    model(ids)
    assert len(calls) == 2 and model.gradient_checkpointing is False


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("layers", [None, 1, 0, "off"])
@pytest.mark.parametrize("every", [1, 2, 3])
def test_training_trims_the_heap_between_layers(monkeypatch, layers, reentrant, every):
    # Training on CPU the C heap's free pages go back to the system before the loss; before
    # every k-th checkpointed layer's forward (0, k, ...) and recomputation (counted from the
    # last); before the forward and the backward (a gradient hook on its output) of every layer
    # that is not checkpointed (docs/performance.md, "Full-size Phi-3-mini", "The fp32 peak").
    # The gradients are bitwise those without it. layers="off": no checkpointing at all.
    from lora._heap import trim_heap

    calls = []
    monkeypatch.setattr(phi3, "trim_heap", lambda: calls.append(1) or trim_heap())
    n_layers = 4
    checkpointed = [] if layers == "off" else range(n_layers if layers is None else layers)
    forward = [i for i in range(n_layers) if i % every == 0 or i not in checkpointed]
    backward = [
        i for i in range(n_layers) if (n_layers - 1 - i) % every == 0 or i not in checkpointed
    ]
    grads = {}
    for release in (0, every):
        calls.clear()
        torch.manual_seed(0)
        model = tiny(resid_pdrop=0.2, num_hidden_layers=n_layers).train()
        model.model.embed_tokens.weight.requires_grad_(False)
        if layers != "off":
            model.gradient_checkpointing_enable({"use_reentrant": reentrant}, layers=layers)
        model.model.release_heap_every = release
        torch.manual_seed(1)
        ids = torch.randint(3, 96, (2, 9))
        loss = model(ids, labels=ids).loss
        assert len(calls) == ((len(forward) + 1) if release else 0)
        loss.backward()
        grads[release] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert len(calls) == ((len(forward) + len(backward) + 1) if release else 0)
    assert grads[every].keys() == grads[0].keys() and grads[0]
    for name, g in grads[every].items():
        assert torch.equal(g, grads[0][name]), name


@pytest.mark.parametrize("how", ["bf16", "fp32-under-autocast"])
@pytest.mark.parametrize("layers", [0, "off"])
def test_a_bf16_layer_that_is_not_checkpointed_is_not_trimmed_around(monkeypatch, layers, how):
    # In bf16 the trims around every plain layer cost ~11% of a step for a target already met
    # (docs/performance.md, "The fp32 peak"): only the checkpointed cadence (forward of layers
    # 0 and 2) and the loss's trim, and without checkpointing none. An fp32 model under bf16
    # autocast computes in bf16: the same.
    calls = []
    monkeypatch.setattr(phi3, "trim_heap", lambda: calls.append(1) or True)
    model = tiny(num_hidden_layers=4).train()
    if how == "bf16":
        model.to(torch.bfloat16)
    model.model.release_heap_every = 2
    if layers != "off":
        model.gradient_checkpointing_enable(layers=layers)
    ids = torch.randint(3, 96, (2, 9))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=how != "bf16"):
        loss = model(ids, labels=ids).loss
    loss.backward()
    assert len(calls) == (0 if layers == "off" else 2 + 1)


def test_the_heap_is_left_alone_outside_training(monkeypatch):
    calls = []
    monkeypatch.setattr(phi3, "trim_heap", lambda: calls.append(1) or True)
    model = tiny().train()
    ids = torch.randint(3, 96, (1, 5))
    model.model.release_heap_every = 0
    model(ids, labels=ids).loss.backward()  # turned off
    model.model.release_heap_every = 1
    model.gradient_checkpointing_enable()
    with torch.no_grad():
        model(ids)  # no grad: nothing is checkpointed
    model.eval()(ids)
    assert calls == []
    model.train()(ids)  # a forward alone: before each layer and the loss, no backward
    assert len(calls) == TINY["num_hidden_layers"] + 1


def test_trim_heap_lives_in_one_place():
    from lora._heap import trim_heap
    from lora.finetune import distributed

    assert distributed.trim_heap is trim_heap and phi3.trim_heap is trim_heap
    assert trim_heap() in (True, False)


# -- generation ------------------------------------------------------------------------------------


def greedy_by_full_forwards(model, ids, n, attention_mask=None):
    for _ in range(n):
        positions = None if attention_mask is None else position_ids_from_mask(attention_mask)
        logits = model(ids, attention_mask=attention_mask, position_ids=positions).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        if attention_mask is not None:
            attention_mask = torch.cat(
                [attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1
            )
    return ids


@pytest.mark.parametrize("overrides", [dict(), dict(sliding_window=4), LONGROPE])
def test_greedy_generate_with_cache_equals_full_forwards(overrides):
    model = tiny(**overrides)
    ids = torch.randint(
        3, 96, (2, 12)
    )  # with LONGROPE: 12 + 8 crosses original_max_position_embeddings=16
    got = model.generate(ids, max_new_tokens=8)
    assert got.shape == (2, 20) and torch.equal(got[:, :12], ids)
    assert torch.equal(got, greedy_by_full_forwards(model, ids, 8))


def test_generate_left_padded_batch_equals_rows_alone():
    model = tiny()
    a, b = torch.randint(3, 96, (1, 6)), torch.randint(3, 96, (1, 4))
    ids = torch.cat([a, torch.cat([torch.zeros(1, 2, dtype=torch.long), b], dim=1)])
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    got = model.generate(ids, max_new_tokens=5, attention_mask=mask)
    assert torch.equal(got[0], model.generate(a, max_new_tokens=5)[0])
    assert torch.equal(got[1, 2:], model.generate(b, max_new_tokens=5)[0])


def test_generate_stops_at_eos_and_pads_finished_rows():
    model = tiny()
    ids = torch.randint(3, 96, (3, 5))
    free = model.generate(ids, max_new_tokens=6)
    eos = {int(free[0, 6]), int(free[1, 5])}  # row 0 stops at its 2nd new token, row 1 at its 1st
    got = model.generate(ids, max_new_tokens=6, eos_token_id=sorted(eos))
    stops = []
    for row in range(3):
        hits = [k for k in range(5, 11) if int(free[row, k]) in eos]
        stop = hits[0] if hits else 10
        stops.append(stop)
        assert torch.equal(got[row, : stop + 1], free[row, : stop + 1])
        assert (got[row, stop + 1 :] == model.config.pad_token_id).all()
    assert got.shape[1] == max(stops) + 1  # ends once every row has stopped
    single = model.generate(ids[:1], max_new_tokens=6, eos_token_id=int(free[0, 6]))
    assert torch.equal(single, free[:1, :7])


def test_sampling_is_reproducible_and_top_k_1_is_greedy():
    model = tiny().train()
    ids = torch.randint(3, 96, (2, 4))
    draws = [
        model.generate(ids, 6, temperature=1.0, generator=torch.Generator().manual_seed(7))
        for _ in range(2)
    ]
    assert torch.equal(*draws)
    assert model.training  # restored
    greedy = model.generate(ids, 6)
    assert torch.equal(
        model.generate(
            ids, 6, temperature=0.7, top_k=1, generator=torch.Generator().manual_seed(1)
        ),
        greedy,
    )
    assert torch.equal(
        model.generate(
            ids, 6, temperature=0.7, top_p=1e-6, generator=torch.Generator().manual_seed(1)
        ),
        greedy,
    )
    assert torch.equal(model.generate(ids, 0), ids)


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    seen = set()
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        seen.add(int(Phi3ForCausalLM._pick(logits, 1.0, None, 0.75, gen)))
    assert seen == {0, 1}


@pytest.mark.parametrize(
    "kwargs, named",
    [
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_p=1.5), "top_p"),
    ],
)
def test_generate_rejects_bad_arguments(kwargs, named):
    with pytest.raises(ValueError, match=named):
        tiny().generate(torch.ones(1, 3, dtype=torch.long), **{"max_new_tokens": 2, **kwargs})


# -- the package's boundaries --------------------------------------------------------------------------


def test_model_files_never_unpickle_nor_import_layers():
    for name in ("phi3.py", "checkpoint.py", "__init__.py"):
        source = (PACKAGE / name).read_text()
        assert not re.search(r"torch\.load\b|import pickle|pickle\.load", source), name
        assert not re.search(
            r"^\s*(from|import)\s+lora\.layers|from lora import layers", source, re.M
        ), name
