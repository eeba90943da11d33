"""lora.load_adapter on one lora_state_dict file of a model holding several adapters: the keys
name the adapters (``<m>.lora_A.<name>``, ``<m>.modules_to_save.<name>.*``) and each tensor goes
to its adapter's slot, active or stored, as ``load_state_dict`` puts it; strictly, per adapter."""

from __future__ import annotations

import pytest
import torch
from reference import assert_state_unchanged, state_snapshot
from safetensors.torch import save_file
from tiny import Toy

import lora

IDS = torch.tensor([[3, 5, 7, 11, 13, 17], [2, 4, 6, 8, 10, 12]])
# a and b share q_proj and the lm_head copy; v_proj holds a only, conv b only (loralib's keys there)
CONFIGS = {
    "a": lora.LoRAConfig(r=2, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
    "b": lora.LoRAConfig(r=3, target_modules=["q_proj", "conv"], modules_to_save=["lm_head"]),
}


def toy() -> Toy:
    torch.manual_seed(0)
    return Toy().eval()


@pytest.fixture
def blanks(tmp_path):
    """Untrained adapter directories of each structure (to build models holding both)."""
    for name, config in CONFIGS.items():
        lora.save_adapter(lora.inject(toy(), config), tmp_path / f"blank_{name}")
    return tmp_path


def two(blanks, names=("a", "b"), seed=None, active=None):
    """A Toy holding two adapters of the structures a and b under ``names``; with ``seed`` every
    LoRA tensor and copy is random (so the adapters differ), else as loaded (B = 0)."""
    model = toy()
    for name, kind in zip(names, CONFIGS):
        lora.load_adapter(model, blanks / f"blank_{kind}", adapter_name=name)
    if seed is not None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, layer in lora.layers.lora_layers(model):
                for adapter in layer.held_adapters().values():
                    for p in (adapter.lora_A, adapter.lora_B):
                        p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            for copy in model.lm_head.modules_to_save.values():
                for p in copy.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.1)
    lora.set_adapter(model, active or names[0])
    return model


def outputs(model, names=("a", "b")) -> dict[str, torch.Tensor]:
    out = {}
    was = lora.active_adapter(model)
    for name in names:
        lora.set_adapter(model, name)
        with torch.no_grad():
            out[name] = model(IDS)
    lora.set_adapter(model, was)
    return out


def write(saved: dict[str, torch.Tensor], path):
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in saved.items()}, str(path))
    else:
        torch.save(saved, path)
    return path


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("saved_with,loaded_with", [("a", "a"), ("a", "b"), ("b", "a")])
def test_a_two_adapter_file_restores_both_whichever_is_active(
    blanks, tmp_path, suffix, saved_with, loaded_with
):
    src = two(blanks, seed=1, active=saved_with)
    want = outputs(src)
    assert not torch.allclose(want["a"], want["b"])
    saved = lora.lora_state_dict(src)
    named = {
        "blocks.0.q_proj.lora_A.a",
        "blocks.0.q_proj.lora_B.b",
        "lm_head.modules_to_save.b.weight",
    }
    assert named <= saved.keys()
    assert {"blocks.0.v_proj.lora_A", "conv.lora_B"} <= saved.keys()  # one adapter there: loralib's
    path = write(saved, tmp_path / f"two{suffix}")

    fresh = two(blanks, active=loaded_with)
    before = outputs(fresh)
    assert not torch.allclose(before["a"], want["a"]) and not torch.allclose(before["b"], want["b"])
    assert lora.load_adapter(fresh, path) is fresh
    assert lora.active_adapter(fresh) == loaded_with  # loading switches nothing
    got = outputs(fresh)
    for name in ("a", "b"):
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)
    assert sorted(lora.lora_state_dict(fresh)) == sorted(saved)


@pytest.mark.parametrize(
    "dropped",
    [
        "blocks.1.q_proj.lora_B.b",  # a layer holding a and b
        "conv.lora_A",  # the only adapter of its layer (b, stored while a is active)
        "lm_head.modules_to_save.b.bias",  # b's copy
    ],
)
def test_a_file_missing_one_tensor_of_b_is_refused_naming_it(blanks, tmp_path, dropped):
    saved = lora.lora_state_dict(two(blanks, seed=1))
    assert dropped in saved
    path = write({k: v for k, v in saved.items() if k != dropped}, tmp_path / "short.pt")
    target = two(blanks)
    before = state_snapshot(target)
    with pytest.raises(lora.AdapterError) as e:
        lora.load_adapter(target, path)
    msg = str(e.value)
    assert f"missing {dropped}" in msg and "1 problem(s); nothing was loaded" in msg
    if "modules_to_save" in dropped:
        assert "lacks part of the modules_to_save copies of adapter 'b': ['lm_head']" in msg
    assert_state_unchanged(target, before)


@pytest.mark.parametrize(
    "extra,says",
    [
        (
            "blocks.0.q_proj.lora_A.c",
            "names adapter 'c', which Toy does not have (it has ['a', 'b'])",
        ),
        ("lm_head.modules_to_save.c.weight", "names adapter 'c', which Toy does not have"),
        (
            "blocks.0.v_proj.lora_A.b",
            "the state dict names adapter 'b', which the layer 'blocks.0.v_proj' does not hold",
        ),
        ("blocks.0.v_proj.lora_A.a", "both are adapter 'a''s lora_A of 'blocks.0.v_proj'"),
        (
            "blocks.0.q_proj.lora_A",
            "a key without an adapter name, but the layer 'blocks.0.q_proj'",
        ),
    ],
)
def test_a_key_without_a_certain_place_is_refused_naming_the_adapter(blanks, tmp_path, extra, says):
    saved = lora.lora_state_dict(two(blanks, seed=1))
    like = saved[
        "lm_head.modules_to_save.a.weight" if "lm_head" in extra else "blocks.0.q_proj.lora_A.a"
    ]
    path = write({**saved, extra: like.clone()}, tmp_path / "extra.pt")
    target = two(blanks)
    before = state_snapshot(target)
    with pytest.raises(lora.AdapterError) as e:
        lora.load_adapter(target, path)
    assert f"{extra}: {says}" in str(e.value)
    assert_state_unchanged(target, before)


def test_a_file_of_one_adapters_keys_fills_that_adapter_only(blanks, tmp_path):
    src = two(blanks, seed=1)
    saved = lora.lora_state_dict(src)
    of_b = {
        k: v for k, v in saved.items() if k.endswith(".b") or ".b." in k or k.startswith("conv.")
    }
    path = write(of_b, tmp_path / "b.pt")
    target = two(blanks, seed=2)
    want_a = outputs(target)["a"]
    lora.load_adapter(target, path)
    got = outputs(target)
    torch.testing.assert_close(got["a"], want_a, rtol=0, atol=0)
    torch.testing.assert_close(got["b"], outputs(src)["b"], rtol=0, atol=0)


def test_a_one_adapter_file_still_loads_into_the_active_adapter(blanks, tmp_path):
    """loralib's keys only (a model of one adapter): into the active adapter, as before."""
    one = two(blanks, names=("default", "b"), seed=1)
    lora.delete_adapter(one, "b")
    saved = lora.lora_state_dict(one)
    assert not any(k.endswith(".default") for k in saved)
    path = write(saved, tmp_path / "one.pt")
    target = two(blanks, names=("default", "b"), seed=2)  # q_proj holds both: its keys get named
    want_b = outputs(target, ("default", "b"))["b"]
    lora.load_adapter(target, path)
    got = outputs(target, ("default", "b"))
    torch.testing.assert_close(
        got["default"], outputs(one, ("default",))["default"], rtol=0, atol=0
    )
    torch.testing.assert_close(got["b"], want_b, rtol=0, atol=0)


def test_a_merged_model_is_loaded_unmerged_and_merged_again(blanks, tmp_path):
    src = two(blanks, seed=1)
    want = outputs(src)
    path = write(lora.lora_state_dict(src), tmp_path / "two.pt")
    fresh = two(blanks)
    lora.merge(fresh)  # a's layers hold W + ΔW_a (B = 0 now)
    merged = [layer for _, layer in lora.layers.lora_layers(fresh) if layer.merged]
    assert merged
    lora.load_adapter(fresh, path)
    assert all(layer.merged for layer in merged)
    with torch.no_grad():
        torch.testing.assert_close(fresh(IDS), want["a"])  # merged with the loaded A and B
    lora.unmerge(fresh)
    got = outputs(fresh)
    for name in ("a", "b"):
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)
