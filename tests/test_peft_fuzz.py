"""Differential fuzz against PEFT: random LoRA configs applied by ours and by PEFT must build the
same adapter (modules, r, alpha, scaling; modules_to_save; trainable parameters) and, through the
adapter file both ways, compute the same logits (fp32). The harness is tests/peft_diff.py.

The fixed cases are the differences the fuzz found, each as its smallest config; the drawn ones
keep looking (a few examples here, more under ``-m slow``). Skips without peft or transformers.
"""

from __future__ import annotations

import json
import warnings

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

import peft_diff as D  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import lora  # noqa: E402
from lora.adapters import PeftCompatibilityWarning  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning", "ignore:`is_gradient_checkpointing`:FutureWarning"
)

FOUND = [
    # "all-linear" on a plain module: PEFT adapts its lm_head (only a transformers model's
    # get_output_embeddings() is left out); ours left every "lm_head" out. The file said
    # "all-linear", so PEFT loaded a random lm_head adapter the file did not hold.
    ("custom", {"target_modules": "all-linear", "init_lora_weights": False}),
    # A rank-0 pattern: the file named the adapted modules, and the top-level "proj" reads as
    # layers.*.self_attn.proj too, in PEFT: it built a LoRA the file did not hold.
    ("custom", {"target_modules": ["proj"], "rank_pattern": {r"layers\.0\.self_attn\.proj": 0}}),
    # PEFT's bias="all" file holds a nested copy's biases again as
    # "layers.1.modules_to_save.default.mlp.down_proj.bias"; ours refused them.
    ("custom", {"target_modules": ["embed"], "modules_to_save": ["layers.1"], "bias": "all"}),
    # A target entry that matches nothing: PEFT ignores it; ours refused PEFT's file.
    ("custom", {"target_modules": ["q_proj", "k_proj"]}),
    # A modules_to_save entry that matches nothing (the "classifier" PEFT's SEQ_CLS models
    # write): PEFT ignores it; ours refused PEFT's file.
    ("custom", {"target_modules": ["q_proj"], "modules_to_save": ["head", "classifier"]}),
    # "head" wraps lm_head (string ending), a LoRA target too: ours trains it in full; PEFT leaves
    # out of LoRA only what an entry names at a dot, so it refused our file (its target_modules
    # named lm_head): now named module by module, without it.
    ("custom", {"target_modules": ["lm_head", "embed"], "modules_to_save": ["head"]}),
    # A modules_to_save module inside another one: ours nested a wrapper in the copy (PEFT does
    # not), wrote a file PEFT failed on, and crashed with a KeyError on PEFT's file.
    ("phi3", {"target_modules": ["qkv_proj"], "modules_to_save": ["o_proj", "layers.1"]}),
    # A modules_to_save module a direct child of another: PEFT wraps it again inside the outer wrapper
    # (that copy never runs; its file holds it) and failed on our file: ours names the outer
    # modules in full; load_adapter warns about PEFT's file.
    ("phi3", {"target_modules": ["lm_head"], "modules_to_save": ["layers.0.mlp", "down_proj"]}),
    # ... and with every module an entry names inside another's: save_adapter raised "modules_to_save:
    # ['down_proj'] match no module" (they were all inside the mlp wrappers by then).
    ("custom", {"target_modules": ["q_proj"], "modules_to_save": ["down_proj", "mlp"]}),
    # Overlapping pattern keys: the first match counts, and PEFT's save_pretrained sorts the keys
    # (json sort_keys), so our file, written again by PEFT, read another alpha; PEFT's own file
    # may not say which key it trained with: load_adapter warns.
    ("custom", {"target_modules": "all-linear", "alpha_pattern": {"self_attn.proj": 2, "proj": 6}}),
]


@pytest.mark.parametrize(("kind", "cfg"), FOUND, ids=[str(i) for i in range(len(FOUND))])
def test_found_difference_is_gone(tmp_path, kind, cfg):
    diffs = D.compare(kind, cfg, tmp_path)
    assert D.problems(diffs) == []
    assert not [d for d in diffs if d[:2] == ("refused", "load")]  # PEFT's file loads into ours


def test_modules_to_save_inside_another_is_written_as_the_outer_modules(tmp_path):
    # PEFT would wrap model.layers.0.mlp.down_proj again inside layers.0.mlp's wrapper.
    state = D.base_state("phi3")
    model = lora.inject(
        D.our_side("phi3", state),
        lora.LoRAConfig(target_modules=["o_proj"], modules_to_save=["layers.0.mlp", "down_proj"]),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", PeftCompatibilityWarning)
        lora.save_adapter(model, tmp_path)
    body = json.loads((tmp_path / "adapter_config.json").read_text())
    assert body["modules_to_save"] == ["model.layers.0.mlp", "model.layers.1.mlp.down_proj"]


def test_a_peft_file_with_nested_modules_to_save_warns(tmp_path):
    theirs = D.peft.get_peft_model(
        D.peft_side("phi3", D.base_state("phi3")),
        D.peft.LoraConfig(target_modules=["o_proj"], modules_to_save=["layers.0.mlp", "down_proj"]),
    )
    theirs.save_pretrained(tmp_path)
    with pytest.warns(PeftCompatibilityWarning, match=r"wraps each again inside"):
        lora.load_adapter(D.our_side("phi3", D.base_state("phi3")), tmp_path)


def test_overlapping_pattern_keys_in_a_sorted_peft_file_warn(tmp_path):
    theirs = D.peft.get_peft_model(
        D.peft_side("custom", D.base_state("custom")),
        D.peft.LoraConfig(target_modules=["proj"], alpha_pattern={"self_attn.proj": 2, "proj": 6}),
    )
    theirs.save_pretrained(tmp_path)  # PEFT writes the keys sorted: "proj" first
    with pytest.warns(PeftCompatibilityWarning, match=r"alpha_pattern keys \['proj', 'self_attn"):
        lora.load_adapter(D.our_side("custom", D.base_state("custom")), tmp_path)


def test_our_overlapping_pattern_keys_are_written_one_key_per_module(tmp_path):
    model = lora.inject(
        D.Custom(),
        lora.LoRAConfig(target_modules=["proj"], alpha_pattern={"self_attn.proj": 2, "proj": 6}),
    )
    lora.save_adapter(model, tmp_path)
    body = json.loads((tmp_path / "adapter_config.json").read_text())
    assert body["alpha_pattern"] == {
        r"^layers\.0\.self_attn\.proj": 2,
        r"^layers\.1\.self_attn\.proj": 2,
        "^proj": 6,
    }


@settings(max_examples=6)
@given(data=st.data())
def test_drawn_configs_agree_with_peft(tmp_path_factory, data):
    kind = data.draw(st.sampled_from(["phi3", "custom"]))
    cfg = data.draw(D.config_strategy(kind))
    assert D.problems(D.compare(kind, cfg, tmp_path_factory.mktemp("fuzz"))) == []


@pytest.mark.slow
@settings(max_examples=300)
@given(data=st.data())
def test_drawn_configs_agree_with_peft_many(tmp_path_factory, data):
    kind = data.draw(st.sampled_from(["phi3", "custom"]))
    cfg = data.draw(D.config_strategy(kind))
    assert D.problems(D.compare(kind, cfg, tmp_path_factory.mktemp("fuzz"))) == []
