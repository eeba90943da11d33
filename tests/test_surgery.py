"""lora.inject / merge_and_unload on toy models, our Phi-3, and transformers' Phi-3."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from reference import randomize_lora
from tiny import ADAPTER_PHI3, Toy
from torch import nn

import lora
from lora.models import Phi3Config, Phi3ForCausalLM

FIXTURES = Path(__file__).parent / "fixtures"


def tiny_phi3(**over) -> Phi3ForCausalLM:
    torch.manual_seed(0)
    return Phi3ForCausalLM(Phi3Config(**dict(ADAPTER_PHI3, **over))).eval()


IDS = torch.tensor([[3, 5, 7, 11, 13, 17], [2, 4, 6, 8, 10, 12]])


def test_inject_swaps_in_place_sharing_weights_and_freezing_the_rest():
    model = Toy()
    weights = {n: m.weight for n, m in model.named_modules() if hasattr(m, "weight")}
    want = model(IDS)
    out = lora.inject(
        model,
        lora.LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed", "conv"]),
    )
    assert out is model
    assert isinstance(model.blocks[0]["q_proj"], lora.Linear) and isinstance(
        model.embed, lora.Embedding
    )
    assert isinstance(model.conv, lora.Conv1d) and type(model.lm_head) is nn.Linear
    for n, m in model.named_modules():
        if hasattr(m, "weight") and n in weights:
            assert m.weight is weights[n], n  # the same tensor: no copy
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    torch.testing.assert_close(
        model(IDS), want, rtol=1e-6, atol=1e-6
    )  # B = 0 (embedding: A = 0): starts equal
    assert model.blocks[1]["v_proj"].bias is None


def test_inject_keeps_dtype_and_device_and_puts_adapters_in_fp32_over_bf16():
    model = Toy().to(torch.bfloat16)
    lora.inject(model, lora.LoRAConfig(target_modules=["q_proj"]))
    layer = model.blocks[0]["q_proj"]
    assert layer.weight.dtype == torch.bfloat16 and layer.lora_A.dtype == torch.float32
    model2 = Toy().double()
    lora.inject(model2, lora.LoRAConfig(target_modules=["q_proj"]), lora_dtype=None)
    assert model2.blocks[0]["q_proj"].lora_A.dtype == torch.float64


def test_one_training_step_moves_only_lora_parameters():
    model = Toy()
    lora.inject(model, {"r": 2, "target_modules": "all-linear", "lora_dropout": 0.1})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    model(IDS).logsumexp(-1).mean().backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)


class HeadedToy(Toy):
    def get_output_embeddings(self):
        return self.lm_head


def test_all_linear_skips_the_output_head_and_regex_and_exclude_work():
    model = lora.inject(HeadedToy(), lora.LoRAConfig(target_modules="all-linear"))
    assert type(model.lm_head) is nn.Linear
    assert {n for n, _ in lora.layers.lora_layers(model)} == {
        f"blocks.{i}.{p}" for i in range(2) for p in ("q_proj", "v_proj")
    }
    # PEFT's rule: only get_output_embeddings() says what the output head is; a plain module's
    # lm_head is a Linear like the others (exclude_modules=["lm_head"] leaves it out).
    model = lora.inject(Toy(), lora.LoRAConfig(target_modules="all-linear"))
    assert isinstance(model.lm_head, lora.Linear)
    model = lora.inject(Toy(), lora.LoRAConfig(target_modules=r"blocks\.\d\.q_proj"))
    assert {n for n, _ in lora.layers.lora_layers(model)} == {"blocks.0.q_proj", "blocks.1.q_proj"}
    model = lora.inject(
        Toy(), lora.LoRAConfig(target_modules=["q_proj", "v_proj"], exclude_modules=["1.v_proj"])
    )
    assert type(model.blocks[1]["v_proj"]) is nn.Linear and isinstance(
        model.blocks[0]["v_proj"], lora.Linear
    )


def test_rank_and_alpha_patterns():
    cfg = lora.LoRAConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        rank_pattern={r"blocks\.0\.q_proj": 2},
        alpha_pattern={"v_proj": 32},
    )
    model = lora.inject(Toy(), cfg)
    assert model.blocks[0]["q_proj"].r == 2 and model.blocks[1]["q_proj"].r == 4
    assert model.blocks[0]["v_proj"].scaling == 8.0 and model.blocks[0]["q_proj"].scaling == 4.0


def test_a_rank_pattern_of_zeros_for_every_target_is_refused_naming_it():
    model = Toy()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = lora.LoRAConfig(r=4, target_modules=["q_proj"], rank_pattern={"q_proj": 0})
    with pytest.raises(
        lora.InjectionError, match=r"rank_pattern=\{'q_proj': 0\} gives every target rank 0"
    ) as e:
        lora.inject(model, cfg)
    assert "blocks.0.q_proj" in str(e.value) and "r > 0" in str(e.value)
    assert not any(isinstance(m, lora.LoRALayer) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # one target left with a rank: injected as before (rank 0 leaves the other alone)
    cfg = lora.LoRAConfig(r=4, target_modules=["q_proj"], rank_pattern={r"blocks\.0\.q_proj": 0})
    lora.inject(model, cfg)
    assert not isinstance(model.blocks[0]["q_proj"], lora.Linear)
    assert isinstance(model.blocks[1]["q_proj"], lora.Linear)


@pytest.mark.parametrize(
    "config,match",
    [
        ({"target_modules": ["q_proj", "k_proj"]}, r"\['k_proj'\] match no module"),
        ({"target_modules": ["norm"]}, r"cannot take LoRA.*blocks\.0\.norm \(LayerNorm\)"),
        ({"target_modules": r"nothing\.here"}, r"regex matches no module"),
        ({"target_modules": ["q_proj[q,v]"]}, r"declares no fused slices for 'q_proj'"),
        ({"target_modules": None}, r"target_modules=None"),
        (
            {"target_modules": ["q_proj"], "modules_to_save": ["classifier"]},
            r"modules_to_save: \['classifier'\]",
        ),
    ],
)
def test_bad_targets_are_errors_naming_them(config, match):
    with pytest.raises(lora.InjectionError, match=match):
        lora.inject(Toy(), lora.LoRAConfig(**config))


def test_inject_twice_is_an_error():
    model = lora.inject(Toy(), lora.LoRAConfig(target_modules=["q_proj"]))
    with pytest.raises(lora.InjectionError, match="already has LoRA layers"):
        lora.inject(model, lora.LoRAConfig(target_modules=["v_proj"]))


def test_config_accepts_the_seed_peft_config_and_names_unknown_keys():
    peft_config = {
        "r": 16,
        "lora_alpha": 32,
        "lora_dropout": 0.05,
        "bias": "none",
        "task_type": "CAUSAL_LM",
        "target_modules": "all-linear",
        "modules_to_save": None,
    }
    cfg = lora.LoRAConfig(**peft_config)
    assert cfg.task_type == "CAUSAL_LM" and cfg.target_modules == "all-linear"
    with pytest.raises(TypeError, match="lora_rank"):
        lora.LoRAConfig(lora_rank=4)
    with pytest.raises(ValueError, match="bias='some'"):
        lora.LoRAConfig(bias="some")
    with pytest.raises(ValueError, match="lora_dropout=1.5"):
        lora.LoRAConfig(lora_dropout=1.5)
    with pytest.raises(ValueError, match=r"use_dora=True"):
        lora.LoRAConfig.from_peft_dict({"r": 4, "use_dora": True})
    with pytest.raises(ValueError, match=r"'qkv_proj\[\]'"):
        lora.LoRAConfig(target_modules=["qkv_proj[]"])


def test_modules_to_save_train_in_full():
    model = lora.inject(
        Toy(), lora.LoRAConfig(target_modules=["q_proj"], modules_to_save=["lm_head"])
    )
    assert model.lm_head.weight.requires_grad and model.lm_head.bias.requires_grad
    assert not model.embed.weight.requires_grad


def test_merge_and_unload_gives_plain_layers_with_equal_outputs():
    model = Toy()
    keys = set(model.state_dict())
    lora.inject(model, lora.LoRAConfig(r=3, target_modules=["q_proj", "v_proj", "embed", "conv"]))
    for _, layer in lora.layers.lora_layers(model):
        randomize_lora(layer)
    want = model(IDS)
    out = lora.merge_and_unload(model)
    assert not any(True for _ in lora.layers.lora_layers(out))
    assert (
        type(out.blocks[0]["q_proj"]) is nn.Linear
        and type(out.conv) is nn.Conv1d
        and type(out.embed) is nn.Embedding
    )
    assert set(out.state_dict()) == keys
    torch.testing.assert_close(out(IDS), want, rtol=1e-5, atol=1e-5)
    lora.inject(
        out, lora.LoRAConfig(target_modules=["q_proj"])
    )  # an unloaded model can be adapted again


def test_gpt2_style_conv1d_becomes_fan_in_fan_out_linear_and_comes_back():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    model = nn.Sequential(Conv1D(12, 8), nn.GELU(), Conv1D(8, 12))
    x = torch.randn(2, 5, 8)
    lora.inject(model, lora.LoRAConfig(r=2, target_modules=["0"]))
    assert isinstance(model[0], lora.Linear) and model[0].fan_in_fan_out
    randomize_lora(model[0])
    want = model(x)
    model = lora.merge_and_unload(model)
    assert type(model[0]) is Conv1D
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)


# --- Phi-3 ----------------------------------------------------------------------------------------
def test_fused_slices_become_merged_linear_with_gqa_split_sizes():
    model = tiny_phi3()
    want = model(IDS).logits
    lora.inject(
        model,
        lora.LoRAConfig(r=4, lora_alpha=8, target_modules=["qkv_proj[q,v]", "gate_up_proj[up]"]),
    )
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, lora.MergedLinear)
    assert qkv.split_sizes == (32, 16, 16) and qkv.enable_lora == (True, False, True)
    assert qkv.lora_A.shape == (8, 32) and qkv.lora_B.shape == (48, 4)
    gate_up = model.model.layers[1].mlp.gate_up_proj
    assert gate_up.split_sizes == (48, 48) and gate_up.enable_lora == (False, True)
    torch.testing.assert_close(model(IDS).logits, want)
    for _, layer in lora.layers.lora_layers(model):
        randomize_lora(layer, scale=0.1)
    adapted = model(IDS).logits
    # the k slice of qkv and the gate slice of gate_up are untouched by the adapter
    delta = qkv.delta_weight()
    assert torch.count_nonzero(delta[32:48]) == 0 and torch.count_nonzero(delta[:32]) > 0
    merged = lora.merge_and_unload(model)
    torch.testing.assert_close(merged(IDS).logits, adapted, rtol=1e-5, atol=1e-5)


def test_plain_qkv_target_is_one_lora_over_the_fused_matrix():
    model = lora.inject(tiny_phi3(), lora.LoRAConfig(r=4, target_modules=["qkv_proj"]))
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert type(qkv) is lora.Linear and qkv.lora_B.shape == (64, 4)


def test_unknown_slice_is_an_error():
    with pytest.raises(
        lora.InjectionError, match=r"unknown slice\(s\) \['x'\]; qkv_proj has \['q', 'k', 'v'\]"
    ):
        lora.inject(tiny_phi3(), lora.LoRAConfig(target_modules=["qkv_proj[q,x]"]))


def test_phi3_mini_on_meta_has_peft_trainable_count():
    cfg = json.loads((FIXTURES / "phi3_mini_4k_instruct_config.json").read_text())
    with torch.device("meta"):
        model = Phi3ForCausalLM(Phi3Config(**cfg))
    assert sum(p.numel() for p in model.parameters()) == 3_821_079_552
    peft_config = {
        "r": 16,
        "lora_alpha": 32,
        "lora_dropout": 0.05,
        "bias": "none",
        "task_type": "CAUSAL_LM",
        "target_modules": "all-linear",
        "modules_to_save": None,
    }
    lora.inject(model, lora.LoRAConfig(**peft_config))
    trainable, total = lora.trainable_parameters(model)
    assert trainable == 25_165_824
    assert total == 3_821_079_552 + 25_165_824


def test_merged_phi3_saves_and_reloads_with_equal_logits(tmp_path):
    model = lora.inject(tiny_phi3(), lora.LoRAConfig(r=4, target_modules="all-linear"))
    for _, layer in lora.layers.lora_layers(model):
        randomize_lora(layer, scale=0.1)
    want = model(IDS).logits
    lora.merge_and_unload(model).save_pretrained(tmp_path)
    again = Phi3ForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(again(IDS).logits, want, rtol=1e-5, atol=1e-5)


def test_peft_trainable_count_matches_ours_on_transformers_phi3():
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    cfg = transformers.Phi3Config(**ADAPTER_PHI3)
    torch.manual_seed(0)
    theirs = peft.get_peft_model(
        transformers.Phi3ForCausalLM(cfg), peft.LoraConfig(r=4, target_modules="all-linear")
    )
    ours = lora.inject(
        transformers.Phi3ForCausalLM(cfg), lora.LoRAConfig(r=4, target_modules="all-linear")
    )
    assert lora.trainable_parameters(ours)[0] == theirs.get_nb_trainable_parameters()[0]


def test_works_on_transformers_phi3_inject_train_merge():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Phi3Config(**ADAPTER_PHI3)
    torch.manual_seed(0)
    model = transformers.Phi3ForCausalLM(cfg)
    lora.inject(
        model,
        lora.LoRAConfig(r=4, lora_alpha=8, target_modules=["qkv_proj[q,v]", "o_proj", "down_proj"]),
    )
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, lora.MergedLinear) and qkv.split_sizes == (32, 16, 16)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        loss = model(input_ids=IDS, labels=IDS).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.count_nonzero(qkv.lora_B) > 0
    model.eval()
    with torch.no_grad():
        want = model(input_ids=IDS).logits
        merged = lora.merge_and_unload(model)
        assert type(merged.model.layers[0].self_attn.qkv_proj) is nn.Linear
        torch.testing.assert_close(merged(input_ids=IDS).logits, want, rtol=1e-5, atol=1e-5)
