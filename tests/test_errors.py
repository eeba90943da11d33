"""Bad input gets an error naming the argument and the value."""

import pytest
import torch

import lora


@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda: lora.Linear(4, 4, r=-1), ValueError, r"r=-1"),
        (lambda: lora.Linear(4, 4, r=2.0), TypeError, r"r=2\.0"),
        (lambda: lora.Linear(4, 4, r=True), TypeError, r"r=True"),
        (lambda: lora.Linear(4, 4, r="4"), TypeError, r"r='4'"),
        (lambda: lora.Linear(4, 4, r=2, lora_dropout=1.0), ValueError, r"lora_dropout=1\.0"),
        (lambda: lora.Linear(4, 4, r=2, lora_dropout=-0.1), ValueError, r"lora_dropout=-0\.1"),
        (lambda: lora.Linear(4, 4, r=2, lora_alpha="8"), TypeError, r"lora_alpha='8'"),
        (lambda: lora.Linear(4, 4, r=2, lora_alpha=0), ValueError, r"lora_alpha=0: .*nonzero"),
        (lambda: lora.LoRAConfig(r=4, lora_alpha=0.0), ValueError, r"lora_alpha=0\.0: .*nonzero"),
        (
            lambda: lora.LoRAConfig(r=4, alpha_pattern={"q_proj": 0}),
            ValueError,
            r"alpha_pattern.*0: .*nonzero",
        ),
        (
            lambda: lora.MergedLinear(4, 10, r=2, enable_lora=[True, False, True]),
            ValueError,
            r"enable_lora=.*divide out_features=10",
        ),
        (lambda: lora.MergedLinear(4, 10, r=2, enable_lora=[]), ValueError, r"enable_lora=\[\]"),
        (
            lambda: lora.MergedLinear(4, 10, r=2, enable_lora=[True, True], split_sizes=[6, 5]),
            ValueError,
            r"split_sizes=\[6, 5\].*sum to 11.*out_features=10",
        ),
        (
            lambda: lora.MergedLinear(4, 10, r=2, enable_lora=[True, True], split_sizes=[6, 2, 2]),
            ValueError,
            r"split_sizes=\[6, 2, 2\].*expected 2 sizes",
        ),
        (lambda: lora.Conv2d(3, 4, 3, r=2, groups=2), ValueError, r"groups=2.*in_channels=3"),
        (lambda: lora.Conv1d(4, 6, 3, r=2, groups=4), ValueError, r"groups=4.*out_channels=6"),
        (lambda: lora.Embedding(4, 4, r=-2), ValueError, r"r=-2"),
    ],
)
def test_bad_arguments_name_the_argument_and_value(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_a_zero_alpha_is_refused_only_where_there_is_an_adapter():
    # rank 0 is a plain layer, whatever its alpha; a negative alpha flips the update's sign
    plain = lora.Linear(4, 3, r=0, lora_alpha=0)
    assert not hasattr(plain, "lora_A")
    layer = lora.Linear(4, 3, r=2, lora_alpha=-4)
    assert layer.scaling == -2.0
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 4)
    delta = layer.scaling * (x @ layer.lora_A.T @ layer.lora_B.T)
    torch.testing.assert_close(layer(x), x @ layer.weight.T + layer.bias + delta)


@pytest.mark.parametrize("fn", [lora.mark_only_lora_as_trainable, lora.lora_state_dict])
def test_unknown_bias_mode(fn):
    with pytest.raises(ValueError, match=r"bias='some'.*'none', 'all', 'lora_only'"):
        fn(torch.nn.Sequential(lora.Linear(2, 2, r=1)), bias="some")
