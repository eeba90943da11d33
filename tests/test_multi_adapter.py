"""Several adapters in one model: named loading, switching, disabled, delete, weighted combination, mixed batch."""

from __future__ import annotations

import pytest
import torch
from reference import effective_weight, randomize_lora
from safetensors import safe_open
from safetensors.torch import save_file
from tiny import ADAPTER_PHI3 as PHI3
from torch import nn

import lora
from lora.adapters import WEIGHTS_NAME
from lora.models import Phi3Config, Phi3ForCausalLM

IDS = torch.tensor([[3, 5, 7, 11, 13, 17], [2, 4, 6, 8, 10, 12], [9, 9, 8, 7, 1, 2]])


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.q_proj = nn.Linear(8, 8)
        self.v_proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 20)

    def forward(self, ids):
        h = self.embed(ids % 20)
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        return self.head(self.q_proj(h) * torch.sigmoid(self.v_proj(h)))


def toy() -> Toy:
    torch.manual_seed(0)
    return Toy().eval()


def phi3() -> Phi3ForCausalLM:
    torch.manual_seed(0)
    return Phi3ForCausalLM(Phi3Config(**PHI3)).eval()


def run(model):
    with torch.no_grad():
        out = model(IDS)
    return out.logits if hasattr(out, "logits") else out


def make_adapter(tmp_path, build, config, seed, name):
    """Save a trained adapter; return (directory, logits of a model running only it)."""
    model = lora.inject(build(), config)
    g = torch.Generator().manual_seed(seed)
    for _, layer in lora.layers.lora_layers(model):
        randomize_lora(layer, generator=g, scale=0.2)
    path = lora.save_adapter(model, tmp_path / name)
    return path, run(model)


A_CFG = lora.LoRAConfig(r=2, lora_alpha=4, target_modules=["q_proj", "embed", "conv"])
B_CFG = lora.LoRAConfig(r=3, lora_alpha=3, target_modules=["q_proj", "v_proj"])


@pytest.fixture
def two(tmp_path):
    """A Toy with adapter "a" (active, loaded fresh) and "b" (added), and each one's solo logits."""
    path_a, want_a = make_adapter(tmp_path, toy, A_CFG, 1, "a")
    path_b, want_b = make_adapter(tmp_path, toy, B_CFG, 2, "b")
    model = toy()
    base = run(model)
    lora.load_adapter(model, path_a, adapter_name="a")
    lora.load_adapter(model, path_b, adapter_name="b")
    return model, {"a": want_a, "b": want_b, None: base}


def test_load_under_names_and_switch(two):
    model, want = two
    assert lora.adapter_names(model) == ["a", "b"] and lora.active_adapter(model) == "a"
    assert (
        isinstance(model.v_proj, lora.Linear) and not model.v_proj.has_adapter
    )  # wrapped for "b" only
    torch.testing.assert_close(run(model), want["a"], rtol=0, atol=0)
    lora.set_adapter(model, "b")
    assert lora.active_adapter(model) == "b" and model.lora_config is model.lora_configs["b"]
    torch.testing.assert_close(run(model), want["b"], rtol=0, atol=0)
    lora.set_adapter(model, None)
    torch.testing.assert_close(
        run(model), want[None], rtol=1e-6, atol=1e-6
    )  # frozen weights: 1 ulp
    lora.set_adapter(model, "a")
    torch.testing.assert_close(run(model), want["a"], rtol=0, atol=0)
    with pytest.raises(
        ValueError, match=r"adapter 'c': Toy has no such adapter \(it has \['a', 'b'\]\)"
    ):
        lora.set_adapter(model, "c")


def test_disabled_runs_the_base_model_and_restores_even_merged_layers(two):
    model, want = two
    lora.merge(model)
    with lora.disabled(model):
        assert lora.active_adapter(model) is None
        torch.testing.assert_close(
            run(model), want[None], rtol=1e-6, atol=1e-6
        )  # frozen weights: 1 ulp
    assert lora.active_adapter(model) == "a" and model.q_proj.merged
    torch.testing.assert_close(run(model), want["a"], rtol=1e-6, atol=1e-6)
    with pytest.raises(RuntimeError, match="boom"), lora.disabled(model):
        raise RuntimeError("boom")
    assert lora.active_adapter(model) == "a"


def test_switching_keeps_parameter_objects_so_training_continues(two):
    model, _ = two
    a_params = {id(p) for n, p in model.named_parameters() if "lora_" in n and "inactive" not in n}
    lora.set_adapter(model, "b")
    lora.set_adapter(model, "a")
    assert {
        id(p) for n, p in model.named_parameters() if "lora_" in n and "inactive" not in n
    } == a_params
    assert {
        n for n, _ in model.named_parameters() if ".lora_inactive.b." in n
    }  # b's tensors, kept in the layers
    state = model.state_dict()  # keys name the adapter, whichever is active (issue 8)
    assert "q_proj.lora_A.a" in state and "q_proj.lora_A.b" in state
    assert "q_proj.lora_A" not in state


def test_delete_adapter_and_deleting_all_restores_plain_modules(two):
    model, want = two
    lora.delete_adapter(model, "b")
    assert lora.adapter_names(model) == ["a"] and type(model.v_proj) is nn.Linear
    torch.testing.assert_close(run(model), want["a"], rtol=0, atol=0)
    lora.delete_adapter(model, "a")
    assert lora.adapter_names(model) == [] and not any(True for _ in lora.layers.lora_layers(model))
    assert not hasattr(model, "lora_config")
    torch.testing.assert_close(
        run(model), want[None], rtol=1e-6, atol=1e-6
    )  # frozen weights: 1 ulp
    lora.inject(model, lora.LoRAConfig(target_modules=["q_proj"]))  # the model is plain again


def test_save_an_inactive_named_adapter_and_load_it_elsewhere(two, tmp_path):
    model, want = two
    lora.save_adapter(model, tmp_path / "b_again", adapter_name="b")
    fresh = toy()
    lora.load_adapter(fresh, tmp_path / "b_again")
    torch.testing.assert_close(run(fresh), want["b"], rtol=0, atol=0)
    lora.load_adapter(
        model, tmp_path / "b_again", adapter_name="b"
    )  # in place into the inactive adapter
    lora.set_adapter(model, "b")
    torch.testing.assert_close(run(model), want["b"], rtol=0, atol=0)


def test_named_adapters_each_train_their_own_modules_to_save_copy(tmp_path):
    cfg = lora.LoRAConfig(r=2, target_modules=["q_proj"], modules_to_save=["head"])
    model = toy()
    want_base = run(model)
    original = model.head.weight.detach().clone()
    path, _ = make_adapter(tmp_path, toy, cfg, 3, "m")
    lora.load_adapter(model, make_adapter(tmp_path, toy, A_CFG, 1, "a")[0])
    with safe_open(str(path / WEIGHTS_NAME), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["base_model.model.head.weight"] += 1  # this adapter trained its head
    save_file(tensors, str(path / WEIGHTS_NAME))
    lora.load_adapter(model, path, adapter_name="own_head")  # its own copy: accepted
    assert type(model.head).__name__ == "ModulesToSaveWrapper"
    assert model.head.active_adapter is None  # "default" has no copy: the original runs
    torch.testing.assert_close(model.head.original_module.weight, original, rtol=0, atol=0)
    lora.set_adapter(model, "own_head")
    torch.testing.assert_close(model.head.weight, original + 1, rtol=0, atol=0)
    torch.testing.assert_close(model.head.original_module.weight, original, rtol=0, atol=0)
    with lora.disabled(model):
        # the original comes back (q_proj runs as an r = 0 LoRA layer: 1 ulp)
        torch.testing.assert_close(run(model), want_base, rtol=1e-6, atol=1e-6)
    lora.set_adapter(model, "default")
    torch.testing.assert_close(model.head.weight, original, rtol=0, atol=0)
    lora.delete_adapter(model, "own_head")
    assert type(model.head) is nn.Linear and model.head.weight is not None  # the original again
    torch.testing.assert_close(model.head.weight, original, rtol=0, atol=0)


def test_an_adapter_added_to_an_eval_model_runs_its_dropout_only_in_training(tmp_path):
    cfg = lora.LoRAConfig(r=2, lora_dropout=0.5, target_modules=["q_proj", "v_proj"])
    path, want = make_adapter(tmp_path, toy, cfg, 4, "drop")
    model = lora.load_adapter(toy(), make_adapter(tmp_path, toy, A_CFG, 1, "a")[0])
    lora.load_adapter(model, path, adapter_name="drop")  # model in eval mode
    lora.add_weighted_adapter(model, ["drop"], [1.0], "same")
    for name in ("drop", "same"):
        lora.set_adapter(model, name)
        dropout = model.q_proj.lora_dropout
        assert isinstance(dropout, nn.Dropout) and dropout.p == 0.5 and not dropout.training
        torch.testing.assert_close(run(model), want, rtol=1e-5, atol=1e-5)  # no dropout
    model.train()
    assert model.q_proj.lora_dropout.training


# --- combining ----------------------------------------------------------------------------------
def _delta(model, name, module):
    lora.set_adapter(model, name)
    layer = model.get_submodule(module)
    return (
        (effective_weight(layer) - layer.weight).detach()
        if layer.has_adapter
        else torch.zeros_like(layer.weight)
    )


def test_weighted_cat_combination_is_exact(two):
    model, _ = two
    lora.add_weighted_adapter(model, ["a", "b"], [0.7, -0.4], "mix")
    assert lora.adapter_names(model) == ["a", "b", "mix"] and lora.active_adapter(model) == "a"
    for module in ("q_proj", "v_proj", "embed", "conv"):
        want = 0.7 * _delta(model, "a", module) - 0.4 * _delta(model, "b", module)
        torch.testing.assert_close(_delta(model, "mix", module), want, rtol=1e-6, atol=1e-6)
    assert model.q_proj.r == 2 + 3 and model.q_proj.scaling == 1.0


def test_svd_combination_at_full_rank_matches_and_lower_rank_truncates(two):
    model, _ = two
    lora.add_weighted_adapter(
        model, ["a", "b"], [1.0, 1.0], "svd5", combination_type="svd", svd_rank=5
    )
    lora.add_weighted_adapter(
        model, ["a", "b"], [1.0, 1.0], "svd1", combination_type="svd", svd_rank=1
    )
    want = _delta(model, "a", "q_proj") + _delta(model, "b", "q_proj")
    torch.testing.assert_close(_delta(model, "svd5", "q_proj"), want, rtol=1e-5, atol=1e-5)
    assert torch.linalg.matrix_rank(_delta(model, "svd1", "q_proj")) == 1


def test_combining_fused_slices_gives_one_lora_over_the_fused_matrix(tmp_path):
    path_a, _ = make_adapter(
        tmp_path, phi3, lora.LoRAConfig(r=2, target_modules=["qkv_proj[q,v]"]), 1, "qv"
    )
    path_b, _ = make_adapter(
        tmp_path, phi3, lora.LoRAConfig(r=2, target_modules=["qkv_proj[k]"]), 2, "k"
    )
    model = phi3()
    lora.load_adapter(model, path_a, adapter_name="qv")
    lora.load_adapter(model, path_b, adapter_name="k")
    module = "model.layers.0.self_attn.qkv_proj"
    want = _delta(model, "qv", module) + _delta(model, "k", module)
    lora.add_weighted_adapter(model, ["qv", "k"], [1, 1], "qkv")
    torch.testing.assert_close(_delta(model, "qkv", module), want, rtol=1e-6, atol=1e-6)
    logits = run(model)
    lora.save_adapter(model, tmp_path / "qkv")
    fresh = phi3()
    lora.load_adapter(fresh, tmp_path / "qkv")
    torch.testing.assert_close(run(fresh), logits, rtol=1e-6, atol=1e-6)


def test_combination_arguments_are_checked(two):
    model, _ = two
    with pytest.raises(ValueError, match=r"weights=\[1.0\]: expected 2 finite numbers"):
        lora.add_weighted_adapter(model, ["a", "b"], [1.0], "x")
    with pytest.raises(ValueError, match="already has an adapter of that name"):
        lora.add_weighted_adapter(model, ["a"], [1.0], "b")
    with pytest.raises(ValueError, match="combination_type='ties'"):
        lora.add_weighted_adapter(model, ["a"], [1.0], "x", combination_type="ties")
    with pytest.raises(ValueError, match=r"adapter_name='a\.b'"):
        lora.add_weighted_adapter(model, ["a"], [1.0], "a.b")


# --- mixed batch --------------------------------------------------------------------------------
def test_mixed_batch_equals_each_adapter_alone_sample_for_sample(two):
    model, want = two
    names = ["b", None, "a"]
    with lora.mixed_batch(model, names):
        out = run(model)
    for i, n in enumerate(names):
        torch.testing.assert_close(out[i], want[n][i], rtol=1e-6, atol=1e-6)
    assert lora.active_adapter(model) == "a" and "forward" not in model.q_proj.__dict__
    torch.testing.assert_close(run(model), want["a"], rtol=0, atol=0)


def test_mixed_batch_on_phi3_with_fused_slices_merged_layers_and_gradients(tmp_path):
    path_a, want_a = make_adapter(
        tmp_path, phi3, lora.LoRAConfig(r=2, target_modules=["qkv_proj[q,v]", "o_proj"]), 1, "a"
    )
    path_b, want_b = make_adapter(
        tmp_path, phi3, lora.LoRAConfig(r=4, target_modules="all-linear"), 2, "b"
    )
    model = phi3()
    base = run(model)
    lora.load_adapter(model, path_a, adapter_name="a")
    lora.load_adapter(model, path_b, adapter_name="b")
    lora.merge(model)
    names = ["a", "b", None]
    with lora.mixed_batch(model, names):
        out = model(IDS).logits
        out.sum().backward()
    for i, want in enumerate((want_a, want_b, base)):
        torch.testing.assert_close(out[i].detach(), want[i], rtol=1e-5, atol=1e-5)
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert qkv.merged and qkv.lora_B.grad is not None and torch.count_nonzero(qkv.lora_B.grad) > 0


def test_mixed_batch_errors(two):
    model, _ = two
    with pytest.raises(ValueError, match=r"adapter 'zzz': Toy has no such adapter"):
        with lora.mixed_batch(model, ["a", "zzz", None]):
            pass
    with pytest.raises(
        ValueError,
        match=r"mixed_batch: 2 adapter names, but a Embedding got an input of shape \(3, 6\)",
    ):
        with lora.mixed_batch(model, ["a", "b"]):
            run(model)
    assert lora.active_adapter(model) == "a"
