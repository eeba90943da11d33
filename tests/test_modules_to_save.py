"""modules_to_save as PEFT does it (issue 8): the original module stays untouched, each adapter
trains its own copy; ``ensure_weight_tying`` says whether a tied partner shares the copy."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from tiny import MODULES_TO_SAVE_IDS as IDS
from tiny import MODULES_TO_SAVE_PHI3 as PHI3
from torch import nn

import lora
from lora.layers.saved import ModulesToSaveWrapper
from lora.models import Phi3Config, Phi3ForCausalLM

TIED = {**PHI3, "tie_word_embeddings": True}


def tied() -> Phi3ForCausalLM:
    torch.manual_seed(0)
    model = Phi3ForCausalLM(Phi3Config(**TIED)).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def train_step(model):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1.0)
    model(IDS, labels=IDS).loss.backward()
    opt.step()


@pytest.mark.parametrize("saved", ["lm_head", "embed_tokens"])
def test_untied_by_default_only_the_named_module_trains_and_the_original_stays(saved):
    model = tied()
    original = model.model.embed_tokens.weight.detach().clone()
    base = logits(model)
    lora.inject(model, lora.LoRAConfig(r=2, target_modules=["o_proj"], modules_to_save=[saved]))
    named = model.lm_head if saved == "lm_head" else model.model.embed_tokens
    other = model.model.embed_tokens if saved == "lm_head" else model.lm_head
    assert isinstance(named, ModulesToSaveWrapper) and not isinstance(other, ModulesToSaveWrapper)
    train_step(model)
    assert not torch.equal(named.weight, original)  # the copy trained
    torch.testing.assert_close(named.original_module.weight, original, rtol=0, atol=0)
    torch.testing.assert_close(other.weight, original, rtol=0, atol=0)  # the partner did not change
    with lora.disabled(model):
        torch.testing.assert_close(logits(model), base, rtol=0, atol=0)


@pytest.mark.parametrize("saved", ["lm_head", "embed_tokens"])
def test_ensure_weight_tying_makes_the_partner_share_the_copy(saved):
    model = tied()
    original = model.model.embed_tokens.weight.detach().clone()
    base = logits(model)
    lora.inject(
        model,
        lora.LoRAConfig(
            r=2, target_modules=["o_proj"], modules_to_save=[saved], ensure_weight_tying=True
        ),
    )
    head, embed = model.lm_head, model.model.embed_tokens
    assert isinstance(head, ModulesToSaveWrapper) and isinstance(embed, ModulesToSaveWrapper)
    assert head.weight is embed.weight and head.weight is not original
    train_step(model)
    assert not torch.equal(head.weight, original)
    torch.testing.assert_close(head.original_module.weight, original, rtol=0, atol=0)
    with lora.disabled(model):
        torch.testing.assert_close(logits(model), base, rtol=0, atol=0)
    merged = lora.merge_and_unload(model)
    assert (
        type(merged.lm_head) is nn.Linear
        and merged.lm_head.weight is merged.model.embed_tokens.weight
    )


def test_merge_and_unload_puts_the_active_copy_in_place(tmp_path):
    model = tied()
    lora.inject(model, lora.LoRAConfig(r=2, target_modules=["o_proj"], modules_to_save=["lm_head"]))
    train_step(model)
    want = logits(model)
    copy = model.lm_head.weight
    merged = lora.merge_and_unload(model)
    assert type(merged.lm_head) is nn.Linear and merged.lm_head.weight is copy
    assert merged.lm_head.weight is not merged.model.embed_tokens.weight  # untied, as in PEFT
    torch.testing.assert_close(logits(merged), want, rtol=1e-5, atol=1e-5)
    assert merged.config.tie_word_embeddings is False  # so save_pretrained keeps the trained head
    merged.save_pretrained(tmp_path)
    again = Phi3ForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(logits(again), want, rtol=1e-5, atol=1e-5)


def test_switching_adapters_switches_copies_and_mixed_batch_routes_them(tmp_path):
    model = tied()
    base = logits(model)
    cfg = lora.LoRAConfig(r=2, target_modules=["o_proj"], modules_to_save=["lm_head"])
    lora.inject(model, cfg)
    with torch.no_grad():
        model.lm_head.weight.add_(0.3)
    lora.save_adapter(model, tmp_path / "a")
    with torch.no_grad():
        model.lm_head.weight.sub_(0.6)
    lora.save_adapter(model, tmp_path / "b")
    fresh = tied()
    lora.load_adapter(fresh, tmp_path / "a", adapter_name="a")
    lora.load_adapter(fresh, tmp_path / "b", adapter_name="b")
    assert fresh.lm_head.adapter_names == ["a", "b"] and fresh.lm_head.active_adapter == "a"
    want = {"a": logits(fresh)}
    lora.set_adapter(fresh, "b")
    want["b"] = logits(fresh)
    assert (want["a"] - want["b"]).abs().max() > 0.1
    lora.set_adapter(fresh, None)
    torch.testing.assert_close(logits(fresh), base, rtol=1e-6, atol=1e-6)
    with lora.mixed_batch(fresh, ["b", "a"]):
        got = logits(fresh)
    torch.testing.assert_close(got[0], want["b"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want["a"][1], rtol=1e-5, atol=1e-5)
    lora.delete_adapter(fresh, "a")
    assert fresh.lm_head.adapter_names == ["b"]
    lora.delete_adapter(fresh, "b")
    assert (
        type(fresh.lm_head) is nn.Linear and fresh.lm_head.weight is fresh.model.embed_tokens.weight
    )


def test_a_module_both_targeted_and_saved_is_refused():
    model = tied()
    # PEFT's rule leaves a saved module out of the targets: here nothing is left to adapt.
    with pytest.raises(lora.InjectionError, match=r"modules_to_save=\['lm_head'\] trains in full"):
        lora.inject(
            model, lora.LoRAConfig(r=2, target_modules=["lm_head"], modules_to_save=["lm_head"])
        )


def test_a_container_without_forward_is_refused_naming_its_modules():
    # A wrapper in place of model.layers (a ModuleList) once injected fine and then failed in the
    # first forward ("'ModulesToSaveWrapper' object is not iterable"): refused before any change.
    model = Phi3ForCausalLM(Phi3Config(**{**PHI3, "num_hidden_layers": 2}))
    cfg = lora.LoRAConfig(r=2, target_modules=["lm_head"], modules_to_save=["layers"])
    with pytest.raises(
        lora.InjectionError,
        match=r"modules_to_save entry 'layers' names 'model.layers', a ModuleList: .*"
        r"name the modules in it instead: modules_to_save=\['layers.0', 'layers.1'\]",
    ):
        lora.inject(model, cfg)
    assert type(model.model.layers) is nn.ModuleList
    assert all(p.requires_grad for p in model.parameters())  # nothing injected, nothing frozen
    # a decoder layer of it (a module with a forward) is what to name instead
    lora.inject(
        model, lora.LoRAConfig(r=2, target_modules=["lm_head"], modules_to_save=["layers.1"])
    )
    assert isinstance(model.model.layers[1], ModulesToSaveWrapper)
    model(IDS).logits.sum().backward()
    assert model.model.layers[1].modules_to_save["default"].mlp.down_proj.weight.grad is not None


def test_ensure_weight_tying_reads_and_writes_peft_key():
    cfg = lora.LoRAConfig(
        target_modules=["o_proj"], modules_to_save=["lm_head"], ensure_weight_tying=True
    )
    assert cfg.to_peft_dict()["ensure_weight_tying"] is True
    assert lora.LoRAConfig.from_peft_dict(cfg.to_peft_dict()).ensure_weight_tying is True
    with pytest.raises(TypeError, match="ensure_weight_tying='yes'"):
        lora.LoRAConfig(ensure_weight_tying="yes")


def test_a_second_all_linear_adapter_leaves_the_wrapped_head_alone(tmp_path):
    model = tied()
    lora.inject(model, lora.LoRAConfig(r=2, target_modules=["o_proj"], modules_to_save=["lm_head"]))
    other = lora.inject(tied(), lora.LoRAConfig(r=2, target_modules="all-linear"))
    lora.save_adapter(other, tmp_path / "all")
    lora.load_adapter(model, tmp_path / "all", adapter_name="all")
    assert isinstance(model.lm_head, ModulesToSaveWrapper)
    assert not isinstance(model.lm_head.original_module, lora.LoRALayer)
    assert not isinstance(model.lm_head.modules_to_save["default"], lora.LoRALayer)


def test_ensure_weight_tying_without_a_tie_warns():
    torch.manual_seed(0)
    model = Phi3ForCausalLM(Phi3Config(**dict(TIED, tie_word_embeddings=False))).eval()
    with pytest.warns(UserWarning, match="ensure_weight_tying=True, but no module"):
        cfg = lora.LoRAConfig(
            r=2, target_modules=["o_proj"], modules_to_save=["lm_head"], ensure_weight_tying=True
        )
        lora.inject(model, cfg)


def test_two_tied_modules_both_named_train_apart_and_load_so(tmp_path):
    # Each named module gets its own copy, so the file's two keys differ and land in two copies
    # (the loader once took the base model's tie for the copies' and refused the file).
    model = tied()
    cfg = lora.LoRAConfig(
        r=2, target_modules=["o_proj"], modules_to_save=["lm_head", "embed_tokens"]
    )
    lora.inject(model, cfg)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    with torch.no_grad():
        model.lm_head.weight.add_(0.3)
    want = logits(model)
    lora.save_adapter(model, tmp_path / "a")
    fresh = lora.load_adapter(tied(), tmp_path / "a")
    assert fresh.lm_head.weight is not fresh.model.embed_tokens.weight
    torch.testing.assert_close(logits(fresh), want, rtol=1e-6, atol=1e-6)


def _tied_adapter_file(path, edit):
    """Our tied adapter (ensure_weight_tying, lm_head named) of the tied model, its copy trained
    a little, saved to ``path`` with ``edit(tensors)`` applied to the file's tensors."""
    from safetensors.torch import load_file, save_file

    model = tied()
    cfg = lora.LoRAConfig(
        r=2, target_modules=["o_proj"], modules_to_save=["lm_head"], ensure_weight_tying=True
    )
    lora.inject(model, cfg)
    with torch.no_grad():
        model.lm_head.weight.add_(0.3)
    lora.save_adapter(model, path)
    file = path / "adapter_model.safetensors"
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file))
    return model


HEAD, EMBED = "base_model.model.lm_head.weight", "base_model.model.model.embed_tokens.weight"


def test_a_tied_pair_with_two_different_tensors_in_the_file_loads_into_two_copies(tmp_path):
    # The file says ensure_weight_tying, but its two keys differ: not tied copies. Each module
    # gets its own copy with its key's values (as PEFT runs such a file on a model where it finds
    # no tie), with a warning; the load was refused before.
    def differ(tensors):
        tensors[EMBED] += 1

    _tied_adapter_file(tmp_path / "a", differ)
    with pytest.warns(lora.adapters.PeftCompatibilityWarning, match="different weights for"):
        model = lora.load_adapter(tied(), tmp_path / "a")
    head, embed = model.lm_head, model.model.embed_tokens
    assert head.weight is not embed.weight
    torch.testing.assert_close(embed.weight, head.weight + 1, rtol=0, atol=0)
    assert model.lora_config.ensure_weight_tying is False
    assert model.lora_config.modules_to_save == ["lm_head", "model.embed_tokens"]
    want = logits(model)
    lora.save_adapter(model, tmp_path / "b")  # says what it is: two copies, untied
    torch.testing.assert_close(logits(lora.load_adapter(tied(), tmp_path / "b")), want)


def test_a_tied_file_without_the_partner_key_loads_the_named_copy_alone(tmp_path):
    # What PEFT writes where it finds no tie (a plain torch model): ensure_weight_tying, and only
    # the named module's copy. Loaded untied: the partner runs the original weight.
    source = _tied_adapter_file(tmp_path / "a", lambda tensors: tensors.pop(EMBED))
    base = logits(tied())
    with pytest.warns(lora.adapters.PeftCompatibilityWarning, match="no weight for 'model.embed"):
        model = lora.load_adapter(tied(), tmp_path / "a")
    assert not isinstance(model.model.embed_tokens, ModulesToSaveWrapper)
    assert model.model.embed_tokens.weight is model.lm_head.original_module.weight
    torch.testing.assert_close(model.lm_head.weight, source.lm_head.weight, rtol=0, atol=0)
    assert model.lora_config.ensure_weight_tying is False
    with lora.disabled(model):
        torch.testing.assert_close(logits(model), base, rtol=0, atol=0)


def test_two_tied_pairs_one_left_untied_by_the_file_load_with_equal_logits(tmp_path):
    # ensure_weight_tying is one flag: where the file leaves one pair untied, the other pair's
    # partner (its key there, equal) gets a copy of its own with those values.
    def two_pairs() -> nn.Module:
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Embedding(8, 4), nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 8)
        )
        model[4].weight = model[0].weight  # (8, 4) both
        model[2].weight = model[1].weight
        return model

    ids = torch.tensor([[1, 2, 3]])
    source = two_pairs()
    cfg = lora.LoRAConfig(
        r=2, target_modules=["3"], modules_to_save=["4", "2"], ensure_weight_tying=True
    )
    lora.inject(source, cfg)
    with torch.no_grad():
        source[4].weight.add_(0.5)
        source[2].weight.add_(0.25)
    lora.save_adapter(source, tmp_path)
    from safetensors.torch import load_file, save_file

    file = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(file))
    del tensors["base_model.model.0.weight"]  # the head's partner: as PEFT writes it, untied
    save_file(tensors, str(file))
    with pytest.warns(lora.adapters.PeftCompatibilityWarning, match="no weight for '0'"):
        model = lora.load_adapter(two_pairs(), tmp_path)
    assert model.lora_config.modules_to_save == ["4", "2", "1"]
    assert not isinstance(model[0], ModulesToSaveWrapper)
    torch.testing.assert_close(model[1].weight, source[1].weight, rtol=0, atol=0)
    with torch.no_grad():
        model[0].weight.copy_(source[0].weight)  # the file's meaning: the base embedding there
        torch.testing.assert_close(model(ids), source(ids), rtol=0, atol=0)


@pytest.mark.parametrize("adapter_tied", [True, False])
@pytest.mark.parametrize("file", ["tied", "untied", "partner key dropped", "partner key changed"])
def test_loading_in_place_keeps_or_refuses_the_adapters_tie(tmp_path, adapter_tied, file):
    # In place the adapter's copies are made already: a file whose copies are tied otherwise is
    # refused, naming the partner (a load into shared copies wrote one key into both; a tied file
    # into untied copies left the partner's new copy idle: logits ~15 off the file's model).
    source = tied()
    cfg = lora.LoRAConfig(
        r=2,
        target_modules=["o_proj"],
        modules_to_save=["lm_head"],
        ensure_weight_tying=file != "untied",
    )
    lora.inject(source, cfg)
    with torch.no_grad():
        source.lm_head.weight.add_(0.3)
    lora.save_adapter(source, tmp_path / "a")
    if file.startswith("partner key"):
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
        if file.endswith("dropped"):
            del tensors[EMBED]
        else:
            tensors[EMBED] += 1  # two copies: the adapter has one only, or tied
        save_file(tensors, str(tmp_path / "a" / "adapter_model.safetensors"))
    model = tied()
    lora.inject(model, dataclasses.replace(cfg, ensure_weight_tying=adapter_tied))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lora.adapters.PeftCompatibilityWarning)
        if adapter_tied == (file == "tied") and file != "partner key changed":
            lora.load_adapter(model, tmp_path / "a")
            want = logits(lora.load_adapter(tied(), tmp_path / "a"))  # what the file means
            torch.testing.assert_close(logits(model), want, rtol=0, atol=0)
            return
        with pytest.raises(
            lora.AdapterError, match=r"module model\.embed_tokens: .*adapter 'default' of the model"
        ):
            lora.load_adapter(model, tmp_path / "a")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("saved", ["lm_head", "embed_tokens"])
def test_tie_weights_after_inject_ties_the_originals_and_leaves_the_copy(saved):
    model = tied()
    lora.inject(model, lora.LoRAConfig(r=2, target_modules=["o_proj"], modules_to_save=[saved]))
    train_step(model)
    named = model.lm_head if saved == "lm_head" else model.model.embed_tokens
    copy = named.modules_to_save["default"].weight
    trained = copy.detach().clone()
    keys = set(model.state_dict())
    model.tie_weights()  # raised KeyError ("attribute 'weight' already exists") on the wrapper
    assert set(model.state_dict()) == keys  # no stray parameter on the wrapper
    head = getattr(model.lm_head, "original_module", model.lm_head)
    embed = getattr(model.model.embed_tokens, "original_module", model.model.embed_tokens)
    assert head.weight is embed.weight
    assert named.modules_to_save["default"].weight is copy
    torch.testing.assert_close(copy, trained, rtol=0, atol=0)


@pytest.mark.parametrize(
    "entry, wrapped",
    [
        (
            "norm",
            [
                "model.layers.0.input_layernorm",
                "model.layers.0.post_attention_layernorm",
                "model.norm",
            ],
        ),
        ("head", ["lm_head"]),
        ("model.norm", ["model.norm"]),
    ],
)
def test_an_entry_names_every_module_whose_name_ends_with_it_as_peft_does(entry, wrapped):
    # PEFT's _set_trainable: key.endswith(entry), at a dot or not (target_modules match at a dot
    # only). "norm" trains every RMSNorm of Phi-3, as a PEFT run of the same peft_config would.
    model = Phi3ForCausalLM(Phi3Config(**PHI3))
    lora.inject(model, lora.LoRAConfig(r=2, target_modules=["o_proj"], modules_to_save=[entry]))
    got = [n for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)]
    assert got == wrapped
