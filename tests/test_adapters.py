"""lora.save_adapter / lora.load_adapter: PEFT's file format, fused-slice export, the strict check, safety."""

from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from reference import effective_weight, randomize_lora
from safetensors import safe_open
from safetensors.torch import save_file
from tiny import ADAPTER_PHI3 as PHI3
from tiny import Toy
from torch import nn

import lora
from lora.adapters import CONFIG_NAME, WEIGHTS_NAME
from lora.models import Phi3Config, Phi3ForCausalLM

IDS = torch.tensor([[3, 5, 7, 11, 13, 17], [2, 4, 6, 8, 10, 12]])


def toy(seed: int = 0, **kw) -> Toy:
    torch.manual_seed(seed)
    return Toy(padding_idx=0, **kw).eval()


def phi3(seed: int = 0) -> Phi3ForCausalLM:
    torch.manual_seed(seed)
    return Phi3ForCausalLM(Phi3Config(**PHI3)).eval()


def trained(model, config, seed: int = 1, scale: float = 0.3):
    lora.inject(model, config)
    g = torch.Generator().manual_seed(seed)
    for _, layer in lora.layers.lora_layers(model):
        randomize_lora(layer, generator=g, scale=scale)
    return model


def logits(model):
    with torch.no_grad():
        out = model(IDS)
    return out.logits if hasattr(out, "logits") else out


def state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def header(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path / WEIGHTS_NAME), "pt") as f:
        return f.metadata(), {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


TOY_CONFIG = lora.LoRAConfig(
    r=4,
    lora_alpha=8,
    target_modules=["q_proj", "v_proj", "embed", "conv"],
    modules_to_save=["lm_head"],
    task_type="CAUSAL_LM",
)


# --- the format -----------------------------------------------------------------------------------
def test_save_writes_peft_keys_shapes_and_config_fields(tmp_path):
    model = trained(toy(), TOY_CONFIG)
    out = lora.save_adapter(model, tmp_path / "a", base_model_name_or_path="toy-base")
    assert out == tmp_path / "a"
    meta, shapes = header(out)
    p = "base_model.model."
    assert shapes[p + "blocks.0.q_proj.lora_A.weight"] == (4, 8) and shapes[
        p + "blocks.0.q_proj.lora_B.weight"
    ] == (8, 4)
    assert shapes[p + "embed.lora_embedding_A"] == (4, 20) and shapes[
        p + "embed.lora_embedding_B"
    ] == (8, 4)
    assert shapes[p + "conv.lora_A.weight"] == (4, 8, 3) and shapes[p + "conv.lora_B.weight"] == (
        8,
        4,
        1,
    )
    assert shapes[p + "lm_head.weight"] == (20, 8) and shapes[p + "lm_head.bias"] == (
        20,
    )  # modules_to_save
    assert len(shapes) == 2 * 6 + 2 and meta == {"format": "pt"}
    cfg = json.loads((out / CONFIG_NAME).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert cfg["target_modules"] == ["q_proj", "v_proj", "embed", "conv"]
    assert cfg["rank_pattern"] == {} and cfg["alpha_pattern"] == {} and cfg["use_rslora"] is False
    assert (
        cfg["lora_dropout"] == 0.0
        and cfg["bias"] == "none"
        and cfg["modules_to_save"] == ["lm_head"]
    )
    assert cfg["task_type"] == "CAUSAL_LM" and cfg["base_model_name_or_path"] == "toy-base"
    assert cfg["fan_in_fan_out"] is False and cfg["inference_mode"] is True


def test_round_trip_into_a_fresh_model_gives_the_same_outputs(tmp_path):
    model = trained(toy(), TOY_CONFIG)
    with torch.no_grad():
        model.lm_head.weight.add_(0.1)  # modules_to_save: trained in full
    want = logits(model)
    lora.save_adapter(model, tmp_path)
    fresh = toy()
    assert not torch.equal(logits(fresh), want)
    assert lora.load_adapter(fresh, tmp_path) is fresh
    assert isinstance(fresh.conv, lora.Conv1d) and isinstance(fresh.embed, lora.Embedding)
    assert fresh.lora_config.target_modules == TOY_CONFIG.target_modules
    assert lora.active_adapter(fresh) == "default"
    torch.testing.assert_close(logits(fresh), want, rtol=0, atol=0)


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_biases_are_saved_under_peft_names_and_loaded(tmp_path, bias):
    model = trained(toy(), lora.LoRAConfig(r=2, target_modules=["q_proj", "v_proj"], bias=bias))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias") and (
                bias == "all" or "q_proj" in n
            ):  # lora_only: the adapted layers' biases
                p.add_(0.5)
    want = logits(model)
    lora.save_adapter(model, tmp_path)
    _, shapes = header(tmp_path)
    assert (
        "base_model.model.blocks.0.q_proj.base_layer.bias" in shapes
    )  # PEFT's key for a targeted module's bias
    assert ("base_model.model.lm_head.bias" in shapes) == (bias == "all")
    fresh = toy()
    lora.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh), want, rtol=0, atol=0)


def test_rank_and_alpha_patterns_and_rslora_survive(tmp_path):
    cfg = lora.LoRAConfig(
        r=4,
        lora_alpha=8,
        use_rslora=True,
        target_modules=["q_proj", "v_proj"],
        rank_pattern={r"blocks\.0\.q_proj": 2},
        alpha_pattern={"v_proj": 3},
    )
    model = trained(toy(), cfg)
    want = logits(model)
    lora.save_adapter(model, tmp_path)
    body = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert body["rank_pattern"] == {r"blocks\.0\.q_proj": 2} and body["alpha_pattern"] == {
        "v_proj": 3
    }
    fresh = toy()
    lora.load_adapter(fresh, tmp_path)
    assert fresh.blocks[0]["q_proj"].r == 2 and fresh.blocks[1]["v_proj"].scaling == 3 / 2
    torch.testing.assert_close(logits(fresh), want, rtol=0, atol=0)


def test_rank_zero_pattern_is_written_as_excluded_modules(tmp_path):
    cfg = lora.LoRAConfig(r=4, target_modules=["q_proj"], rank_pattern={r"blocks\.1\.q_proj": 0})
    model = trained(toy(), cfg)
    lora.save_adapter(model, tmp_path)
    body = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert 0 not in body["rank_pattern"].values()  # PEFT refuses r = 0
    fresh = toy()
    lora.load_adapter(fresh, tmp_path)
    assert type(fresh.blocks[1]["q_proj"]) is nn.Linear
    torch.testing.assert_close(logits(fresh), logits(model), rtol=0, atol=0)


# --- fused slices --------------------------------------------------------------------------------
@pytest.mark.parametrize("use_rslora", [False, True])
def test_merged_linear_is_saved_as_the_equivalent_single_lora_and_restored(tmp_path, use_rslora):
    cfg = lora.LoRAConfig(
        r=4,
        lora_alpha=8,
        use_rslora=use_rslora,
        target_modules=["qkv_proj[q,v]", "gate_up_proj[up]", "o_proj"],
    )
    model = trained(phi3(), cfg, scale=0.1)
    want = logits(model)
    lora.save_adapter(model, tmp_path)
    meta, shapes = header(tmp_path)
    key = "base_model.model.model.layers.0.self_attn.qkv_proj"
    assert shapes[key + ".lora_A.weight"] == (8, 32) and shapes[key + ".lora_B.weight"] == (
        64,
        8,
    )  # r·k = 8
    body = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert body["target_modules"] == ["qkv_proj", "gate_up_proj", "o_proj"]
    name = r"^model\.layers\.0\.self_attn\.qkv_proj"  # exact: one key per module (order-free)
    assert body["rank_pattern"][name] == 8
    k_alpha = 8 * (2**0.5 if use_rslora else 2)
    assert body["alpha_pattern"][name] == pytest.approx(k_alpha)
    assert (
        r"^model\.layers\.1\.mlp\.gate_up_proj" not in body["rank_pattern"]
    )  # one slice: rank r, alpha unchanged
    assert json.loads(meta["lora.config"])["target_modules"][0] == "qkv_proj[q,v]"
    with safe_open(str(tmp_path / WEIGHTS_NAME), "pt") as f:
        B = f.get_tensor(key + ".lora_B.weight")
    assert torch.count_nonzero(B[32:48]) == 0  # k rows: zero
    assert (
        torch.count_nonzero(B[:32, 4:]) == 0 and torch.count_nonzero(B[48:, :4]) == 0
    )  # off-diagonal blocks

    fresh = phi3()
    lora.load_adapter(fresh, tmp_path)
    qkv = fresh.model.layers[0].self_attn.qkv_proj
    assert (
        isinstance(qkv, lora.MergedLinear)
        and qkv.enable_lora == (True, False, True)
        and qkv.lora_B.shape == (48, 4)
    )
    torch.testing.assert_close(logits(fresh), want, rtol=0, atol=0)


class Fused(nn.Module):
    def __init__(self, sizes):
        super().__init__()
        self.proj = nn.Linear(6, sum(sizes), bias=False)
        self.fused_splits = {"proj": {f"s{i}": s for i, s in enumerate(sizes)}}

    def forward(self, x):
        return self.proj(x)


@given(
    sizes=st.lists(st.integers(1, 5), min_size=1, max_size=4),
    data=st.data(),
    r=st.integers(1, 3),
    alpha=st.sampled_from([1, 2.5, 8]),
    use_rslora=st.booleans(),
)
def test_fused_export_is_the_dense_delta_and_reloads_bit_exact(sizes, data, r, alpha, use_rslora):
    import tempfile

    enabled = data.draw(
        st.lists(st.booleans(), min_size=len(sizes), max_size=len(sizes)).filter(any)
    )
    slices = ",".join(f"s{i}" for i, e in enumerate(enabled) if e)
    torch.manual_seed(0)
    model = trained(
        Fused(sizes),
        lora.LoRAConfig(
            r=r, lora_alpha=alpha, use_rslora=use_rslora, target_modules=[f"proj[{slices}]"]
        ),
    )
    layer = model.proj
    with tempfile.TemporaryDirectory() as d:
        lora.save_adapter(model, d)
        body = json.loads((Path(d) / CONFIG_NAME).read_text())
        with safe_open(str(Path(d) / WEIGHTS_NAME), "pt") as f:
            A, B = (f.get_tensor(f"base_model.model.proj.lora_{x}.weight") for x in "AB")
        rank = body["rank_pattern"].get("proj", body["r"])
        exported_alpha = body["alpha_pattern"].get("proj", body["lora_alpha"])
        scaling = exported_alpha / (rank**0.5 if body["use_rslora"] else rank)
        torch.testing.assert_close(
            B @ A * scaling, effective_weight(layer) - layer.weight, rtol=1e-5, atol=1e-6
        )
        torch.manual_seed(0)
        fresh = Fused(sizes)
        lora.load_adapter(fresh, d)
    # a single slice is a plain Linear: that is what it restores to
    assert type(fresh.proj) is (lora.MergedLinear if len(sizes) > 1 else lora.Linear)
    assert fresh.proj.scaling == layer.scaling
    assert torch.equal(fresh.proj.lora_A, layer.lora_A) and torch.equal(
        fresh.proj.lora_B, layer.lora_B
    )


def test_edited_config_loads_fused_adapter_as_peft_would(tmp_path):
    model = trained(
        phi3(), lora.LoRAConfig(r=4, lora_alpha=8, target_modules=["qkv_proj[q,v]"]), scale=0.1
    )
    want = logits(model)
    lora.save_adapter(model, tmp_path)
    body = json.loads((tmp_path / CONFIG_NAME).read_text())
    body["alpha_pattern"][r"^model\.layers\.1\.self_attn\.qkv_proj"] = (
        32  # doubles that module's scaling
    )
    (tmp_path / CONFIG_NAME).write_text(json.dumps(body))
    fresh = phi3()
    with pytest.warns(UserWarning, match=r"\['alpha_pattern'\] differ"):
        lora.load_adapter(fresh, tmp_path)
    assert (
        type(fresh.model.layers[0].self_attn.qkv_proj) is lora.Linear
    )  # one LoRA over the fused matrix
    assert fresh.model.layers[1].self_attn.qkv_proj.scaling == 4.0
    body["alpha_pattern"][r"^model\.layers\.1\.self_attn\.qkv_proj"] = 16
    (tmp_path / CONFIG_NAME).write_text(json.dumps(body))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lora.load_adapter(phi3(), tmp_path)
    again = phi3()
    lora.load_adapter(again, tmp_path)
    torch.testing.assert_close(logits(again), want, rtol=0, atol=0)


# --- resume: loading in place --------------------------------------------------------------------
def test_loading_into_a_model_injected_with_the_same_config_loads_in_place(tmp_path):
    cfg = lora.LoRAConfig(
        r=4, lora_alpha=8, target_modules=["qkv_proj[q,v]", "o_proj", "embed_tokens"]
    )
    src = trained(phi3(), cfg, scale=0.1)
    lora.save_adapter(src, tmp_path)
    model = lora.inject(phi3().to(torch.bfloat16), cfg)  # fp32 adapters over a bf16 base
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD(params.values(), lr=0.1)
    lora.load_adapter(model, tmp_path)
    now = dict(model.named_parameters())
    assert all(
        now[n] is p for n, p in params.items()
    )  # the optimizer still holds the model's parameters
    qkv, src_qkv = model.model.layers[0].self_attn.qkv_proj, src.model.layers[0].self_attn.qkv_proj
    assert qkv.lora_A.dtype == torch.float32 and torch.equal(qkv.lora_B, src_qkv.lora_B)
    assert opt.param_groups[0]["params"][0] is next(iter(params.values()))


def test_loading_in_place_into_a_merged_model_merges_the_new_weights(tmp_path):
    cfg = lora.LoRAConfig(r=2, target_modules=["q_proj", "v_proj"], merge_weights=True)
    src = trained(toy().train(), cfg).eval()  # eval() merges the trained weights
    want = logits(src)
    lora.save_adapter(src, tmp_path)
    model = lora.inject(toy(), cfg).eval()
    assert model.blocks[0]["q_proj"].merged
    lora.load_adapter(model, tmp_path)
    assert model.blocks[0]["q_proj"].merged
    torch.testing.assert_close(logits(model), want, rtol=1e-6, atol=1e-6)


def test_loading_in_place_a_different_adapter_is_refused_naming_modules(tmp_path):
    src = trained(toy(), lora.LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    lora.save_adapter(src, tmp_path)
    model = lora.inject(toy(), lora.LoRAConfig(r=2, target_modules=["q_proj", "embed"]))
    before = state(model)
    with pytest.raises(lora.AdapterError) as e:
        lora.load_adapter(model, tmp_path)
    msg = str(e.value)
    assert "module embed: adapter 'default' of the model adapts it; the file does not" in msg
    assert "module blocks.0.v_proj: the file adapts it" in msg
    assert (
        "module blocks.0.q_proj: the file's adapter is linear r=4" in msg
        and "the model's 'default' is linear r=2" in msg
    )
    after = state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


# --- the strict check ----------------------------------------------------------------------------
def _assert_untouched(model, before):
    assert (
        not any(True for _ in lora.layers.lora_layers(model))
        and getattr(model, "lora_config", None) is None
    )
    after = state(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_adapter_for_another_model_names_modules_that_do_not_exist(tmp_path):
    lora.save_adapter(
        trained(phi3(), lora.LoRAConfig(r=2, target_modules=["qkv_proj", "o_proj"])), tmp_path
    )
    model = toy()
    before = state(model)
    with pytest.raises(lora.AdapterError, match=r"\['qkv_proj', 'o_proj'\] match no module of Toy"):
        lora.load_adapter(model, tmp_path)
    _assert_untouched(model, before)


def test_wrong_shapes_are_refused_naming_the_keys(tmp_path):
    lora.save_adapter(trained(phi3(), lora.LoRAConfig(r=2, target_modules=["o_proj"])), tmp_path)
    bigger = dict(PHI3, hidden_size=48, num_attention_heads=4)
    torch.manual_seed(0)
    model = Phi3ForCausalLM(Phi3Config(**bigger))
    before = state(model)
    with pytest.raises(lora.AdapterError) as e:
        lora.load_adapter(model, tmp_path)
    msg = str(e.value)
    assert str(tmp_path / WEIGHTS_NAME) in msg and "nothing was loaded" in msg
    assert (
        "base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight: shape (2, 32), expected (2, 48)"
        in msg
    )
    _assert_untouched(model, before)


def test_rank_different_from_the_config_is_refused(tmp_path):
    lora.save_adapter(trained(toy(), lora.LoRAConfig(r=4, target_modules=["q_proj"])), tmp_path)
    body = json.loads((tmp_path / CONFIG_NAME).read_text())
    body["r"] = 8
    (tmp_path / CONFIG_NAME).write_text(json.dumps(body))
    model = toy()
    before = state(model)
    with pytest.raises(
        lora.AdapterError,
        match=r"blocks\.0\.q_proj\.lora_A\.weight: shape \(4, 8\), expected \(8, 8\) "
        r"\(rank 8 for blocks\.0\.q_proj in the config\)",
    ):
        lora.load_adapter(model, tmp_path)
    _assert_untouched(model, before)


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    lora.save_adapter(trained(toy(), lora.LoRAConfig(r=2, target_modules=["q_proj"])), tmp_path)
    with safe_open(str(tmp_path / WEIGHTS_NAME), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    del tensors["base_model.model.blocks.1.q_proj.lora_B.weight"]
    tensors["base_model.model.blocks.0.v_proj.lora_A.weight"] = torch.zeros(2, 8)
    tensors["base_model.model.norm_stats"] = torch.zeros(3)
    tensors["blocks.0.q_proj.lora_A"] = torch.zeros(2, 8)  # loralib's key: not PEFT's
    save_file(tensors, str(tmp_path / WEIGHTS_NAME))
    model = toy()
    before = state(model)
    with pytest.raises(lora.AdapterError) as e:
        lora.load_adapter(model, tmp_path)
    msg = str(e.value)
    assert "missing ['base_model.model.blocks.1.q_proj.lora_B.weight']" in msg
    assert (
        "base_model.model.blocks.0.v_proj.lora_A.weight: no place for it (the config does not adapt blocks.0.v_proj)"
        in msg
    )
    assert "base_model.model.norm_stats: no place for it" in msg
    assert (
        "blocks.0.q_proj.lora_A: no place for it (PEFT's keys start with 'base_model.model.')"
        in msg
    )
    _assert_untouched(model, before)


def test_missing_modules_to_save_tensor_is_refused(tmp_path):
    lora.save_adapter(trained(toy(), TOY_CONFIG), tmp_path)
    with safe_open(str(tmp_path / WEIGHTS_NAME), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "base_model.model.lm_head.bias"}
    save_file(tensors, str(tmp_path / WEIGHTS_NAME))
    with pytest.raises(lora.AdapterError, match=r"missing base_model\.model\.lm_head\.bias"):
        lora.load_adapter(toy(), tmp_path)


def test_fused_block_outside_its_slices_is_refused(tmp_path):
    lora.save_adapter(
        trained(phi3(), lora.LoRAConfig(r=2, target_modules=["qkv_proj[q,v]"]), scale=0.1), tmp_path
    )
    key = "base_model.model.model.layers.0.self_attn.qkv_proj.lora_B.weight"
    with safe_open(str(tmp_path / WEIGHTS_NAME), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors[key][40, 0] = 1.0  # a k row
    save_file(tensors, str(tmp_path / WEIGHTS_NAME), metadata=meta)
    with pytest.raises(
        lora.AdapterError, match=r"qkv_proj\.lora_B\.weight: non-zero entries outside the blocks"
    ):
        lora.load_adapter(phi3(), tmp_path)


def test_unknown_peft_keys_that_are_off_are_accepted_and_features_are_refused(tmp_path):
    model = trained(toy(), lora.LoRAConfig(r=2, target_modules=["q_proj"]))
    lora.save_adapter(model, tmp_path)
    body = json.loads((tmp_path / CONFIG_NAME).read_text())
    body.update(
        kasa_config=None,
        use_bdlora=None,
        some_future_flag=False,
        init_lora_weights="gaussian",
        peft_version="0.21.2",
        megatron_core="megatron.core",
        qalora_group_size=16,
    )
    (tmp_path / CONFIG_NAME).write_text(json.dumps(body))
    fresh = toy()
    lora.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh), logits(model), rtol=0, atol=0)
    body["use_dora"] = True
    (tmp_path / CONFIG_NAME).write_text(json.dumps(body))
    with pytest.raises(lora.AdapterError, match=rf"{CONFIG_NAME}: adapter config use_dora=True"):
        lora.load_adapter(toy(), tmp_path)


# --- safety -------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["truncated", "header", "garbage", "empty"])
def test_truncated_or_corrupt_weights_are_an_error_naming_the_file(tmp_path, damage):
    lora.save_adapter(trained(toy(), lora.LoRAConfig(r=2, target_modules=["q_proj"])), tmp_path)
    file = tmp_path / WEIGHTS_NAME
    data = file.read_bytes()
    file.write_bytes(
        {
            "truncated": data[:-7],
            "header": data[:20],
            "garbage": b"\x00" * 8 + b"not json" * 4,
            "empty": b"",
        }[damage]
    )
    model = toy()
    before = state(model)
    with pytest.raises(lora.AdapterError, match=rf"{file}: not a valid safetensors file"):
        lora.load_adapter(model, tmp_path)
    _assert_untouched(model, before)


def test_missing_or_broken_config_is_an_error_naming_it(tmp_path):
    lora.save_adapter(trained(toy(), lora.LoRAConfig(r=2, target_modules=["q_proj"])), tmp_path)
    (tmp_path / CONFIG_NAME).write_text('{"r": 4, "target_modu')
    with pytest.raises(
        lora.AdapterError, match=rf"{tmp_path / CONFIG_NAME}: not a readable JSON file"
    ):
        lora.load_adapter(toy(), tmp_path)
    (tmp_path / CONFIG_NAME).unlink()
    with pytest.raises(lora.AdapterError, match=rf"{tmp_path / CONFIG_NAME}: no such file"):
        lora.load_adapter(toy(), tmp_path)


class _Exploit:
    """Unpickling this calls open(marker, "w"): it would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("container", ["raw_pickle", "torch_save"])
def test_a_crafted_pickle_does_not_run(tmp_path, container):
    lora.save_adapter(trained(toy(), lora.LoRAConfig(r=2, target_modules=["q_proj"])), tmp_path)
    (tmp_path / WEIGHTS_NAME).unlink()  # leaves the legacy name as the weights file
    marker = tmp_path / "pwned"
    payload = {"base_model.model.blocks.0.q_proj.lora_A.weight": _Exploit(marker)}
    legacy = tmp_path / "adapter_model.bin"
    if container == "raw_pickle":
        legacy.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, legacy)
    model = toy()
    before = state(model)
    with pytest.raises(
        lora.AdapterError, match=rf"{legacy}: refused or unreadable as a weights-only torch file"
    ):
        lora.load_adapter(model, tmp_path)
    assert not marker.exists()
    _assert_untouched(model, before)
    # the same through the single-file (loralib) path
    with pytest.raises(lora.AdapterError, match="refused"):
        lora.load_adapter(
            lora.inject(toy(), lora.LoRAConfig(r=2, target_modules=["q_proj"])),
            _pt(tmp_path, payload),
        )
    assert not marker.exists()


def _pt(tmp_path, payload):
    file = tmp_path / "other" / "lora.pt"
    file.parent.mkdir()
    torch.save(payload, file)
    return file


def test_legacy_bin_adapter_loads_through_weights_only(tmp_path):
    model = trained(toy(), lora.LoRAConfig(r=2, target_modules=["q_proj", "embed"]))
    lora.save_adapter(model, tmp_path)
    with safe_open(str(tmp_path / WEIGHTS_NAME), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    (tmp_path / WEIGHTS_NAME).unlink()
    torch.save(tensors, tmp_path / "adapter_model.bin")
    fresh = toy()
    lora.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh), logits(model), rtol=0, atol=0)


def test_a_weights_file_given_is_the_one_loaded_even_inside_an_adapter_directory(tmp_path):
    """A path to a file loads that file: PEFT's weights under another name (keys with PEFT's
    prefix, the directory's config beside them), a legacy .bin next to a .safetensors, or a
    lora_state_dict file saved into an adapter directory; never the directory's own weights."""
    config = lora.LoRAConfig(r=2, target_modules=["q_proj", "embed"])
    first = trained(toy(), config, seed=1)
    lora.save_adapter(first, tmp_path)
    second = trained(toy(), config, seed=2)
    other = tmp_path / "other"
    lora.save_adapter(second, other)
    (other / WEIGHTS_NAME).rename(tmp_path / "step-2.safetensors")  # beside first's config
    with safe_open(str(tmp_path / "step-2.safetensors"), "pt") as f:
        torch.save({k: f.get_tensor(k) for k in f.keys()}, tmp_path / "adapter_model.bin")
    torch.save(lora.lora_state_dict(second), tmp_path / "lora.pt")
    assert not torch.equal(logits(first), logits(second))
    for name in ("step-2.safetensors", "adapter_model.bin", "lora.pt"):
        fresh = toy()
        if name == "lora.pt":  # a loralib file goes into layers that exist
            lora.inject(fresh, config)
        lora.load_adapter(fresh, tmp_path / name)
        torch.testing.assert_close(logits(fresh), logits(second), rtol=0, atol=0, msg=name)
    fresh = toy()
    lora.load_adapter(fresh, tmp_path)  # the directory: its own adapter_model.safetensors
    torch.testing.assert_close(logits(fresh), logits(first), rtol=0, atol=0)


# --- loralib checkpoints ---------------------------------------------------------------------------
def test_loralib_lora_state_dict_pt_still_loads_with_strict_false(tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = lora.Linear(8, 8, r=2)
            self.qkv = lora.MergedLinear(8, 24, r=2, enable_lora=[True, False, True])
            self.out = nn.Linear(24, 4)

        def forward(self, x):
            return self.out(torch.relu(self.qkv(self.fc(x))))

    torch.manual_seed(0)
    src = Net()
    for m in (src.fc, src.qkv):
        randomize_lora(m)
    torch.save(lora.lora_state_dict(src), tmp_path / "lora.pt")
    torch.save(src.state_dict(), tmp_path / "pretrained.pt")
    x = torch.randn(3, 8)
    model = Net()
    model.load_state_dict(torch.load(tmp_path / "pretrained.pt", weights_only=True), strict=False)
    with torch.no_grad():
        model.fc.lora_B.zero_()
    model.load_state_dict(torch.load(tmp_path / "lora.pt", weights_only=True), strict=False)
    torch.testing.assert_close(model(x), src(x))
    # ... and strictly through load_adapter: a single file is a lora_state_dict
    strict = Net()
    strict.load_state_dict(torch.load(tmp_path / "pretrained.pt", weights_only=True), strict=False)
    with torch.no_grad():
        strict.fc.lora_B.zero_()
    lora.load_adapter(strict, tmp_path / "lora.pt")
    torch.testing.assert_close(strict(x), src(x))
    partial = {k: v for k, v in lora.lora_state_dict(src).items() if not k.startswith("qkv")}
    partial["fc.lora_C"] = torch.zeros(1)
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(lora.AdapterError) as e:
        lora.load_adapter(Net(), tmp_path / "partial.pt")
    assert "missing qkv.lora_A" in str(e.value) and "fc.lora_C: no place for it" in str(e.value)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_a_lora_state_dict_file_with_peft_named_keys_is_refused_naming_the_key_and_the_form(
    tmp_path, suffix
):
    model = trained(toy(), TOY_CONFIG)
    saved = lora.lora_state_dict(model)
    renamed = {"blocks.0.q_proj.lora_A": "blocks.0.q_proj.lora_A.weight"}
    renamed["embed.lora_B"] = "embed.lora_embedding_B"
    file = {renamed.get(k, k): v.clone() for k, v in saved.items()}
    path = tmp_path / f"lora{suffix}"
    save_file(file, path) if suffix == ".safetensors" else torch.save(file, path)
    target = toy()
    lora.inject(target, TOY_CONFIG)
    before = state(target)
    with pytest.raises(lora.AdapterError) as e:
        lora.load_adapter(target, path)
    msg = str(e.value)
    assert (
        "blocks.0.q_proj.lora_A.weight: named as in a PEFT adapter_model file (<m>.lora_A.weight),"
        " not as a state dict names it (blocks.0.q_proj.lora_A, or blocks.0.q_proj.lora_A.<adapter>"
        in msg
    )
    assert (
        "embed.lora_embedding_B: named as in a PEFT adapter_model file (<m>.lora_embedding_B), not"
        " as a state dict names it (embed.lora_B," in msg
    )
    assert "missing blocks.0.q_proj.lora_A" in msg and "missing embed.lora_B" in msg
    assert "2 key(s) are named as in a PEFT adapter_model file" in msg
    assert "lora.load_adapter(model, directory)" in msg and "<m>.lora_A.weight -> <m>.lora_A" in msg
    assert "names adapter 'weight', which" not in msg  # what it said: no hint at the cause
    assert all(torch.equal(v, before[k]) for k, v in state(target).items())
    # load_state_dict names it the same way (the layers' key routing)
    with pytest.raises(RuntimeError, match=r"lora_A\.weight: named as in a PEFT adapter_model"):
        target.load_state_dict(file, strict=False)


def test_a_peft_adapter_file_without_its_config_is_refused_as_one(tmp_path):
    lora.save_adapter(trained(toy(), TOY_CONFIG), tmp_path / "adapter")
    lone = tmp_path / "lone" / WEIGHTS_NAME  # PEFT's file, its adapter_config.json left behind
    lone.parent.mkdir()
    lone.write_bytes((tmp_path / "adapter" / WEIGHTS_NAME).read_bytes())
    target = toy()
    lora.inject(target, TOY_CONFIG)
    before = state(target)
    with pytest.raises(lora.AdapterError) as e:
        lora.load_adapter(target, lone)
    msg = str(e.value)
    assert f"{lone}: a PEFT adapter_model file (its keys are PEFT's" in msg
    assert "'base_model.model." in msg  # a key of the file, named
    assert f"no {CONFIG_NAME} beside it" in msg and "lora.load_adapter(model, directory)" in msg
    assert "no place for it" not in msg  # what it said: read as a lora_state_dict file
    assert all(torch.equal(v, before[k]) for k, v in state(target).items())
    # with the config beside it, the same file is read as PEFT's
    lora.load_adapter(target, tmp_path / "adapter" / WEIGHTS_NAME)
    torch.testing.assert_close(logits(target), logits(trained(toy(), TOY_CONFIG)), rtol=0, atol=0)


def test_an_adapter_named_weight_still_takes_its_named_keys(tmp_path):
    config = lora.LoRAConfig(r=2, lora_alpha=4, target_modules=["q_proj"])
    lora.save_adapter(lora.inject(toy(), config), tmp_path / "blank")

    def two(seed):
        model = toy()
        lora.load_adapter(model, tmp_path / "blank")
        lora.load_adapter(model, tmp_path / "blank", adapter_name="weight")
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, layer in lora.layers.lora_layers(model):
                for adapter in layer.held_adapters().values():
                    for p in (adapter.lora_A, adapter.lora_B):
                        p.copy_(torch.randn(p.shape, generator=g))
        return model

    saved = lora.lora_state_dict(two(1))
    assert "blocks.0.q_proj.lora_A.weight" in saved  # adapter "weight"'s, not PEFT's name
    torch.save(saved, tmp_path / "two.pt")
    target = two(2)
    lora.load_adapter(target, tmp_path / "two.pt")
    got = lora.lora_state_dict(target)
    assert got.keys() == saved.keys() and all(torch.equal(got[k], saved[k]) for k in saved)


def test_hand_built_model_saves_with_a_derived_config_and_reloads_in_place(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(
        lora.Linear(8, 8, r=2, lora_alpha=4),
        nn.ReLU(),
        lora.MergedLinear(8, 24, r=2, enable_lora=[True, False, True]),
    )
    for m in (model[0], model[2]):
        randomize_lora(m)
    x = torch.randn(3, 8)
    want = model(x)
    lora.save_adapter(model, tmp_path)
    body = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert body["target_modules"] == ["0", "2"] and body["rank_pattern"] == {"2": 4}
    assert body["alpha_pattern"] == {"2": 2}  # scaling 1/2 kept: 2 / 4 = 1 / 2
    for m in (model[0], model[2]):
        randomize_lora(m)
    lora.load_adapter(model, tmp_path)  # in place, the fused adapter back into its slices
    torch.testing.assert_close(model(x), want)


# --- saving errors ---------------------------------------------------------------------------------
def test_saving_without_an_adapter_or_with_a_layer_peft_cannot_express_is_an_error(tmp_path):
    with pytest.raises(lora.AdapterError, match="has no active adapter"):
        lora.save_adapter(toy(), tmp_path)
    model = trained(toy(groups=2), lora.LoRAConfig(r=2, target_modules=["conv"]))
    with pytest.raises(lora.AdapterError, match=r"module 'conv' has groups=2"):
        lora.save_adapter(model, tmp_path)
    with pytest.raises(lora.AdapterError, match=r"has no adapter 'nope'"):
        lora.save_adapter(trained(toy(), TOY_CONFIG), tmp_path, adapter_name="nope")
    assert not (tmp_path / WEIGHTS_NAME).exists()


def test_loading_onto_a_layer_peft_computes_differently_is_refused(tmp_path):
    lora.save_adapter(trained(toy(), lora.LoRAConfig(r=2, target_modules=["conv"])), tmp_path)
    model = toy()
    model.conv.dilation = (2,)
    model.conv.padding = (2,)
    with pytest.raises(lora.AdapterError, match=r"module conv: has dilation=\(2,\)"):
        lora.load_adapter(model, tmp_path)


def test_save_overwrites_atomically_and_leaves_no_temporary_files(tmp_path):
    model = trained(toy(), TOY_CONFIG)
    lora.save_adapter(model, tmp_path)
    randomize_lora(model.blocks[0]["q_proj"])
    lora.save_adapter(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    fresh = toy()
    lora.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh), logits(model), rtol=0, atol=0)
