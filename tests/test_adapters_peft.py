"""Exactness against PEFT: our adapters loaded by PeftModel.from_pretrained onto transformers' Phi-3, and
PEFT-trained adapters loaded by lora.load_adapter into our Phi-3, give the same logits (fp32, <= 1e-5).

Everything is built in memory from tiny configs; nothing touches the network. Skips without peft or
transformers (a test extra).
"""

from __future__ import annotations

import json
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from reference import randomize_lora  # noqa: E402
from tiny import ADAPTER_PHI3 as PHI3  # noqa: E402

import lora  # noqa: E402
from lora.adapters import CONFIG_NAME, WEIGHTS_NAME  # noqa: E402
from lora.models import Phi3Config, Phi3ForCausalLM  # noqa: E402

transformers.logging.set_verbosity_error()
pytestmark = pytest.mark.filterwarnings(
    "ignore:Setting `save_embedding_layers`:UserWarning",
    "ignore:`is_gradient_checkpointing`:FutureWarning",
)
ATOL = 1e-5
IDS = torch.tensor([[3, 5, 7, 11, 13, 17, 19], [2, 4, 6, 8, 10, 12, 14]])


def pair():
    """transformers' Phi-3 and ours with the same base weights (and a copy of them)."""
    torch.manual_seed(0)
    hf = transformers.Phi3ForCausalLM(transformers.Phi3Config(**PHI3)).eval()
    base = {k: v.clone() for k, v in hf.state_dict().items()}
    ours = Phi3ForCausalLM(Phi3Config(**PHI3)).eval()
    ours.load_state_dict(base)
    return hf, ours, base


def ours_with(base) -> Phi3ForCausalLM:
    model = Phi3ForCausalLM(Phi3Config(**PHI3)).eval()
    model.load_state_dict(base)
    return model


def max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("use_rslora", [False, True])
def test_our_adapter_with_fused_slices_loads_in_peft_with_equal_logits(tmp_path, use_rslora):
    hf, ours, _ = pair()
    config = lora.LoRAConfig(
        r=4,
        lora_alpha=8,
        use_rslora=use_rslora,
        target_modules=["qkv_proj[q,v]", "o_proj", "gate_up_proj[up]", "down_proj", "embed_tokens"],
        rank_pattern={r"layers\.1\.self_attn\.o_proj": 2},
        alpha_pattern={"down_proj": 3},
        modules_to_save=["lm_head"],
        task_type="CAUSAL_LM",
    )
    lora.inject(ours, config)
    g = torch.Generator().manual_seed(1)
    for _, layer in lora.layers.lora_layers(ours):
        randomize_lora(layer, generator=g, scale=0.1)
    with torch.no_grad():
        ours.lm_head.weight.mul_(1.5)
        want = ours(IDS).logits
    lora.save_adapter(ours, tmp_path, base_model_name_or_path="tiny-phi3")
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path).eval()
    assert (
        type(peft_model.base_model.model.model.layers[0].self_attn.qkv_proj).__name__ == "Linear"
    )  # PEFT's LoRA Linear
    with torch.no_grad():
        got = peft_model(input_ids=IDS).logits
    assert max_diff(got, want) <= ATOL


@pytest.mark.parametrize("use_rslora", [False, True])
def test_peft_trained_adapter_loads_into_our_phi3_with_equal_logits(tmp_path, use_rslora):
    hf, _, base = pair()
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        use_rslora=use_rslora,
        init_lora_weights=False,
        target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj", "embed_tokens"],
        rank_pattern={"layers.0.self_attn.o_proj": 2},
        alpha_pattern={"down_proj": 5},
        modules_to_save=["lm_head"],
        task_type="CAUSAL_LM",
    )
    peft_model = peft.get_peft_model(hf, config)
    peft_model.train()
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        loss = peft_model(input_ids=IDS, labels=IDS).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    peft_model.eval()
    with torch.no_grad():
        want = peft_model(input_ids=IDS).logits
    peft_model.save_pretrained(tmp_path)

    ours = ours_with(base)
    lora.load_adapter(ours, tmp_path)
    assert (
        ours.model.layers[0].self_attn.o_proj.r == 2
        and ours.model.layers[0].mlp.down_proj.lora_alpha == 5
    )
    assert ours.lm_head.weight.requires_grad  # modules_to_save: trainable, and loaded
    with torch.no_grad():
        assert max_diff(ours(IDS).logits, want) <= ATOL


def test_peft_round_trip_of_our_fused_adapter_comes_back_exact(tmp_path):
    hf, ours, base = pair()
    lora.inject(
        ours, lora.LoRAConfig(r=2, lora_alpha=4, target_modules=["qkv_proj[q,v]", "o_proj"])
    )
    for _, layer in lora.layers.lora_layers(ours):
        randomize_lora(layer, scale=0.1)
    with torch.no_grad():
        want = ours(IDS).logits
    lora.save_adapter(ours, tmp_path / "ours")
    peft.PeftModel.from_pretrained(hf, tmp_path / "ours").save_pretrained(tmp_path / "peft")
    again = ours_with(base)
    lora.load_adapter(
        again, tmp_path / "peft"
    )  # PEFT dropped our header: a plain LoRA over qkv_proj
    assert type(again.model.layers[0].self_attn.qkv_proj) is lora.Linear
    with torch.no_grad():
        assert max_diff(again(IDS).logits, want) <= ATOL


def test_peft_legacy_bin_adapter_loads_without_unpickling_code(tmp_path):
    hf, _, base = pair()
    peft_model = peft.get_peft_model(
        hf, peft.LoraConfig(r=2, target_modules=["o_proj"], init_lora_weights=False)
    )
    peft_model.eval()
    with torch.no_grad():
        want = peft_model(input_ids=IDS).logits
    peft_model.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").exists() and not (tmp_path / WEIGHTS_NAME).exists()
    ours = ours_with(base)
    lora.load_adapter(ours, tmp_path)
    with torch.no_grad():
        assert max_diff(ours(IDS).logits, want) <= ATOL


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8, padding_idx=0)
        self.conv = nn.Conv2d(8, 8, (3, 1), padding=(1, 0), stride=1)
        self.q_proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 20)

    def forward(self, ids):
        h = self.embed(ids)  # (b, s, 8)
        h = self.conv(h.transpose(1, 2).unsqueeze(-1)).squeeze(-1).transpose(1, 2)
        return self.head(torch.tanh(self.q_proj(h)))


def toy() -> Toy:
    torch.manual_seed(0)
    return Toy().eval()


def test_conv_and_embedding_adapters_cross_both_ways(tmp_path):
    ours = lora.inject(
        toy(),
        lora.LoRAConfig(
            r=3, lora_alpha=6, target_modules=["embed", "conv", "q_proj"], bias="lora_only"
        ),
    )
    for _, layer in lora.layers.lora_layers(ours):
        randomize_lora(layer)
    with torch.no_grad():
        ours.q_proj.bias.add_(0.25)
        want = ours(IDS % 20)
    lora.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(toy(), tmp_path / "ours").eval()
    with torch.no_grad():
        assert max_diff(theirs(IDS % 20), want) <= ATOL

    trained = peft.get_peft_model(
        toy(),
        peft.LoraConfig(
            r=2, lora_alpha=3, target_modules=["embed", "conv", "q_proj"], init_lora_weights=False
        ),
    )
    trained.eval()
    with torch.no_grad():
        want = trained(IDS % 20)
    trained.save_pretrained(tmp_path / "peft")
    body = json.loads((tmp_path / "peft" / CONFIG_NAME).read_text())
    assert body["peft_type"] == "LORA"
    mine = lora.load_adapter(toy(), tmp_path / "peft")
    assert isinstance(mine.conv, lora.Conv2d) and mine.conv.lora_B.shape == (8, 2, 1, 1)
    with torch.no_grad():
        assert max_diff(mine(IDS % 20), want) <= ATOL


def test_our_config_is_read_by_peft_with_every_field(tmp_path):
    _, ours, _ = pair()
    lora.inject(
        ours,
        lora.LoRAConfig(
            r=4, lora_alpha=16, lora_dropout=0.1, target_modules="all-linear", task_type="CAUSAL_LM"
        ),
    )
    lora.save_adapter(ours, tmp_path, base_model_name_or_path="microsoft/Phi-3-mini-4k-instruct")
    config = peft.PeftConfig.from_pretrained(str(tmp_path))
    assert isinstance(config, peft.LoraConfig)
    assert (config.r, config.lora_alpha, config.lora_dropout) == (4, 16, 0.1)
    # "all-linear" is written as the modules it named, as PEFT writes it: PEFT leaves the output
    # head out of a transformers model only, so the word alone may read as other modules.
    assert config.target_modules == {n for n, _ in lora.layers.lora_layers(ours)}
    assert config.task_type == "CAUSAL_LM"
    assert (
        config.base_model_name_or_path == "microsoft/Phi-3-mini-4k-instruct"
        and config.inference_mode
    )


# --- modules_to_save on tied embeddings (Phi-4-mini ties lm_head to embed_tokens) ---------------
TIED = dict(PHI3, tie_word_embeddings=True, partial_rotary_factor=0.75)  # Phi-4-mini-like


def tied_pair():
    """transformers' and our tied Phi-3 (Phi-4-mini-like) with the same base weights."""
    torch.manual_seed(0)
    hf = transformers.Phi3ForCausalLM(transformers.Phi3Config(**TIED)).eval()
    assert hf.lm_head.weight is hf.model.embed_tokens.weight
    base = {k: v.clone() for k, v in hf.state_dict().items()}
    return hf, ours_tied(base), base


def ours_tied(base) -> Phi3ForCausalLM:
    model = Phi3ForCausalLM(Phi3Config(**TIED)).eval()
    model.load_state_dict(base)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


TIED_CASES = [(m, t) for m in ("lm_head", "embed_tokens") for t in (False, True)]


def _peft_trained_copy(model, target: str, saved: str, tying: bool):
    """PEFT's LoRA on ``target`` (random B) with modules_to_save=[saved]
    (``ensure_weight_tying=tying``), its copies perturbed as training would: the PeftModel."""
    config = peft.LoraConfig(
        r=2,
        lora_alpha=4,
        init_lora_weights=False,
        target_modules=[target],
        modules_to_save=[saved],
        ensure_weight_tying=tying,
    )
    peft_model = peft.get_peft_model(model, config)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if ".modules_to_save." in n:
                p.add_(0.5 * torch.randn(p.shape, generator=g))
    return peft_model


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(("saved", "tying"), TIED_CASES)
def test_peft_modules_to_save_on_tied_model_loads_into_ours(tmp_path, saved, tying):
    hf, _, base = tied_pair()
    with torch.no_grad():
        want_base = hf(input_ids=IDS).logits
    peft_model = _peft_trained_copy(hf, "o_proj", saved, tying)
    with torch.no_grad():
        want = peft_model(input_ids=IDS).logits
    assert max_diff(want, want_base) > 0.1
    peft_model.save_pretrained(tmp_path)

    ours = ours_tied(base)
    lora.load_adapter(ours, tmp_path)
    with torch.no_grad():
        assert max_diff(ours(IDS).logits, want) <= ATOL
        with lora.disabled(ours):  # the originals are untouched
            assert max_diff(ours(IDS).logits, want_base) <= ATOL
    head, embed = ours.lm_head, ours.model.embed_tokens
    assert (head.weight is embed.weight) == tying  # a copy of the named module only, or both tied


def _inject_trained_copy(model, target: str, saved: str, tying: bool) -> None:
    """Inject a LoRA on ``target`` with modules_to_save=[saved] (``ensure_weight_tying=tying``)
    and perturb the LoRA tensors and the named module's copy, as training would."""
    config = lora.LoRAConfig(
        r=2,
        lora_alpha=4,
        target_modules=[target],
        modules_to_save=[saved],
        ensure_weight_tying=tying,
    )
    lora.inject(model, config)
    g = torch.Generator().manual_seed(4)
    for _, layer in lora.layers.lora_layers(model):
        randomize_lora(layer, generator=g, scale=0.1)
    named = model.lm_head if saved == "lm_head" else model.model.embed_tokens
    with torch.no_grad():
        named.weight.add_(0.5 * torch.randn(named.weight.shape, generator=g))


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(("saved", "tying"), TIED_CASES)
def test_our_modules_to_save_on_tied_model_loads_into_peft(tmp_path, saved, tying):
    hf, ours, _ = tied_pair()
    with torch.no_grad():
        want_base = ours(IDS).logits
    _inject_trained_copy(ours, "o_proj", saved, tying)
    with torch.no_grad():
        want = ours(IDS).logits
        with lora.disabled(ours):
            assert max_diff(ours(IDS).logits, want_base) == 0  # the original, untouched
    assert max_diff(want, want_base) > 0.1
    lora.save_adapter(ours, tmp_path)
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path).eval()
    with torch.no_grad():
        got = peft_model(input_ids=IDS).logits
    assert max_diff(got, want) <= ATOL


# --- a plain torch model tied by hand: PEFT finds no tie, we do --------------------------------
class HandTied(nn.Module):
    """A plain torch model whose head shares the embedding's Parameter (no transformers, no
    ``_tied_weights_keys``): PEFT's ``ensure_weight_tying`` finds no tie here; ours does."""

    def __init__(self):
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(64, 16)
        self.model.proj = nn.Linear(16, 16)
        self.lm_head = nn.Linear(16, 64, bias=False)
        self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids):
        return self.lm_head(torch.tanh(self.model.proj(self.model.embed_tokens(input_ids))))


def hand_tied() -> HandTied:
    torch.manual_seed(0)
    return HandTied().eval()


def _run(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS)


def _peft_file_of_hand_tied(path, saved: str) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's adapter of HandTied with ensure_weight_tying=True and modules_to_save=[saved], its
    copies perturbed, saved to ``path``: returns (the logits PEFT ran, the base model's)."""
    model = hand_tied()
    want_base = _run(model)
    with pytest.warns(UserWarning, match="no tied modules were found"):
        peft_model = _peft_trained_copy(model, "proj", saved, True)
    want = _run(peft_model)
    assert max_diff(want, want_base) > 0.1
    peft_model.save_pretrained(path)
    return want, want_base


@pytest.mark.filterwarnings("ignore:You have requested `ensure_weight_tying`:UserWarning")
@pytest.mark.parametrize("saved", ["lm_head", "embed_tokens"])
def test_a_peft_file_that_did_not_tie_loads_untied_into_ours_on_a_plain_model(tmp_path, saved):
    # PEFT ties only what transformers' _tied_weights_keys names: on a plain model it trains a copy
    # of the named module alone, yet the file says ensure_weight_tying. Ours once tied the partner
    # to that copy on load (logits off by ~9 here).
    want, want_base = _peft_file_of_hand_tied(tmp_path / "peft", saved)
    config = json.loads((tmp_path / "peft" / CONFIG_NAME).read_text())
    assert config["ensure_weight_tying"] is True
    with safe_open(str(tmp_path / "peft" / WEIGHTS_NAME), "pt") as f:
        copies = [k for k in f.keys() if "lora_" not in k]
    named = "lm_head" if saved == "lm_head" else "model.embed_tokens"
    partner = "model.embed_tokens" if saved == "lm_head" else "lm_head"
    assert copies == [f"base_model.model.{named}.weight"]  # the partner's key is not there

    theirs = peft.PeftModel.from_pretrained(hand_tied(), tmp_path / "peft").eval()
    assert max_diff(_run(theirs), want) == 0  # PEFT's own load: the reference

    ours = hand_tied()
    with pytest.warns(lora.adapters.PeftCompatibilityWarning, match=rf"no weight for '{partner}'"):
        lora.load_adapter(ours, tmp_path / "peft")
    assert max_diff(_run(ours), want) <= ATOL
    with lora.disabled(ours):
        assert max_diff(_run(ours), want_base) == 0
    assert not isinstance(ours.get_submodule(partner), lora.layers.ModulesToSaveWrapper)
    assert ours.get_submodule(partner).weight is ours.get_submodule(named).original_module.weight
    assert ours.lora_config.ensure_weight_tying is False  # what the adapter is: untied

    # saved again by us, it loads untied into PEFT and ours, without a warning
    lora.save_adapter(ours, tmp_path / "ours")
    again = peft.PeftModel.from_pretrained(hand_tied(), tmp_path / "ours").eval()
    assert max_diff(_run(again), want) <= ATOL
    with warnings.catch_warnings():
        warnings.simplefilter("error", lora.adapters.PeftCompatibilityWarning)
        fresh = lora.load_adapter(hand_tied(), tmp_path / "ours")
    assert max_diff(_run(fresh), want) <= ATOL


@pytest.mark.filterwarnings("ignore:You have requested `ensure_weight_tying`:UserWarning")
def test_a_file_with_different_tied_weights_loads_each_into_its_own_copy_as_peft_runs_it(tmp_path):
    # Both keys, different values (no tied training writes that): PEFT runs each module with its
    # key's values on a plain model; ours gives each its own copy (and keeps the base intact).
    _peft_file_of_hand_tied(tmp_path, "lm_head")
    file = tmp_path / WEIGHTS_NAME
    with safe_open(str(file), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    head = tensors["base_model.model.lm_head.weight"]
    tensors["base_model.model.model.embed_tokens.weight"] = head + 0.5
    save_file(tensors, str(file))
    want = _run(peft.PeftModel.from_pretrained(hand_tied(), tmp_path).eval())
    ours = hand_tied()
    with pytest.warns(lora.adapters.PeftCompatibilityWarning, match="different weights"):
        lora.load_adapter(ours, tmp_path)
    assert max_diff(_run(ours), want) <= ATOL
    assert ours.lm_head.weight is not ours.model.embed_tokens.weight
    assert torch.equal(ours.model.embed_tokens.weight, head + 0.5)
    assert ours.lora_config.modules_to_save == ["lm_head", "model.embed_tokens"]


@pytest.mark.filterwarnings("ignore:You have requested `ensure_weight_tying`:UserWarning")
@pytest.mark.parametrize("saved", ["lm_head", "embed_tokens"])
def test_our_tied_adapter_on_a_plain_model_loads_into_peft_with_our_logits(tmp_path, saved):
    # We tie by Parameter identity, also where PEFT finds no tie; the file holds both keys (equal),
    # and PEFT runs each module with its key's values: our logits.
    ours = hand_tied()
    _inject_trained_copy(ours, "proj", saved, True)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight  # the copies share
    want = _run(ours)
    lora.save_adapter(ours, tmp_path)
    with safe_open(str(tmp_path / WEIGHTS_NAME), "pt") as f:
        head, embed = (
            f.get_tensor(f"base_model.model.{m}.weight") for m in ("lm_head", "model.embed_tokens")
        )
    assert torch.equal(head, embed)
    theirs = peft.PeftModel.from_pretrained(hand_tied(), tmp_path).eval()
    assert max_diff(_run(theirs), want) <= ATOL
    with warnings.catch_warnings():
        warnings.simplefilter("error", lora.adapters.PeftCompatibilityWarning)
        fresh = lora.load_adapter(hand_tied(), tmp_path)  # tied again: the file holds both keys
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
    assert max_diff(_run(fresh), want) <= ATOL


@pytest.mark.filterwarnings("ignore:You have requested `ensure_weight_tying`:UserWarning")
def test_an_untied_peft_file_added_next_to_a_tied_adapter_and_combined(tmp_path):
    # Several adapters: a PEFT file that did not tie, added under a name next to our tied adapter,
    # runs PEFT's logits, leaves the tied adapter as it was, and combines.
    want, _ = _peft_file_of_hand_tied(tmp_path / "peft", "lm_head")
    model = hand_tied()
    lora.inject(
        model,
        lora.LoRAConfig(
            r=2, target_modules=["proj"], modules_to_save=["lm_head"], ensure_weight_tying=True
        ),
    )
    with torch.no_grad():
        model.lm_head.weight.add_(0.25)
    tied_logits = _run(model)
    with pytest.warns(lora.adapters.PeftCompatibilityWarning, match="no weight for"):
        lora.load_adapter(model, tmp_path / "peft", adapter_name="peft")
    assert torch.equal(_run(model), tied_logits)
    lora.set_adapter(model, "peft")
    assert max_diff(_run(model), want) <= ATOL
    assert model.model.embed_tokens.get_adapter("peft") is None  # no copy: the original runs
    lora.add_weighted_adapter(model, ["peft"], [1.0], "again")
    lora.set_adapter(model, "again")
    assert max_diff(_run(model), want) <= ATOL
    assert model.lora_configs["again"].ensure_weight_tying is False
    lora.save_adapter(model, tmp_path / "again")
    fresh = lora.load_adapter(hand_tied(), tmp_path / "again")
    assert max_diff(_run(fresh), want) <= ATOL


# --- add_weighted_adapter against PEFT's ---------------------------------------------------------
@pytest.mark.parametrize("use_rslora", [False, True])
def test_combining_peft_adapters_matches_peft_and_the_combination_loads_in_peft(
    tmp_path, use_rslora
):
    hf, _, base = pair()
    common = dict(
        use_rslora=use_rslora,
        init_lora_weights=False,
        target_modules=["qkv_proj", "o_proj"],
        task_type="CAUSAL_LM",
    )
    peft_model = peft.get_peft_model(
        hf, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, **common)
    )
    peft_model.add_adapter("b", peft.LoraConfig(r=2, lora_alpha=2, lora_dropout=0.2, **common))
    peft_model.save_pretrained(tmp_path / "peft")  # "default" there, "b" in peft/b
    peft_model.add_weighted_adapter(["default", "b"], [0.7, -0.4], "mix", combination_type="cat")
    peft_model.set_adapter("mix")
    peft_model.eval()
    theirs = peft_model.peft_config["mix"]

    ours = ours_with(base)
    lora.load_adapter(ours, tmp_path / "peft", adapter_name="default")
    lora.load_adapter(ours, tmp_path / "peft" / "b", adapter_name="b")
    lora.add_weighted_adapter(ours, ["default", "b"], [0.7, -0.4], "mix")
    lora.set_adapter(ours, "mix")
    config = ours.lora_configs["mix"]
    assert (config.lora_dropout, config.bias, config.task_type) == (0.1, "none", "CAUSAL_LM")
    assert (config.lora_dropout, config.bias) == (theirs.lora_dropout, theirs.bias)
    assert config.use_rslora is False  # the scaling (1) is in B
    with torch.no_grad():
        want = ours(IDS).logits
        # PEFT 0.21.2 keeps use_rslora: its combination is sqrt(r) too large (peft#3449)
        if not use_rslora:
            assert max_diff(peft_model(input_ids=IDS).logits, want) <= ATOL
    lora.save_adapter(ours, tmp_path / "mix")
    hf_again = transformers.Phi3ForCausalLM(transformers.Phi3Config(**PHI3)).eval()
    hf_again.load_state_dict(base)
    loaded = peft.PeftModel.from_pretrained(hf_again, tmp_path / "mix").eval()
    assert isinstance(loaded, peft.PeftModelForCausalLM)  # the task type came along
    with torch.no_grad():
        assert max_diff(loaded(input_ids=IDS).logits, want) <= ATOL


def test_a_combination_keeping_trained_biases_loads_in_peft_with_them(tmp_path):
    def trained_biases():
        model = toy()
        with torch.no_grad():
            for module in (model.q_proj, model.conv, model.head):
                module.bias.add_(0.5)
        return model

    configs = {
        "a": lora.LoRAConfig(r=2, lora_alpha=4, target_modules=["q_proj", "conv"], bias="all"),
        "b": lora.LoRAConfig(r=3, lora_alpha=3, target_modules=["q_proj", "embed"]),
    }
    for seed, (name, config) in enumerate(configs.items()):
        source = lora.inject(trained_biases(), config)
        g = torch.Generator().manual_seed(seed)
        for _, layer in lora.layers.lora_layers(source):
            randomize_lora(layer, generator=g, scale=0.3)
        lora.save_adapter(source, tmp_path / name)
    model = trained_biases()
    for name in configs:
        lora.load_adapter(model, tmp_path / name, adapter_name=name)
    lora.add_weighted_adapter(model, ["a", "b"], [1.0, 0.5], "mix")  # bias trained by "a" at 1
    assert model.lora_configs["mix"].bias == "all"
    lora.set_adapter(model, "mix")
    with torch.no_grad():
        want = model(IDS % 20)
    lora.save_adapter(model, tmp_path / "mix")
    theirs = peft.PeftModel.from_pretrained(toy(), tmp_path / "mix").eval()  # untrained biases
    assert theirs.peft_config["default"].bias == "all"
    with torch.no_grad():
        assert max_diff(theirs(IDS % 20), want) <= ATOL


# --- bias="all" / "lora_only" with modules_to_save (a head with a bias) --------------------------
def _saved_head_config(bias: str) -> dict:
    return dict(r=2, lora_alpha=4, target_modules=["q_proj"], modules_to_save=["head"], bias=bias)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_peft_bias_with_a_saved_head_loads_into_ours_with_equal_logits(tmp_path, bias):
    original = toy().head.bias.detach().clone()
    trained = peft.get_peft_model(
        toy(), peft.LoraConfig(init_lora_weights=False, **_saved_head_config(bias))
    )
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:  # the copy, LoRA, and the biases bias= trains
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    trained.eval()
    with torch.no_grad():
        want = trained(IDS % 20)
    trained.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / WEIGHTS_NAME), "pt") as f:
        written = set(f.keys())
    # PEFT writes the copy's bias twice under "all" (and the original's, untrained, once more).
    extra = {
        "base_model.model.head.modules_to_save.bias",
        "base_model.model.head.original_module.bias",
    }
    assert (extra <= written) == (bias == "all")
    mine = lora.load_adapter(toy(), tmp_path)
    with torch.no_grad():
        assert max_diff(mine(IDS % 20), want) <= ATOL
    torch.testing.assert_close(mine.head.original_module.bias, original, rtol=0, atol=0)
    assert mine.head.bias.requires_grad and not mine.head.original_module.bias.requires_grad


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_our_bias_with_a_saved_head_loads_in_peft_with_equal_logits(tmp_path, bias):
    ours = lora.inject(toy(), lora.LoRAConfig(**_saved_head_config(bias)))
    g = torch.Generator().manual_seed(6)
    for _, layer in lora.layers.lora_layers(ours):
        randomize_lora(layer, generator=g, scale=0.3)
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if p.requires_grad and "lora_" not in n:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
        want = ours(IDS % 20)
    lora.save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(toy(), tmp_path).eval()
    with torch.no_grad():
        assert max_diff(theirs(IDS % 20), want) <= ATOL
        torch.testing.assert_close(
            theirs.base_model.model.head.original_module.bias, toy().head.bias, rtol=0, atol=0
        )


def test_peft_duplicate_head_bias_keys_must_agree(tmp_path):
    trained = peft.get_peft_model(toy(), peft.LoraConfig(**_saved_head_config("all")))
    trained.save_pretrained(tmp_path)
    file = tmp_path / WEIGHTS_NAME
    with safe_open(str(file), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["base_model.model.head.modules_to_save.bias"] += 1
    save_file(tensors, str(file))
    with pytest.raises(
        lora.AdapterError,
        match=r"head\.(modules_to_save\.)?bias: the same tensor \(one tensor\), but the file",
    ):
        lora.load_adapter(toy(), tmp_path)


# --- LoRA targets inside a modules_to_save module: PEFT leaves them out, so do we ---------------
OVERLAP = dict(target_modules=["o_proj", "qkv_proj"], modules_to_save=["layers.0"])


def _perturb_copies(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".modules_to_save." in n:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def test_peft_adapter_with_targets_inside_a_saved_layer_loads_into_ours(tmp_path):
    hf, ours, base = pair()
    with torch.no_grad():
        want_base = hf(input_ids=IDS).logits
    peft_model = peft.get_peft_model(
        hf, peft.LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, **OVERLAP)
    )
    _perturb_copies(peft_model, 3)
    with torch.no_grad():
        want = peft_model(input_ids=IDS).logits
    assert max_diff(want, want_base) > 0.1
    peft_model.save_pretrained(tmp_path)
    lora.load_adapter(ours, tmp_path)  # refused before: "missing ...layers.0...lora_A.weight"
    assert isinstance(ours.model.layers[0], lora.layers.saved.ModulesToSaveWrapper)
    with torch.no_grad():
        assert max_diff(ours(IDS).logits, want) <= ATOL


def test_our_adapter_with_targets_inside_a_saved_layer_loads_in_peft(tmp_path):
    hf, ours, _ = pair()
    with pytest.warns(lora.SavedTargetWarning, match=r"'model\.layers\.0' \(holds"):
        lora.inject(ours, lora.LoRAConfig(r=2, lora_alpha=4, **OVERLAP))
    g = torch.Generator().manual_seed(4)
    for _, layer in lora.layers.lora_layers(ours):
        randomize_lora(layer, generator=g, scale=0.1)
    _perturb_copies(ours, 5)
    with torch.no_grad():
        want = ours(IDS).logits
    lora.save_adapter(ours, tmp_path)
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path).eval()
    with torch.no_grad():
        assert max_diff(peft_model(input_ids=IDS).logits, want) <= ATOL
