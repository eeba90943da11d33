"""lora_state_dict with modules_to_save wrappers: it holds every adapter's trained copy (never the
frozen original), so loralib's ``torch.save(lora_state_dict)`` / ``load_state_dict(strict=False)``
recipe and ``lora.load_adapter(file)`` restore the copy; the loader refuses a file without it."""

from __future__ import annotations

import pytest
import torch
from reference import assert_state_unchanged, randomize_lora, state_snapshot
from safetensors.torch import save_file
from tiny import TINY_PHI3, Toy
from torch import nn

import lora
from lora.models import Phi3Config, Phi3ForCausalLM

IDS = torch.tensor([[3, 5, 7, 11, 13, 17], [2, 4, 6, 8, 10, 12]])
CFG = lora.LoRAConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
COPY = "lm_head.modules_to_save.default."


def toy() -> Toy:
    torch.manual_seed(0)
    return Toy().eval()


def run(model):
    with torch.no_grad():
        out = model(IDS)
    return getattr(out, "logits", out)


def train_step(model, loss_fn, seed: int = 0):
    """Random A and B, then one SGD step: the copies (and whatever else trains) move."""
    g = torch.Generator().manual_seed(seed)
    for _, layer in lora.layers.lora_layers(model):
        randomize_lora(layer, generator=g)
    model.train()
    loss_fn(model).backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0).step()
    model.zero_grad(set_to_none=True)
    return model.eval()


def toy_loss(model):
    return nn.functional.cross_entropy(model(IDS).flatten(0, 1), IDS.flatten())


def trained(config=CFG, seed: int = 0) -> Toy:
    return train_step(lora.inject(toy(), config), toy_loss, seed)


def old_filter(model, bias: str = "none") -> dict[str, torch.Tensor]:
    """lora_state_dict before modules_to_save copies were included (loralib's filter)."""
    state = model.state_dict()
    if bias == "none":
        return {k: v for k, v in state.items() if "lora_" in k}
    if bias == "all":
        return {k: v for k, v in state.items() if "lora_" in k or "bias" in k}
    keep = {k for k in state if "lora_" in k}
    for name, m in lora.layers.lora_layers(model):
        if m.has_adapter and getattr(m, "bias", None) is not None:
            keep.add(f"{name}.bias" if name else "bias")
    return {k: v for k, v in state.items() if k in keep}


# --- (a) loralib's recipe ---------------------------------------------------------------------------
def test_torch_save_and_load_state_dict_strict_false_restore_the_trained_copy(tmp_path):
    model = trained()
    head = model.lm_head
    assert not torch.equal(head.weight, head.original_module.weight)  # the copy trained
    want = run(model)
    saved = lora.lora_state_dict(model)
    assert {COPY + "weight", COPY + "bias"} <= saved.keys()
    assert not any("original_module" in k for k in saved)
    torch.save(saved, tmp_path / "lora.pt")

    fresh = lora.inject(toy(), CFG)
    assert not torch.allclose(run(fresh), want)
    result = fresh.load_state_dict(
        torch.load(tmp_path / "lora.pt", weights_only=True), strict=False
    )
    assert result.unexpected_keys == []
    assert not [k for k in result.missing_keys if "lora_" in k or "modules_to_save" in k]
    torch.testing.assert_close(run(fresh), want, rtol=0, atol=0)
    # What the old filter lost: the same recipe without the copy runs an untrained head.
    old = lora.inject(toy(), CFG)
    old.load_state_dict(old_filter(model), strict=False)
    assert not torch.allclose(run(old), want)


def tied_phi3():
    torch.manual_seed(0)
    model = Phi3ForCausalLM(Phi3Config(**TINY_PHI3, tie_word_embeddings=True)).eval()
    config = lora.LoRAConfig(
        r=2, target_modules=["o_proj"], modules_to_save=["lm_head"], ensure_weight_tying=True
    )
    return lora.inject(model, config)


def phi3_loss(model):
    return model(IDS, labels=IDS).loss


HEAD = "lm_head.modules_to_save.default.weight"
EMBED = "model.embed_tokens.modules_to_save.default.weight"


def test_tied_copies_hold_both_names_and_round_trip_still_tied(tmp_path):
    model = train_step(tied_phi3(), phi3_loss)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not torch.equal(model.lm_head.weight, model.lm_head.original_module.weight)
    want = run(model)
    saved = lora.lora_state_dict(model)
    assert {HEAD, EMBED} <= saved.keys()  # state_dict names the one Parameter twice
    assert not any("original_module" in k for k in saved)
    torch.save(saved, tmp_path / "lora.pt")

    fresh = tied_phi3()
    assert not torch.allclose(run(fresh), want)
    fresh.load_state_dict(torch.load(tmp_path / "lora.pt", weights_only=True), strict=False)
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight  # still one Parameter
    torch.testing.assert_close(run(fresh), want, rtol=0, atol=0)

    # safetensors refuses shared tensors: a file holding one of the two names (what
    # safetensors.torch.save_model writes) loads through load_adapter, the alias counts.
    one = {k: v.contiguous() for k, v in saved.items() if k != EMBED}
    save_file(one, str(tmp_path / "lora.safetensors"))
    strict = tied_phi3()
    lora.load_adapter(strict, tmp_path / "lora.safetensors")
    assert strict.lm_head.weight is strict.model.embed_tokens.weight
    torch.testing.assert_close(run(strict), want, rtol=0, atol=0)

    # both names with different values cannot go into one Parameter: refused, nothing loaded
    both = {**saved, EMBED: saved[EMBED] + 1}
    torch.save(both, tmp_path / "differ.pt")
    target = tied_phi3()
    before = state_snapshot(target)
    with pytest.raises(lora.AdapterError) as e:
        lora.load_adapter(target, tmp_path / "differ.pt")
    assert EMBED in str(e.value) and "tied copies" in str(e.value)
    assert_state_unchanged(target, before)


# --- (b) through load_adapter --------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_load_adapter_of_a_lora_state_dict_file_restores_the_copy(tmp_path, suffix):
    model = trained()
    want = run(model)
    saved = lora.lora_state_dict(model)
    path = tmp_path / f"lora{suffix}"
    if suffix == ".pt":
        torch.save(saved, path)
    else:
        save_file({k: v.contiguous() for k, v in saved.items()}, str(path))
    fresh = lora.inject(toy(), CFG)
    original = fresh.lm_head.original_module.weight.detach().clone()
    lora.load_adapter(fresh, path)
    torch.testing.assert_close(fresh.lm_head.weight, model.lm_head.weight, rtol=0, atol=0)
    torch.testing.assert_close(run(fresh), want, rtol=0, atol=0)
    torch.testing.assert_close(fresh.lm_head.original_module.weight, original, rtol=0, atol=0)


def bn_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)).eval()


BN_CFG = lora.LoRAConfig(r=2, target_modules=["0"], modules_to_save=["1"])
X = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))


def run_on(model, x=X):
    with torch.no_grad():
        return model(x)


def bn_trained() -> nn.Sequential:
    return train_step(lora.inject(bn_net(), BN_CFG), lambda m: m(X).square().mean())


def test_a_copys_buffers_are_saved_and_restored():
    """A copy's buffers (BatchNorm's running statistics) are state too."""
    model = bn_trained()
    want = run_on(model)
    saved = lora.lora_state_dict(model)
    stats = "1.modules_to_save.default.running_mean"
    assert stats in saved and "1.modules_to_save.default.num_batches_tracked" in saved
    assert not torch.equal(saved[stats], torch.zeros(6))  # the training step moved it
    assert not any("original_module" in k for k in saved)

    fresh = lora.inject(bn_net(), BN_CFG)
    assert not torch.allclose(run_on(fresh), want)
    fresh.load_state_dict(saved, strict=False)
    torch.testing.assert_close(run_on(fresh), want, rtol=0, atol=0)


def test_load_adapter_requires_a_copys_buffers(tmp_path):
    model = bn_trained()
    saved = lora.lora_state_dict(model)
    torch.save(saved, tmp_path / "full.pt")
    fresh = lora.inject(bn_net(), BN_CFG)
    lora.load_adapter(fresh, tmp_path / "full.pt")
    torch.testing.assert_close(run_on(fresh), run_on(model), rtol=0, atol=0)
    stats = "1.modules_to_save.default.running_var"
    torch.save({k: v for k, v in saved.items() if k != stats}, tmp_path / "short.pt")
    with pytest.raises(lora.AdapterError) as e:
        lora.load_adapter(lora.inject(bn_net(), BN_CFG), tmp_path / "short.pt")
    assert f"missing {stats}" in str(e.value) and "lacks part of" in str(e.value)


# --- (c) bias="all" ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_no_original_module_key_and_the_copys_bias_for_every_bias_mode(tmp_path, bias):
    config = lora.LoRAConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"], bias=bias)
    model = trained(config)
    assert model.lm_head.original_module.bias is not None  # the wrapper holds a bias
    saved = lora.lora_state_dict(model, bias=bias)
    assert not any("original_module" in k for k in saved)
    assert COPY + "bias" in saved
    assert not torch.equal(saved[COPY + "bias"], model.lm_head.original_module.bias)
    if bias == "all":
        assert "lm_head.original_module.bias" in old_filter(model, "all")  # what it held before
        assert {"conv.bias", "blocks.0.q_proj.bias"} <= saved.keys()
    if bias == "lora_only":
        assert "blocks.0.q_proj.bias" in saved and "conv.bias" not in saved
    torch.save(saved, tmp_path / "lora.pt")
    fresh = lora.inject(toy(), config)
    lora.load_adapter(fresh, tmp_path / "lora.pt")
    torch.testing.assert_close(run(fresh), run(model), rtol=0, atol=0)


# --- (d) a file without the copy ------------------------------------------------------------------
def test_a_file_without_the_copy_is_refused_and_the_model_is_unchanged(tmp_path):
    model = trained()
    torch.save(old_filter(model), tmp_path / "old.pt")  # what lora_state_dict wrote before
    target = lora.inject(toy(), CFG)
    before = state_snapshot(target)
    with pytest.raises(lora.AdapterError) as e:
        lora.load_adapter(target, tmp_path / "old.pt")
    msg = str(e.value)
    assert f"missing {COPY}weight" in msg and f"missing {COPY}bias" in msg
    assert "holds no modules_to_save copies" in msg and "older lora_state_dict" in msg
    assert "load_state_dict" in msg and "strict=False" in msg and "['lm_head']" in msg
    assert_state_unchanged(target, before)
    # ... and what the message says works: strict=False loads it, leaving the copy as is
    target.load_state_dict(torch.load(tmp_path / "old.pt", weights_only=True), strict=False)
    assert torch.equal(target.blocks[0].q_proj.lora_A, model.blocks[0].q_proj.lora_A)
    torch.testing.assert_close(target.lm_head.weight, before[COPY + "weight"], rtol=0, atol=0)


def test_an_original_module_key_or_a_misshapen_copy_is_refused(tmp_path):
    model = trained()
    saved = lora.lora_state_dict(model, bias="all")
    bad = {
        **saved,
        "lm_head.original_module.bias": torch.zeros(20),  # old bias="all" files held it
        COPY + "weight": torch.zeros(20, 9),
    }
    torch.save(bad, tmp_path / "bad.pt")
    target = lora.inject(toy(), CFG)
    before = state_snapshot(target)
    with pytest.raises(lora.AdapterError) as e:
        lora.load_adapter(target, tmp_path / "bad.pt")
    msg = str(e.value)
    assert "lm_head.original_module.bias: no place for it (the frozen original" in msg
    assert f"{COPY}weight: shape (20, 9), expected (20, 8)" in msg
    assert_state_unchanged(target, before)


# --- (e) two adapters, each with a copy -------------------------------------------------------------
def test_two_adapters_copies_are_all_saved_and_restored(tmp_path):
    model = trained(seed=0)
    lora.save_adapter(train_step(lora.inject(toy(), CFG), toy_loss, seed=1), tmp_path / "b")
    lora.load_adapter(model, tmp_path / "b", adapter_name="b")
    want = {}
    for name in ("default", "b"):
        lora.set_adapter(model, name)
        want[name] = run(model)
    assert not torch.allclose(want["default"], want["b"])
    saved = lora.lora_state_dict(model)
    copies = {k for k in saved if "modules_to_save" in k}
    assert copies == {
        f"lm_head.modules_to_save.{a}.{p}" for a in ("default", "b") for p in ("weight", "bias")
    }
    assert not any("original_module" in k for k in saved)
    torch.save(saved, tmp_path / "lora.pt")

    lora.save_adapter(lora.inject(toy(), CFG), tmp_path / "blank")  # same structure, untrained
    fresh = lora.inject(toy(), CFG)
    lora.load_adapter(fresh, tmp_path / "blank", adapter_name="b")
    result = fresh.load_state_dict(
        torch.load(tmp_path / "lora.pt", weights_only=True), strict=False
    )
    assert result.unexpected_keys == []
    for name in ("b", "default"):  # whichever was active when saved
        lora.set_adapter(fresh, name)
        torch.testing.assert_close(run(fresh), want[name], rtol=0, atol=0)


# --- (f) models without wrappers: keys unchanged ----------------------------------------------------
@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_without_wrappers_the_keys_are_loralibs(bias):
    model = trained(lora.LoRAConfig(r=2, target_modules=["q_proj", "v_proj", "conv"], bias=bias))
    saved, old = lora.lora_state_dict(model, bias=bias), old_filter(model, bias)
    assert list(saved) == list(old)  # the same keys in the same order
    assert all(saved[k] is old[k] or torch.equal(saved[k], old[k]) for k in old)
    if bias == "all":
        assert "lm_head.bias" in saved  # a plain module's bias, as loralib's filter has it
