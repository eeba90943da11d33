"""add_weighted_adapter carries modules_to_save: the combined adapter's copy of a module trained in
full is orig + Σ wᵢ (copyᵢ − orig), tied copies stay one Parameter, and it saves and loads."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from reference import randomize_lora
from tiny import MODULES_TO_SAVE_IDS as IDS
from tiny import MODULES_TO_SAVE_PHI3 as PHI3
from torch import nn

import lora
from lora.models import Phi3Config, Phi3ForCausalLM


class Shift(nn.Module):
    """A parameter and a buffer: x · scale + offset."""

    def __init__(self, n: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(n))
        self.register_buffer("offset", torch.zeros(n))

    def forward(self, x):
        return x * self.scale + self.offset


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.q_proj = nn.Linear(8, 8)
        self.head = nn.Sequential(
            nn.Linear(8, 20), Shift(20)
        )  # nested names: "0.weight", "1.offset"

    def forward(self, ids):
        return self.head(self.q_proj(self.embed(ids % 20)))


def toy() -> Toy:
    torch.manual_seed(0)
    return Toy().eval()


def phi3(tied: bool = False) -> Phi3ForCausalLM:
    torch.manual_seed(0)
    return Phi3ForCausalLM(Phi3Config(**PHI3, tie_word_embeddings=tied)).eval()


def run(model):
    with torch.no_grad():
        out = model(IDS)
    return out.logits if hasattr(out, "logits") else out


def trained(tmp_path, build, config, seed, name):
    """Save an adapter whose LoRA layers and modules_to_save copies all moved away from the base."""
    model = lora.inject(build(), config)
    g = torch.Generator().manual_seed(seed)
    for _, layer in lora.layers.lora_layers(model):
        randomize_lora(layer, generator=g, scale=0.2)
    with torch.no_grad():
        for _, wrapper in lora.layers.saved.saved_modules(model):
            copy = wrapper.modules_to_save["default"]
            for t in [*copy.parameters(), *copy.buffers()]:  # a tied weight is one Parameter
                t.add_(torch.randn(t.shape, generator=g) * 0.3)
    return lora.save_adapter(model, tmp_path / name)


def loaded(build, *paths_and_names):
    model = build()
    for path, name in paths_and_names:
        lora.load_adapter(model, path, adapter_name=name)
    return model


def formula(wrapper, weighted):
    """orig + Σ w (copy − orig) per parameter, in float64, over the adapters that have a copy."""
    out = {}
    for key, orig in wrapper.original_module.named_parameters():
        total = orig.detach().double().clone()
        for name, w in weighted:
            held = wrapper.get_adapter(name)
            if held is not None:
                total += w * (held.get_parameter(key).detach().double() - orig.double())
        out[key] = total.to(orig.dtype)
    return out


TOY_SAVED = lora.LoRAConfig(r=2, target_modules=["q_proj"], modules_to_save=["head"])
TOY_PLAIN = lora.LoRAConfig(r=3, target_modules=["q_proj"])
HEAD = lora.LoRAConfig(r=2, target_modules=["o_proj"], modules_to_save=["lm_head"])


@pytest.fixture
def two_toys(tmp_path):
    a = trained(tmp_path, toy, TOY_SAVED, 1, "a")
    b = trained(tmp_path, toy, TOY_SAVED, 2, "b")
    return loaded(toy, (a, "a"), (b, "b"))


@pytest.mark.parametrize("combination_type", ["cat", "svd"])
def test_the_combined_copy_is_orig_plus_the_weighted_deltas_and_forward_runs_it(
    tmp_path, combination_type
):
    model = loaded(
        phi3,
        (trained(tmp_path, phi3, HEAD, 1, "a"), "a"),
        (trained(tmp_path, phi3, HEAD, 2, "b"), "b"),
    )
    lora.add_weighted_adapter(model, ["a", "b"], [0.7, -0.4], "mix", combination_type)
    head = model.lm_head
    assert head.adapter_names == ["a", "b", "mix"] and head.active_adapter == "a"
    mix = head.modules_to_save["mix"]
    want = formula(head, [("a", 0.7), ("b", -0.4)])
    torch.testing.assert_close(mix.weight, want["weight"], rtol=1e-6, atol=1e-6)
    assert mix.weight.requires_grad and mix.weight is not head.modules_to_save["a"].weight
    seen = {}
    hook = head.register_forward_hook(lambda m, args, out: seen.update(x=args[0], out=out))
    lora.set_adapter(model, "mix")
    run(model)
    hook.remove()
    torch.testing.assert_close(seen["out"], seen["x"] @ want["weight"].T, rtol=1e-5, atol=1e-5)
    original = seen["x"] @ head.original_module.weight.T
    assert (seen["out"] - original).abs().max() > 0.1  # not the untrained head
    config = model.lora_configs["mix"]
    assert config.modules_to_save == ["lm_head"] and config.ensure_weight_tying is False


@pytest.fixture(scope="module")
def three_paths(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("three")
    return [
        (trained(tmp_path, toy, TOY_SAVED, 1, "a"), "a"),
        (trained(tmp_path, toy, TOY_PLAIN, 2, "b"), "b"),  # no copy of head
        (trained(tmp_path, toy, TOY_SAVED, 3, "c"), "c"),
    ]


@given(
    weights=st.lists(
        st.floats(-2, 2, allow_nan=False, width=32).filter(lambda w: w != 0), min_size=3, max_size=3
    ),
    order=st.permutations(["a", "b", "c"]),
)
def test_formula_for_any_weights_nested_parameters_and_buffers_from_the_first_with_a_copy(
    three_paths, weights, order
):
    model = loaded(toy, *three_paths)
    lora.add_weighted_adapter(model, order, weights, "mix")
    head = model.head
    mix = head.modules_to_save["mix"]
    want = formula(head, list(zip(order, weights)))
    assert sorted(want) == ["0.bias", "0.weight", "1.scale"]
    for key, value in want.items():
        torch.testing.assert_close(mix.get_parameter(key), value, rtol=1e-5, atol=1e-5)
    first = next(n for n in order if n != "b")
    want_offset = head.modules_to_save[first].get_buffer("1.offset")
    assert torch.equal(mix.get_buffer("1.offset"), want_offset)
    assert mix.get_buffer("1.offset") is not want_offset  # its own tensor
    for name in ("a", "c"):  # the sources are untouched
        assert not torch.equal(head.modules_to_save[name][0].weight, mix[0].weight)


@pytest.mark.parametrize("combination_type", ["cat", "svd"])
def test_one_adapter_at_weight_one_is_that_adapter(two_toys, combination_type):
    model = two_toys
    lora.add_weighted_adapter(model, ["b"], [1.0], "same", combination_type)
    source, same = model.head.modules_to_save["b"], model.head.modules_to_save["same"]
    for (key, p), (_, q) in zip(source.state_dict().items(), same.state_dict().items()):
        assert torch.equal(p, q), key  # an exact copy of its copy
    assert all(p is not q for p, q in zip(source.parameters(), same.parameters()))
    lora.set_adapter(model, "b")
    want = run(model)
    lora.set_adapter(model, "same")
    torch.testing.assert_close(run(model), want, rtol=1e-5, atol=1e-5)


def test_only_one_adapter_with_a_copy_gives_orig_plus_its_weighted_delta(tmp_path):
    model = loaded(
        toy,
        (trained(tmp_path, toy, TOY_PLAIN, 1, "plain"), "plain"),
        (trained(tmp_path, toy, TOY_SAVED, 2, "saved"), "saved"),
    )
    lora.add_weighted_adapter(model, ["plain", "saved"], [0.5, 0.3], "mix")
    head = model.head
    copy, orig = head.modules_to_save["saved"], head.original_module
    mix = head.modules_to_save["mix"]
    for key, o in orig.named_parameters():
        want = o + 0.3 * (copy.get_parameter(key) - o)
        torch.testing.assert_close(mix.get_parameter(key), want, rtol=1e-6, atol=1e-6)


def test_no_adapter_with_a_copy_gives_none(tmp_path):
    model = loaded(
        toy,
        (trained(tmp_path, toy, TOY_SAVED, 1, "saved"), "saved"),
        (trained(tmp_path, toy, TOY_PLAIN, 2, "plain"), "plain"),
    )
    lora.add_weighted_adapter(model, ["plain"], [0.5], "mix")
    assert model.head.adapter_names == ["saved"]
    assert model.lora_configs["mix"].modules_to_save is None


def test_tied_copies_share_one_parameter_and_save_and_load_so(tmp_path):
    tied = lora.LoRAConfig(
        r=2, target_modules=["o_proj"], modules_to_save=["lm_head"], ensure_weight_tying=True
    )
    model = loaded(
        lambda: phi3(tied=True),
        (trained(tmp_path, lambda: phi3(tied=True), tied, 1, "a"), "a"),
        (trained(tmp_path, lambda: phi3(tied=True), tied, 2, "b"), "b"),
    )
    head, embed = model.lm_head, model.model.embed_tokens
    assert head.modules_to_save["a"].weight is embed.modules_to_save["a"].weight
    lora.add_weighted_adapter(model, ["a", "b"], [0.7, -0.4], "mix")
    mix_weight = head.modules_to_save["mix"].weight
    assert embed.modules_to_save["mix"].weight is mix_weight  # one Parameter, not two equal ones
    torch.testing.assert_close(
        mix_weight, formula(head, [("a", 0.7), ("b", -0.4)])["weight"], rtol=1e-6, atol=1e-6
    )
    config = model.lora_configs["mix"]
    assert config.modules_to_save == ["lm_head"] and config.ensure_weight_tying is True
    lora.set_adapter(model, "mix")
    want = run(model)
    lora.save_adapter(model, tmp_path / "mix", adapter_name="mix")
    fresh = phi3(tied=True)
    lora.load_adapter(fresh, tmp_path / "mix")
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
    torch.testing.assert_close(fresh.lm_head.weight, mix_weight, rtol=0, atol=0)
    torch.testing.assert_close(run(fresh), want, rtol=1e-5, atol=1e-5)


def test_a_tie_in_one_adapter_only_gives_separate_copies_each_its_own_sum(tmp_path):
    tied = lora.LoRAConfig(
        r=2, target_modules=["o_proj"], modules_to_save=["lm_head"], ensure_weight_tying=True
    )
    model = loaded(
        lambda: phi3(tied=True),
        (trained(tmp_path, lambda: phi3(tied=True), tied, 1, "tied"), "tied"),
        (trained(tmp_path, lambda: phi3(tied=True), HEAD, 2, "head"), "head"),
    )
    lora.add_weighted_adapter(model, ["tied", "head"], [0.7, -0.4], "mix")
    head, embed = model.lm_head, model.model.embed_tokens
    assert head.modules_to_save["mix"].weight is not embed.modules_to_save["mix"].weight
    weighted = [("tied", 0.7), ("head", -0.4)]
    for wrapper in (head, embed):
        torch.testing.assert_close(
            wrapper.modules_to_save["mix"].weight,
            formula(wrapper, weighted)["weight"],
            rtol=1e-6,
            atol=1e-6,
        )
    config = model.lora_configs["mix"]
    assert config.modules_to_save == ["model.embed_tokens", "lm_head"]
    assert config.ensure_weight_tying is False
    lora.set_adapter(model, "mix")
    want = run(model)
    lora.save_adapter(model, tmp_path / "mix")
    fresh = lora.load_adapter(phi3(tied=True), tmp_path / "mix")
    torch.testing.assert_close(run(fresh), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("combination_type", ["cat", "svd"])
def test_save_then_load_on_a_fresh_model_gives_the_same_logits(
    two_toys, tmp_path, combination_type
):
    model = two_toys
    lora.add_weighted_adapter(model, ["a", "b"], [0.7, -0.4], "mix", combination_type)
    lora.set_adapter(model, "mix")
    want = run(model)
    lora.save_adapter(model, tmp_path / "mix")
    fresh = lora.load_adapter(toy(), tmp_path / "mix")
    for key, p in model.head.modules_to_save["mix"].state_dict().items():
        assert torch.equal(fresh.head.modules_to_save["default"].state_dict()[key], p), key
    torch.testing.assert_close(run(fresh), want, rtol=1e-5, atol=1e-5)
    with lora.disabled(fresh):  # the original head is still the original
        torch.testing.assert_close(run(fresh), run(toy()), rtol=1e-6, atol=1e-6)


def test_mixed_batch_delete_and_merge_with_a_combined_copy(two_toys):
    model = two_toys
    lora.add_weighted_adapter(model, ["a", "b"], [0.5, 0.5], "mix")
    want = {}
    for name in ("a", "mix"):
        lora.set_adapter(model, name)
        want[name] = run(model)
    with lora.mixed_batch(model, ["mix", "a"]):
        got = run(model)
    torch.testing.assert_close(got[0], want["mix"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want["a"][1], rtol=1e-5, atol=1e-5)
    a_weight = model.head.modules_to_save["a"][0].weight.detach().clone()
    lora.delete_adapter(model, "b")
    assert model.head.adapter_names == ["a", "mix"]
    assert torch.equal(model.head.modules_to_save["a"][0].weight, a_weight)
    lora.set_adapter(model, "mix")
    torch.testing.assert_close(run(model), want["mix"], rtol=1e-6, atol=1e-6)
    merged = lora.merge_and_unload(model)
    assert type(merged.head) is nn.Sequential
    torch.testing.assert_close(run(merged), want["mix"], rtol=1e-5, atol=1e-5)


def test_bf16_copies_stay_bf16_and_follow_the_formula(tmp_path):
    def bf16():
        return toy().to(torch.bfloat16)

    model = loaded(
        bf16,
        (trained(tmp_path, bf16, TOY_SAVED, 1, "a"), "a"),
        (trained(tmp_path, bf16, TOY_SAVED, 2, "b"), "b"),
    )
    lora.add_weighted_adapter(model, ["a", "b"], [0.7, -0.4], "mix")
    mix = model.head.modules_to_save["mix"]
    want = formula(model.head, [("a", 0.7), ("b", -0.4)])
    for key, value in want.items():
        p = mix.get_parameter(key)
        assert p.dtype == torch.bfloat16
        torch.testing.assert_close(p, value, rtol=1e-2, atol=1e-2)


class ThreeTied(nn.Module):
    """Three Linears with one weight Parameter (tied in the base model)."""

    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(8, 8)
        self.left, self.right, self.third = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.right.weight = self.third.weight = self.left.weight

    def forward(self, x):
        h = self.q_proj(x)
        return self.left(h) + self.right(h) + self.third(h)


def three_tied() -> ThreeTied:
    torch.manual_seed(0)
    return ThreeTied().eval()


def test_copies_tied_unlike_the_base_model_save_untied_with_a_warning(tmp_path):
    model = three_tied()
    cfg = lora.LoRAConfig(r=2, target_modules=["q_proj"], modules_to_save=["left", "right"])
    lora.inject(model, cfg)
    left, right = model.left.modules_to_save["default"], model.right.modules_to_save["default"]
    right.weight = left.weight  # by hand: "third" is tied to them in the base model, not here
    with torch.no_grad():
        left.weight.add_(0.5)
    with pytest.warns(UserWarning, match="names every copy, untied"):
        lora.add_weighted_adapter(model, ["default"], [0.5], "mix")
    mix_left, mix_right = model.left.modules_to_save["mix"], model.right.modules_to_save["mix"]
    assert mix_right.weight is mix_left.weight  # the sources share: so does the combination
    config = model.lora_configs["mix"]
    assert config.modules_to_save == ["left", "right"] and config.ensure_weight_tying is False
    lora.set_adapter(model, "mix")
    x = torch.randn(2, 8)
    with torch.no_grad():
        want = model(x)
    lora.save_adapter(model, tmp_path / "mix")
    fresh = lora.load_adapter(three_tied(), tmp_path / "mix")
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), want, rtol=1e-6, atol=1e-6)
