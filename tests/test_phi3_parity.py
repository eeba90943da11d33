"""Numerical parity with transformers' own Phi3ForCausalLM on tiny random configs (fp32, max |Δ| <= 1e-5).

Weights are copied from the transformers model through its state dict, so the comparison covers the
architecture, not the initialisation. Nothing here touches the network: models are built from
configs in memory. Skips cleanly when transformers is not installed.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

transformers = pytest.importorskip("transformers")
from tiny import LONGROPE  # noqa: E402
from transformers import Phi3Config as HFPhi3Config  # noqa: E402
from transformers import Phi3ForCausalLM as HFPhi3ForCausalLM  # noqa: E402

from lora.models import Phi3Config, Phi3ForCausalLM, position_ids_from_mask  # noqa: E402

transformers.logging.set_verbosity_error()
ATOL = 1e-5

BASE = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
CONFIGS = {
    "mha": dict(BASE),
    "gqa": dict(BASE, num_key_value_heads=2),
    "longrope_gqa": dict(BASE, num_key_value_heads=2, **LONGROPE),
    # Phi-4-mini's shape in small: GQA, 3/4 of each head rotated, tied embeddings, longrope ("longrope" type).
    "partial_rotary_tied": dict(
        BASE,
        num_key_value_heads=1,
        partial_rotary_factor=0.75,
        tie_word_embeddings=True,
        max_position_embeddings=64,
        original_max_position_embeddings=16,
        rope_scaling={
            "type": "longrope",
            "short_factor": [1.0, 1.1, 1.2],
            "long_factor": [2.0, 3.0, 5.0],
        },
    ),
    "sliding_window": dict(BASE, num_key_value_heads=2, sliding_window=5),
}


def make_pair(config: dict, attn_implementation: str = "sdpa"):
    hf_config = HFPhi3Config(**config)
    hf_config._attn_implementation = attn_implementation
    hf = HFPhi3ForCausalLM(hf_config).eval()
    ours = Phi3ForCausalLM(Phi3Config(**config)).eval()
    ours.load_state_dict(hf.state_dict())
    return hf, ours


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize(
    "name, seq_len",
    [
        ("mha", 12),
        ("gqa", 12),
        ("longrope_gqa", 12),  # 12 <= 16: short factors
        ("longrope_gqa", 24),  # 24 > 16: long factors
        ("partial_rotary_tied", 10),
        ("partial_rotary_tied", 20),
        ("sliding_window", 13),  # window 5 < 13 tokens
    ],
)
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_logits_match_transformers(name, seq_len, attn_implementation):
    hf, ours = make_pair(CONFIGS[name], attn_implementation)
    ids = torch.randint(3, 96, (2, seq_len))
    with torch.no_grad():
        assert max_diff(ours(ids).logits, hf(ids).logits) <= ATOL


def test_longrope_long_mode_is_exercised():
    """The 24-token parity case really runs on the long factors: with long := short factors the logits
    move by far more than the parity tolerance."""
    hf, ours = make_pair(CONFIGS["longrope_gqa"])
    config = dict(CONFIGS["longrope_gqa"])
    config["rope_scaling"] = dict(
        config["rope_scaling"], long_factor=config["rope_scaling"]["short_factor"]
    )
    short_only = Phi3ForCausalLM(Phi3Config(**config)).eval()
    short_only.load_state_dict(hf.state_dict())
    ids = torch.randint(3, 96, (1, 24))
    with torch.no_grad():
        assert max_diff(ours(ids).logits, short_only(ids).logits) > 100 * ATOL


def left_padded(batch: int, seq_len: int, pads: list[int]):
    ids = torch.randint(3, 96, (batch, seq_len))
    mask = torch.ones_like(ids)
    for row, n in enumerate(pads):
        mask[row, :n] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize(
    "name, seq_len, pads",
    [
        ("gqa", 11, [4, 1, 0]),
        ("sliding_window", 11, [4, 1, 0]),
        ("longrope_gqa", 11, [4, 1, 0]),
        # 20 positions > original_max_position_embeddings = 16, but no row has more than 15 real
        # tokens: numbering every position picks the long factors, counting real tokens the short.
        ("longrope_gqa", 20, [5, 6]),
    ],
)
def test_left_padded_forward_with_a_2d_mask_matches_transformers(name, seq_len, pads):
    """The plain forward, with no position ids: both number every position 0..s-1."""
    hf, ours = make_pair(CONFIGS[name])
    ids, mask = left_padded(len(pads), seq_len, pads)
    with torch.no_grad():
        got = ours(ids, attention_mask=mask).logits
        want = hf(ids, attention_mask=mask).logits
    assert torch.isfinite(got).all()
    real = mask.bool()
    assert max_diff(got[real], want[real]) <= ATOL


def test_left_padded_longrope_batch_past_the_switch_is_a_real_case():
    """Counting real tokens instead (generate's positions) really picks other factors here."""
    hf, ours = make_pair(CONFIGS["longrope_gqa"])
    ids, mask = left_padded(2, 20, [5, 6])
    with torch.no_grad():
        counted = ours(ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
        numbered = hf(ids, attention_mask=mask).logits
    assert max_diff(counted[mask.bool()], numbered[mask.bool()]) > 100 * ATOL


@pytest.mark.parametrize("name", ["gqa", "sliding_window", "longrope_gqa"])
def test_left_padded_forward_with_counted_positions_matches_transformers(name):
    """Left-padding-aware positions (what both generates use), passed explicitly to both."""
    hf, ours = make_pair(CONFIGS[name])
    ids, mask = left_padded(2, 20, [5, 6])
    position_ids = position_ids_from_mask(mask)
    with torch.no_grad():
        got = ours(ids, attention_mask=mask, position_ids=position_ids).logits
        want = hf(ids, attention_mask=mask, position_ids=position_ids).logits
    real = mask.bool()
    assert max_diff(got[real], want[real]) <= ATOL


@pytest.mark.parametrize("name", ["gqa", "sliding_window", "longrope_gqa"])
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"use_cache": True}, {"use_cache": False}, {"use_cache": False, "attention_mask": True}],
    ids=["default", "use_cache", "no_cache", "no_cache_with_mask"],
)
def test_restarting_position_ids_match_transformers(name, kwargs):
    """[0..9, 0..13]: packed documents only with use_cache=False and no mask (no cache in play);
    by default (config.use_cache), with a cache or with a 2D mask, one causal sequence with
    those positions."""
    hf, ours = make_pair(CONFIGS[name])
    ids = torch.randint(3, 96, (2, 24))
    positions = torch.cat([torch.arange(10), torch.arange(14)])[None]
    if kwargs.get("attention_mask"):
        kwargs = dict(kwargs, attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        got = ours(ids, position_ids=positions, **kwargs).logits
        want = hf(ids, position_ids=positions, **kwargs).logits
    assert max_diff(got, want) <= ATOL


def test_restarting_position_ids_match_transformers_in_a_checkpointed_training_step():
    """transformers turns use_cache off under gradient checkpointing in training: packing."""
    hf, ours = make_pair(CONFIGS["gqa"])
    getattr(hf, "activation_checkpointing_enable", hf.gradient_checkpointing_enable)()
    ours.gradient_checkpointing_enable()
    hf.train(), ours.train()
    ids = torch.randint(3, 96, (2, 24))
    positions = torch.cat([torch.arange(10), torch.arange(14)])[None]
    got = ours(ids, position_ids=positions).logits
    want = hf(ids, position_ids=positions).logits
    assert max_diff(got, want) <= ATOL


@pytest.mark.parametrize("name", ["gqa", "partial_rotary_tied"])
def test_loss_and_gradients_match_transformers(name):
    hf, ours = make_pair(CONFIGS[name])
    hf.train(), ours.train()  # dropout is 0 in these configs
    ids = torch.randint(3, 96, (2, 12))
    labels = ids.clone()
    labels[:, :5] = -100  # a prompt that does not count
    labels[1, -2:] = -100
    ids[0, 3] = 0  # the pad id: its embedding row gets no gradient in either model
    hf_loss = hf(ids, labels=labels).loss
    our_loss = ours(ids, labels=labels).loss
    assert abs(hf_loss.item() - our_loss.item()) <= ATOL
    hf_loss.backward()
    our_loss.backward()
    hf_grads = {n: p.grad for n, p in hf.named_parameters()}
    for n, p in ours.named_parameters():
        assert max_diff(p.grad, hf_grads[n]) <= ATOL, n


@pytest.mark.parametrize("name", ["gqa", "sliding_window", "partial_rotary_tied"])
def test_kv_cache_decoding_matches_transformers(name):
    hf, ours = make_pair(CONFIGS[name])
    ids = torch.randint(3, 96, (2, 12))
    with torch.no_grad():
        hf_out = hf(ids[:, :6], use_cache=True)
        our_out = ours(ids[:, :6], use_cache=True)
        assert max_diff(our_out.logits, hf_out.logits) <= ATOL
        hf_cache, our_cache = hf_out.cache, our_out.past_key_values
        for t in range(6, 12):  # one token at a time
            hf_out = hf(ids[:, t : t + 1], cache=hf_cache, use_cache=True)
            our_out = ours(ids[:, t : t + 1], past_key_values=our_cache, use_cache=True)
            hf_cache, our_cache = hf_out.cache, our_out.past_key_values
            assert max_diff(our_out.logits, hf_out.logits) <= ATOL, t
        full = hf(ids).logits
        assert max_diff(our_out.logits[:, -1], full[:, -1]) <= ATOL


@pytest.mark.parametrize(
    "name, prompt, pads, new",
    [
        ("gqa", 7, [0, 3], 6),
        # a left-padded batch whose rows cross original_max_position_embeddings = 16 while generating
        ("longrope_gqa", 14, [0, 5], 8),
    ],
)
def test_greedy_generate_with_left_padding_matches_transformers(name, prompt, pads, new):
    hf, ours = make_pair(CONFIGS[name])
    ids, mask = left_padded(2, prompt, pads)
    want = hf.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=new,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )
    got = ours.generate(ids, max_new_tokens=new, attention_mask=mask)
    assert torch.equal(got, want)
