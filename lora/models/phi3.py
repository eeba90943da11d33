"""Phi-3 as plain PyTorch: the whole `phi3` family as Hugging Face transformers implements it.

Covered: Phi-3-mini-4k / -128k, Phi-3-medium-4k / -128k, Phi-3.5-mini, Phi-4-mini. One file, read
top to bottom in the order data flows: config, norm, rotary embedding, attention, MLP, decoder
layer, the decoder stack, and the causal-LM head with loss, generation and checkpoint I/O.

Parameter names equal transformers' (``model.layers.0.self_attn.qkv_proj.weight`` ...), so a
transformers checkpoint directory loads as is, and what ``save_pretrained`` writes loads in
transformers. Every projection is a plain ``nn.Linear(bias=False)``; the fused ones declare their
slices in ``Phi3ForCausalLM.fused_splits`` so that a surgery pass can adapt part of them. This
module knows nothing of LoRA.

Shape letters: b batch, s / q query length, kv key length (past + current), h hidden_size,
H query heads, KV key/value heads, d head_dim, r rotary dims, V vocab_size, I intermediate_size.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import sys
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lora._heap import reuse_freed_pages, trim_heap
from lora._io import atomic_write_json
from lora._matmul import autocast_dtype, frozen_linear, linear, mm, sdpa_inputs
from lora.checks import IGNORE_INDEX, check_checkpoint_layers
from lora.models import checkpoint as ckpt
from lora.models import recompute
from lora.models.fused_ops import rms_norm, rotary, swiglu
from lora.quant import keep_decoded_on_recompute

__all__ = [
    "Phi3Config",
    "fused_layout",
    "RopeSettings",
    "Phi3RMSNorm",
    "Phi3RotaryEmbedding",
    "AttentionMask",
    "build_attention_mask",
    "position_ids_from_mask",
    "Phi3Attention",
    "Phi3MLP",
    "Phi3DecoderLayer",
    "Phi3Model",
    "CausalLMOutput",
    "KVCache",
    "Phi3ForCausalLM",
]


# Per layer: (keys, values), each (b, KV, kv, d), keys already rotated. Layer i at index i.
KVCache = tuple[tuple[Tensor, Tensor], ...]


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------

_REQUIRED_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)
# Optional keys whose value None means "not given": left out of to_dict() when None.
_OMIT_WHEN_NONE = (
    "partial_rotary_factor",
    "rope_parameters",
    "original_max_position_embeddings",
    "torch_dtype",
    "dtype",
)


class RopeSettings(NamedTuple):
    """The rotary embedding a config asks for, resolved from its rope keys (see ``Phi3Config.rope``)."""

    rope_type: str  # "default" or "longrope"
    theta: float
    rotary_dim: (
        int  # int(head_dim * partial_rotary_factor): channels rotated at the start of each head
    )
    original_max_position_embeddings: int | None  # longrope: the short/long switch point
    short_factor: tuple[float, ...] | None  # longrope: rotary_dim // 2 divisors of the frequencies
    long_factor: tuple[float, ...] | None
    attention_factor: float  # cos and sin are multiplied by it (1.0 for default rope)


@dataclass(init=False)
class Phi3Config:
    """A Phi-3 checkpoint's config.json, as a dataclass.

    ``Phi3Config(**json.load(f))`` takes the keys as a checkpoint writes them, old (``rope_scaling``,
    ``rope_theta``, ``torch_dtype``) and transformers-5 (``rope_parameters``, ``dtype``) alike. Keys
    this class does not know (``architectures``, ``auto_map``, ``attention_bias``, ...) are kept in
    ``extra``, ignored, and written back by ``to_dict()``. Defaults are transformers'.

    Raises:
        ValueError: a required key (vocab_size, hidden_size, intermediate_size, num_hidden_layers,
            num_attention_heads) is missing, or a value is out of range or inconsistent (the message
            names the key, the value and what was expected).
    """

    # The shape of the network: required.
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    # Optional, with transformers' defaults.
    num_key_value_heads: int | None = None  # None: = num_attention_heads (multi-head attention)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    original_max_position_embeddings: int | None = (
        None  # longrope switch point; None: rope dict's, else 4096
    )
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0  # a value inside rope_scaling / rope_parameters wins
    partial_rotary_factor: float | None = None  # likewise; None: 1.0
    rope_scaling: dict | None = None  # legacy name of rope_parameters; wins when both are given
    rope_parameters: dict | None = None
    sliding_window: int | None = (
        None  # a token sees itself and the sliding_window - 1 tokens before it
    )
    resid_pdrop: float = 0.0
    embd_pdrop: float = (
        0.0  # kept for the round trip; transformers' Phi-3 does not use it, nor do we
    )
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    use_cache: bool = True
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 32000
    pad_token_id: int | None = 32000
    torch_dtype: str | None = None  # the checkpoint's dtype; transformers 5 writes it as "dtype"
    dtype: str | None = None
    model_type: str = "phi3"
    extra: dict[str, Any] = field(
        default_factory=dict, repr=False, init=False
    )  # unknown keys, kept verbatim

    def __init__(self, **kwargs: Any) -> None:
        kwargs = copy.deepcopy(kwargs)
        missing = [k for k in _REQUIRED_KEYS if kwargs.get(k) is None]
        if missing:
            raise ValueError(
                f"Phi3Config: missing required key(s) {', '.join(map(repr, missing))}; a Phi-3 config.json "
                f"must give {', '.join(_REQUIRED_KEYS)}"
            )
        for f in fields(self):
            if f.name == "extra":
                continue
            value = kwargs.pop(f.name) if f.name in kwargs else f.default
            setattr(self, f.name, value)
        self.extra = kwargs  # whatever is left, including a key literally named "extra"
        self._validate()

    def _validate(self) -> None:
        _check_field_types(self)
        for key in _REQUIRED_KEYS + ("max_position_embeddings",):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"Phi3Config: {key}={value!r}; expected a positive int")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"Phi3Config: hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                    f"{self.num_attention_heads}; expected a multiple (or give head_dim)"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.num_key_value_heads <= 0 or self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"Phi3Config: num_key_value_heads={self.num_key_value_heads}; expected a positive divisor of "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.model_type != "phi3":
            raise ValueError(f"Phi3Config: model_type={self.model_type!r}; expected 'phi3'")
        if self.hidden_act != "silu":
            raise ValueError(
                f"Phi3Config: hidden_act={self.hidden_act!r}; expected 'silu' (the only one Phi-3 uses)"
            )
        if self.sliding_window is not None and (
            not isinstance(self.sliding_window, int) or self.sliding_window <= 0
        ):
            raise ValueError(
                f"Phi3Config: sliding_window={self.sliding_window!r}; expected None or a positive int"
            )
        _ = self.rope  # resolves and checks the rope keys

    @property
    def rope(self) -> RopeSettings:
        """The rotary embedding, resolved as transformers does.

        The rope dict is ``rope_scaling`` if given, else ``rope_parameters``. Its ``rope_type`` (or legacy
        ``type``) is "default" or "longrope" ("su" and "yarn" are old names of longrope). ``rope_theta`` and
        ``partial_rotary_factor`` inside it win over the top-level keys. For longrope, ``factor`` defaults
        to max_position_embeddings / original_max_position_embeddings and ``attention_factor`` to
        sqrt(1 + ln(factor) / ln(original_max_position_embeddings)), or 1.0 when factor <= 1.
        """
        source = "rope_scaling" if self.rope_scaling else "rope_parameters"
        params = self.rope_scaling or self.rope_parameters or {}
        if not isinstance(params, dict):
            raise ValueError(f"Phi3Config: {source}={params!r}; expected a dict or null")
        rope_type = params.get("rope_type", params.get("type", "default"))
        rope_type = {"su": "longrope", "yarn": "longrope"}.get(rope_type, rope_type)
        if rope_type not in ("default", "longrope"):
            raise ValueError(
                f"Phi3Config: {source}['rope_type']={rope_type!r}; "
                "expected 'default' or 'longrope' (or legacy 'su'/'yarn')"
            )
        theta = float(params.get("rope_theta", self.rope_theta))
        top_partial = 1.0 if self.partial_rotary_factor is None else self.partial_rotary_factor
        partial = float(params.get("partial_rotary_factor", top_partial))
        head_dim = cast(int, self.head_dim)  # resolved by __post_init__
        rotary_dim = int(head_dim * partial)
        if rotary_dim < 2 or rotary_dim % 2 or rotary_dim > head_dim:
            raise ValueError(
                f"Phi3Config: partial_rotary_factor={partial} gives {rotary_dim} rotary dims of head_dim="
                f"{self.head_dim}; expected an even number between 2 and head_dim"
            )
        if rope_type == "default":
            return RopeSettings("default", theta, rotary_dim, None, None, None, 1.0)

        original_max = (
            self.original_max_position_embeddings
            or params.get("original_max_position_embeddings")
            or 4096
        )
        factors = {}
        for key in ("short_factor", "long_factor"):
            value = params.get(key)
            if value is None:
                raise ValueError(
                    f"Phi3Config: {source} of type longrope has no {key!r}; "
                    f"expected a list of {rotary_dim // 2} numbers"
                )
            if len(value) != rotary_dim // 2:
                raise ValueError(
                    f"Phi3Config: {source}['{key}'] has {len(value)} entries; "
                    f"expected rotary_dim // 2 = {rotary_dim // 2}"
                )
            factors[key] = tuple(float(x) for x in value)
        factor = params.get("factor") or self.max_position_embeddings / original_max
        attention_factor = params.get("attention_factor")
        if attention_factor is None:
            attention_factor = (
                1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original_max))
            )
        return RopeSettings(
            "longrope",
            theta,
            rotary_dim,
            int(original_max),
            factors["short_factor"],
            factors["long_factor"],
            float(attention_factor),
        )

    # -- serialisation ----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """All keys, known and unknown, as config.json holds them; ``Phi3Config(**c.to_dict()) == c``."""
        out = {}
        for f in fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if value is None and f.name in _OMIT_WHEN_NONE:
                continue
            out[f.name] = copy.deepcopy(value)
        out.update(copy.deepcopy(self.extra))
        return dict(sorted(out.items()))

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> Phi3Config:
        """Read a config.json (or the config.json inside a directory)."""
        path = Path(path)
        if path.is_dir():
            path = path / ckpt.CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(
                f"Phi3Config.from_json_file: path={str(path)!r} does not exist; expected a config.json"
            )
        try:
            body = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            why = f"{type(e).__name__}: {str(e)[:200]}"
            raise ValueError(f"{path}: not a JSON file ({why})") from None
        if not isinstance(body, dict):
            raise ValueError(
                f"{path}: expected a JSON object of config keys, got {type(body).__name__}"
            )
        try:
            return cls(**body)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def save(self, path_or_dir: str | os.PathLike) -> Path:
        """Write config.json atomically: into ``path_or_dir`` if it is a directory (or has no .json suffix),
        else to that file. Returns the path written."""
        path = Path(path_or_dir)
        if path.is_dir() or path.suffix != ".json":
            path = path / ckpt.CONFIG_NAME
        atomic_write_json(path, self.to_dict())
        return path


# ----------------------------------------------------------------------------------------------
# Modules, in the order data flows through them
# ----------------------------------------------------------------------------------------------


class Phi3RMSNorm(nn.Module):
    """y = weight * (x / sqrt(mean(x^2) + eps)), the normalisation in fp32, cast back before the weight
    (:func:`lora.models.fused_ops.rms_norm`)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # One autograd function (lora.models.fused_ops): the same ops, bitwise; keeps x and the
        # (..., 1) reciprocal RMS for backward instead of an fp32 copy of x.
        # Recomputed in backward rather than kept, where a recompute.scope is open: the norm
        # keeps x anyway, and this output is what the next LoRA layer keeps as its input.
        return recompute.recomputable(rms_norm, x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class Phi3RotaryEmbedding(nn.Module):
    """cos and sin tables for rotary position embedding, from position ids.

    Frequencies are non-persistent fp32 buffers (not in the state dict). ``inv_freq`` holds the
    default frequencies, or longrope's short ones; ``long_inv_freq`` longrope's long ones (else None).
    They are recomputed in fp32 whenever the module moves or is cast (``.to``, ``.half()``,
    ``to_empty``), so a bf16 model keeps exact frequencies.
    """

    inv_freq: Tensor | None
    long_inv_freq: Tensor | None

    def __init__(self, config: Phi3Config) -> None:
        super().__init__()
        self.settings = config.rope
        self.register_buffer("inv_freq", None, persistent=False)
        self.register_buffer("long_inv_freq", None, persistent=False)
        self.reset_buffers()

    def _frequencies(
        self, factors: Sequence[float] | None, device: torch.device | str | None
    ) -> Tensor:
        """(r/2,) fp32: theta^(-2i/r), each divided by factors[i] when given (longrope)."""
        r = self.settings.rotary_dim
        wavelengths = self.settings.theta ** (
            torch.arange(0, r, 2, dtype=torch.float32, device=device) / r
        )
        if factors is not None:
            wavelengths = torch.tensor(factors, dtype=torch.float32, device=device) * wavelengths
        return 1.0 / wavelengths

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the frequency buffers in fp32 on ``device`` (default: where they are now)."""
        if device is None and self.inv_freq is not None:
            device = self.inv_freq.device
        self.inv_freq = self._frequencies(self.settings.short_factor, device)
        if self.settings.rope_type == "longrope":
            self.long_inv_freq = self._frequencies(self.settings.long_factor, device)

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        if self.inv_freq is not None and self.inv_freq.device.type != "meta":
            self.reset_buffers()  # undo any dtype cast: frequencies stay fp32
        return self

    def forward(self, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """position_ids (b|1, s) -> cos, sin, each (b|1, s, r), fp32.

        longrope picks the long frequencies for the whole call when max(position_ids) + 1 >
        original_max_position_embeddings, the short ones otherwise; both are scaled by attention_factor.
        """
        inv_freq = cast(Tensor, self.inv_freq)  # set by reset_buffers
        if self.long_inv_freq is not None:
            is_long = position_ids.max() + 1 > cast(
                int, self.settings.original_max_position_embeddings
            )
            inv_freq = torch.where(is_long, self.long_inv_freq, inv_freq)  # no host sync
        freqs = position_ids[..., None].float() * inv_freq  # (b, s, r/2)
        angles = torch.cat((freqs, freqs), dim=-1)  # (b, s, r): rotate-half layout
        scale = self.settings.attention_factor
        return angles.cos() * scale, angles.sin() * scale


class AttentionMask(NamedTuple):
    """What ``F.scaled_dot_product_attention`` gets, built once per forward and shared by all layers."""

    mask: (
        Tensor | None
    )  # (b|1, 1, q, kv) bool, True = may attend; None when is_causal or nothing is masked
    is_causal: bool
    empty_rows: (
        Tensor | None
    )  # (b|1, 1, q, 1) bool: queries with no key to attend to; their output is zeroed


def build_attention_mask(
    attention_mask: Tensor | None,
    batch: int,
    q_len: int,
    past_len: int,
    sliding_window: int | None,
    device: torch.device,
) -> AttentionMask:
    """The causal (+ sliding window) mask, ANDed with a padding or custom mask.

    Query i sits at index past_len + i of the keys; it may attend key j when j <= past_len + i and,
    with a sliding window W, past_len + i - j < W (itself and the W - 1 keys before it).

    Args:
        attention_mask: None; a 2D (b, kv) padding mask, nonzero = real token, covering past and current
            keys; or a 4D bool (b|1, 1, q, kv) mask, True = may attend (e.g. packed documents).
        batch, q_len, past_len: the query batch, its length, and the number of cached keys before it.

    Raises:
        ValueError: a mask of the wrong shape; TypeError: a 4D mask that is not bool.
    """
    kv_len = past_len + q_len
    padding = custom = None
    if attention_mask is not None:
        if attention_mask.dim() == 2:
            if tuple(attention_mask.shape) != (batch, kv_len):
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}; expected (batch, past + current keys) = "
                    f"({batch}, {kv_len})"
                )
            padding = attention_mask.to(device=device, dtype=torch.bool)
            if bool(padding.all()):
                padding = None  # nothing padded: keep the fast causal path
        elif attention_mask.dim() == 4:
            if attention_mask.dtype != torch.bool:
                raise TypeError(
                    f"attention_mask is 4D of dtype {attention_mask.dtype}; expected torch.bool (True = may attend)"
                )
            b, h, q, kv = attention_mask.shape
            if b not in (1, batch) or h != 1 or q != q_len or kv != kv_len:
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}; "
                    "expected (batch|1, 1, q_len, past + q_len) = "
                    f"({batch}, 1, {q_len}, {kv_len})"
                )
            custom = attention_mask.to(device)
        else:
            raise ValueError(
                f"attention_mask has {attention_mask.dim()} dims; expected 2 (batch, keys) or 4 (batch, 1, q, keys)"
            )

    window_bites = sliding_window is not None and kv_len > sliding_window
    if padding is None and custom is None and not window_bites:
        if q_len == kv_len:
            return AttentionMask(None, q_len > 1, None)
        if q_len == 1:  # one new token sees every cached key
            return AttentionMask(None, False, None)

    q_idx = torch.arange(past_len, kv_len, device=device)[:, None]
    kv_idx = torch.arange(kv_len, device=device)[None, :]
    allowed = kv_idx <= q_idx
    if sliding_window is not None:
        allowed = allowed & (kv_idx > q_idx - sliding_window)
    mask = allowed[None, None]  # (1, 1, q, kv)
    if padding is not None:
        mask = mask & padding[:, None, None, :]
    if custom is not None:
        mask = mask & custom
    empty_rows = None
    if padding is not None or custom is not None:
        # A left-padding query may see nothing. Let it attend everywhere (finite on every torch
        # version) and zero its output afterwards, which is what torch >= 2.5 SDPA itself returns.
        empty_rows = ~mask.any(dim=-1, keepdim=True)
        mask = mask | empty_rows
    return AttentionMask(mask, False, empty_rows)


def fused_layout(config: Any) -> OrderedDict[str, OrderedDict[str, int]]:
    """The slices of Phi-3's fused projections, in output-row order: ``{"qkv_proj": {"q": H*d,
    "k": KV*d, "v": KV*d}, "gate_up_proj": {"gate": I, "up": I}}``.

    The one place these sizes are computed: :class:`Phi3Attention` splits qkv_proj's output by it,
    :attr:`Phi3ForCausalLM.fused_splits` declares it, and :func:`lora.fused_splits` reads it from a
    Hugging Face ``Phi3Config`` (``config`` is either; head_dim and num_key_value_heads default as
    in Phi3Config).
    """
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return OrderedDict(
        qkv_proj=OrderedDict(q=heads * head_dim, k=kv_heads * head_dim, v=kv_heads * head_dim),
        gate_up_proj=OrderedDict(gate=config.intermediate_size, up=config.intermediate_size),
    )


def _merge_heads(out: Tensor) -> Tensor:
    """(b, H, s, d) -> (b, s, H·d), contiguous."""
    b, heads, s, d = out.shape
    return out.transpose(1, 2).reshape(b, s, heads * d)


class Phi3Attention(nn.Module):
    """Grouped-query self-attention with a fused qkv projection.

    qkv_proj's output rows are [q: H*d | k: KV*d | v: KV*d]; query head h reads key/value head
    h // (H / KV). Attention runs through ``F.scaled_dot_product_attention``.
    """

    def __init__(self, config: Phi3Config) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = cast(int, config.head_dim)  # resolved by Phi3Config.__post_init__
        self.attention_dropout = config.attention_dropout
        self.split_sizes = list(
            fused_layout(config)["qkv_proj"].values()
        )  # [q: H*d, k: KV*d, v: KV*d]
        self.qkv_proj = nn.Linear(config.hidden_size, sum(self.split_sizes), bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        attn: AttentionMask,
        past: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x (b, s, h) -> (b, s, h), and this layer's (keys, values) including the past, (b, KV, kv, d)."""
        b, s, _ = x.shape
        q, k, v = frozen_linear(self.qkv_proj, x).split(self.split_sizes, dim=-1)
        q = q.view(b, s, self.num_heads, self.head_dim).transpose(1, 2)  # (b, H, s, d)
        k = k.view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (b, KV, s, d)
        # contiguous: else v, saved for backward, is a view that keeps the whole fused qkv output alive
        v = v.view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2).contiguous()
        q, k = rotary(q, cos, sin), rotary(k, cos, sin)  # fused_ops: bitwise the composite
        if past is not None:
            k = torch.cat((past[0], k), dim=2)  # (b, KV, kv, d)
            v = torch.cat((past[1], v), dim=2)
        present = (k, v)
        dtype = q.dtype
        # fp32 where the CPU has no bf16 kernels (lora._matmul); else q, k, v, mask themselves
        q, k, v, mask = sdpa_inputs(q, k, v, attn.mask)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            # query head h reads kv head h // (H / KV), without copying k and v out to H heads
            enable_gqa=self.num_kv_heads != self.num_heads,
            attn_mask=mask,
            is_causal=attn.is_causal,
            dropout_p=self.attention_dropout if self.training else 0.0,
        ).to(dtype)  # (b, H, s, d)
        if attn.empty_rows is not None:
            out = out.masked_fill(attn.empty_rows, 0.0)
        # o_proj's input, kept by a LoRA o_proj: the same numbers as SDPA's output (kept by SDPA)
        # in another layout, so rebuilt from it in backward where a recompute.scope is open.
        out = recompute.recomputable(_merge_heads, out)
        return frozen_linear(self.o_proj, out), present


class Phi3MLP(nn.Module):
    """down_proj(up * silu(gate)), with gate_up_proj's output rows [gate: I | up: I]."""

    def __init__(self, config: Phi3Config) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        # up * silu(gate) of the (b, s, 2I) [gate | up] output, as one autograd function that
        # keeps only that output for backward (not up, gate and silu(gate) besides).
        # down_proj's input, kept by a LoRA down_proj, is recomputed from gate_up's output (which
        # SwiGLU keeps) in backward where a recompute.scope is open.
        up = frozen_linear(self.gate_up_proj, x)
        return frozen_linear(self.down_proj, recompute.recomputable(swiglu, up))


class Phi3DecoderLayer(nn.Module):
    """Pre-norm block: x + drop(attn(norm(x))), then x + drop(mlp(norm(x)))."""

    def __init__(self, config: Phi3Config) -> None:
        super().__init__()
        self.input_layernorm = Phi3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = Phi3Attention(config)
        self.resid_attn_dropout = nn.Dropout(config.resid_pdrop)
        self.post_attention_layernorm = Phi3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = Phi3MLP(config)
        self.resid_mlp_dropout = nn.Dropout(config.resid_pdrop)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        attn: AttentionMask,
        past: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        h, present = self.self_attn(self.input_layernorm(x), cos, sin, attn, past)
        x = x + self.resid_attn_dropout(h)
        x = x + self.resid_mlp_dropout(self.mlp(self.post_attention_layernorm(x)))
        return x, present


def _packed_document_mask(position_ids: Tensor, batch: int) -> Tensor | None:
    """(b|1, s) position ids that restart (a step other than +1) -> (b, 1, s, s) same-document mask, else None.

    transformers 5 infers packed documents this way when no attention mask and no cache are in play
    (see ``Phi3Model.forward``): each run of +1 steps is one document, and no row restarting means
    one document per row.
    """
    position_ids = position_ids.expand(batch, -1)
    step = torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1)
    document = (step != 1).cumsum(-1)  # (b, s): document index of each token
    if not bool(document[:, -1].any()):
        return None
    return document[:, None, :, None] == document[:, None, None, :]


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """A 2D padding mask (b, kv), nonzero = real token -> position ids (b, kv) counting real tokens.

    Each row's first real token gets 0, so a left-padded row is numbered as if it were alone;
    padding gets 0. This is what ``generate`` (ours and transformers') uses; the plain forward
    numbers every position 0..kv-1 instead. Slice the last q columns for a call that continues a
    cache.
    """
    real = attention_mask.to(dtype=torch.long)
    return (real.cumsum(-1) - 1).masked_fill(real == 0, 0)


def _trains(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` needs a gradient."""
    return any(p.requires_grad for p in module.parameters())


def _anchored(run):
    """``run`` for a reentrant checkpoint that also takes an empty ``anchor`` needing grad, which
    makes the checkpoint back-propagate into a segment whose inputs need no gradient; the segment
    itself never sees it. In the recomputation (grad on), when nothing in the segment turned out
    to train (adapters disabled, say), its output is tied to the anchor, so that backward has
    something to run (the reentrant kind refuses outputs that need no grad); the value is unused."""

    def segment(x, cos, sin, attn, past, anchor):
        out, present = run(x, cos, sin, attn, past)
        if torch.is_grad_enabled() and not out.requires_grad:
            out = out + anchor.sum()
        return out, present

    return segment


def _trimming_on_recompute(run):
    """``run`` for one checkpoint call that trims the C heap before each call but the first:
    the recomputation, which starts the segment's backward (the forward's trim is the caller's)."""
    calls = 0

    def segment(*args):
        nonlocal calls
        if calls:
            trim_heap()
        calls += 1
        return run(*args)

    return segment


class _HeapTrims(NamedTuple):
    """Where a Phi3Model forward trims the C heap (:meth:`Phi3Model._heap_trims`)."""

    checkpointed: bool  # every k-th checkpointed layer's forward and recomputation
    plain: bool  # the forward and the backward of each layer that is not checkpointed
    loss: bool  # before the final norm and the loss


def _trim_before_backward(grad: Tensor) -> None:
    """A gradient hook on a decoder layer's output: the layer's backward starts next."""
    trim_heap()


class Phi3Model(nn.Module):
    """Embedding, decoder layers and the final norm: input ids (b, s) -> hidden states (b, s, h)."""

    def __init__(self, config: Phi3Config) -> None:
        super().__init__()
        self.config = config
        pad = config.pad_token_id
        # As transformers: the pad row of the embedding gets no gradient (when the id is in the vocabulary).
        padding_idx = pad if isinstance(pad, int) and 0 <= pad < config.vocab_size else None
        self.embed_tokens = nn.Embedding(
            config.vocab_size, config.hidden_size, padding_idx=padding_idx
        )
        self.layers = nn.ModuleList(
            Phi3DecoderLayer(config) for _ in range(config.num_hidden_layers)
        )
        self.norm = Phi3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Phi3RotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.checkpoint_use_reentrant = False  # torch.utils.checkpoint's use_reentrant
        # With gradient_checkpointing: how many decoder layers, from the first, are checkpointed
        # (None: all). The rest keep their activations: faster, more memory.
        self.checkpoint_layers: int | None = None
        # Training without checkpointing a layer: recompute its cheap activations in backward
        # instead of keeping them (lora.models.recompute); off only to measure what it saves.
        self.recompute_cheap = True
        # Training on CPU: hand the C heap's free pages back to the system (lora._heap.trim_heap)
        # under gradient checkpointing before every ``release_heap_every``-th decoder layer's
        # forward (layers 0, k, 2k, ...) and recomputation (counted from the last, where backward
        # starts); in fp32 before the forward and the backward of every layer that is not
        # checkpointed; in both cases before the final norm and the loss. 0: never (to measure
        # what it saves; docs/performance.md, "Full-size Phi-3-mini" and "The fp32 peak").
        self.release_heap_every = 4
        # True where each decoder layer trims the heap itself just before it computes, forward
        # and recomputation (FSDP units gathered in place on CPU: lora.finetune.distributed):
        # the trims between layers then step aside (each would repeat one at once); the one
        # before the final norm and the loss stays.
        self.layers_release_heap = False
        # Training in bf16/fp16 on CPU: from the first training forward on, the C heap keeps the
        # pages of freed large tensors for the next step instead of unmapping them
        # (lora._heap.reuse_freed_pages; the whole process's setting): 8% a bf16 step at
        # Phi-3-mini's shapes. False: glibc's own setting stays (to measure what it saves).
        self.reuse_heap = True

    def _heap_trims(self, x: Tensor) -> _HeapTrims:
        """Where this forward, on hidden states ``x``, trims the C heap (``release_heap_every``):
        only training on CPU, outside torch.compile. Around each layer that is not checkpointed
        only in fp32: there the re-faulted pages cost ~2% of a step for a third of its working
        set; a bf16 step is ~4x faster and they cost ~11% (docs/performance.md, "The fp32 peak").
        Under ``layers_release_heap`` the trims between layers step aside; the loss's stays.
        A 16-bit training forward on CPU also makes the heap keep freed pages (``reuse_heap``).
        Under autocast the dtype that counts is autocast's (the layers compute in it)."""
        cpu_training = (
            self.training
            and torch.is_grad_enabled()
            and x.device.type == "cpu"
            and not torch.compiler.is_compiling()
        )
        # the dtype the layers compute in: autocast's where it is on (an fp32 model, bf16 steps)
        compute = autocast_dtype(x.device, x) or x.dtype
        if cpu_training and self.reuse_heap and compute in (torch.bfloat16, torch.float16):
            reuse_freed_pages()  # once per process; idempotent
        on = cpu_training and self.release_heap_every > 0
        plain = on and compute == torch.float32
        checkpointed = on and self.gradient_checkpointing
        between = not self.layers_release_heap
        return _HeapTrims(checkpointed and between, plain and between, plain or checkpointed)

    def _checkpointed(self, i: int) -> bool:
        return self.checkpoint_layers is None or i < self.checkpoint_layers

    def _resolve_use_cache(self, use_cache: bool | None) -> bool:
        """None -> ``config.use_cache``; then off while checkpointing a training step (as
        transformers: a layer recomputed in backward cannot also hand its keys and values out)."""
        if use_cache is None:
            use_cache = self.config.use_cache
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            use_cache = False
        return bool(use_cache)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool | None = None,
    ) -> tuple[Tensor, KVCache | None]:
        """See ``Phi3ForCausalLM.forward``. Returns hidden states (b, s, h) and the new cache (or None)."""
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(
                f"input_ids has shape {tuple(input_ids.shape)}; expected (batch, seq_len) with seq_len >= 1"
            )
        if past_key_values is not None and len(past_key_values) != len(self.layers):
            raise ValueError(
                f"past_key_values has {len(past_key_values)} layers; expected {len(self.layers)} (num_hidden_layers)"
            )
        batch, q_len = input_ids.shape
        device = input_ids.device
        past_len = past_key_values[0][0].shape[2] if past_key_values else 0

        use_cache = self._resolve_use_cache(use_cache)
        if position_ids is None:
            # As transformers' forward: every position is numbered, padding included (generate
            # passes left-padding-aware ones itself). Such ids never restart: never packing.
            position_ids = torch.arange(past_len, past_len + q_len, device=device)[None]
        else:
            position_ids = position_ids.to(device)
            if position_ids.dim() == 1:
                position_ids = position_ids[None]
            if position_ids.shape[-1] != q_len or position_ids.shape[0] not in (1, batch):
                raise ValueError(
                    f"position_ids has shape {tuple(position_ids.shape)}; "
                    f"expected (batch|1, seq_len) = ({batch}, {q_len})"
                )
            # transformers' rule: restarting ids are packed documents only when there is no mask and
            # no cache, neither given nor being built (use_cache resolved to False).
            if attention_mask is None and past_key_values is None and not use_cache:
                attention_mask = _packed_document_mask(position_ids, batch)

        x = self.embed_tokens(input_ids)  # (b, s, h)
        attn = build_attention_mask(
            attention_mask, batch, q_len, past_len, self.config.sliding_window, device
        )
        cos, sin = self.rotary_emb(position_ids)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)

        presents = []
        training = self.training and torch.is_grad_enabled()
        trims = self._heap_trims(x)
        every, last = self.release_heap_every, len(self.layers) - 1
        anchor: Tensor | None = None
        for i, layer in enumerate(self.layers):
            past = past_key_values[i] if past_key_values else None
            checkpointed = self.gradient_checkpointing and self.training and self._checkpointed(i)
            # A checkpointed layer's forward keeps only its input: every k-th trim suffices. One
            # that is not keeps its activations between its temporaries' holes: each is trimmed.
            if (trims.checkpointed and i % every == 0) or (trims.plain and not checkpointed):
                trim_heap()
            if checkpointed:
                run = keep_decoded_on_recompute(layer)  # 4-bit weights: 2 decodes a step, not 3
                if trims.checkpointed and (last - i) % every == 0:
                    run = _trimming_on_recompute(run)
                reentrant = self.checkpoint_use_reentrant
                if reentrant and training and not x.requires_grad:
                    # The reentrant kind only back-propagates into a segment whose tensor inputs
                    # need grad; with a frozen embedding x does not. Rather than make x need one
                    # (transformers' remedy: layer 0 would then compute an input gradient nobody
                    # uses, and keep what that needs), an empty tensor that needs grad goes in.
                    if not _trains(layer):  # nothing to back-propagate: nothing to checkpoint
                        x, present = layer(x, cos, sin, attn, past)
                    else:
                        if anchor is None:
                            anchor = torch.empty(0, device=device, requires_grad=True)
                        x, present = checkpoint(
                            _anchored(run), x, cos, sin, attn, past, anchor, use_reentrant=True
                        )
                else:
                    x, present = checkpoint(run, x, cos, sin, attn, past, use_reentrant=reentrant)
            else:
                # A layer that is not checkpointed keeps its activations for backward, less the
                # cheap ones it marks recomputable (lora.models.recompute).
                with recompute.scope(training and self.recompute_cheap):
                    x, present = layer(x, cos, sin, attn, past)
                if trims.plain and x.requires_grad:
                    x.register_hook(_trim_before_backward)  # runs before this layer's backward
            if use_cache:
                presents.append(present)
        if trims.loss:
            trim_heap()  # before the loss: the last layer's temporaries are free
        return self.norm(x), (tuple(presents) if use_cache else None)


# ----------------------------------------------------------------------------------------------
# The causal language model
# ----------------------------------------------------------------------------------------------


@dataclass
class CausalLMOutput:
    """What ``Phi3ForCausalLM.forward`` returns.

    loss: scalar fp32 mean cross-entropy over counted labels, or None without labels.
    logits: (b, s, V) in the model's dtype (the last ``logits_to_keep`` positions if set); None when
        labels are given, unless ``return_logits=True``.
    past_key_values: the KV cache including this call's tokens when ``use_cache``, else None.
    """

    loss: Tensor | None = None
    logits: Tensor | None = None
    past_key_values: KVCache | None = None


def _resolve_dtype(dtype: torch.dtype | str | None, config: Phi3Config) -> torch.dtype:
    """dtype argument -> torch.dtype: a dtype, a name ("bfloat16", "torch.float16", "auto"), or None / "auto"
    for the config's ``dtype`` / ``torch_dtype``, else float32."""
    if dtype is None or dtype == "auto":
        dtype = config.dtype or config.torch_dtype or "float32"
        if dtype == "auto":
            dtype = "float32"
    resolved = (
        dtype
        if isinstance(dtype, torch.dtype)
        else getattr(torch, str(dtype).removeprefix("torch."), None)
    )
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(
            f"dtype={dtype!r}; expected a floating torch.dtype or its name, e.g. torch.bfloat16 or 'bfloat16'"
        )
    return resolved


_ROW_MULTIPLE = 16
_SOFTMAX_BLOCK_ELEMENTS = 1 << 20  # 4 MiB of fp32 per block of rows in the loss's softmax


class _LinearCrossEntropy(torch.autograd.Function):
    """Σ cross_entropy(hidden Wᵀ, targets) for a frozen W, in row chunks: the gradient for hidden is
    computed chunk by chunk in forward (softmax − one-hot, times W) and kept, (N, h); the (N, V)
    logits never exist at once and backward only scales the kept gradient."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int) -> Tensor:
        n = hidden.shape[0]
        want_grad = hidden.requires_grad
        grad = torch.empty_like(hidden) if want_grad else None
        # The loss in fp32 for bf16/fp16 (as the plain path's .float()), else in hidden's dtype.
        acc = torch.float32 if hidden.dtype in (torch.bfloat16, torch.float16) else hidden.dtype
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for start in range(0, n, chunk):
            rows = slice(start, min(start + chunk, n))
            c = rows.stop - start
            h = hidden[rows]
            # A row count that is not a multiple of 16 runs the CPU's bf16 matmul ~12% slower
            # (1022 rows: 365 against 412 GFLOP/s): zero rows pad the chunk, and are dropped.
            pad = -c % _ROW_MULTIPLE if c > _ROW_MULTIPLE else 0
            if pad:
                h = torch.cat((h, h.new_zeros(pad, h.shape[1])))
            logits = linear(h, weight)  # (c + pad, V), hidden's dtype
            tgt = targets[rows]
            picked = logits[:c].gather(1, tgt[:, None]).squeeze(1).to(acc)
            # Softmax a block of rows at a time, in fp32 for 16-bit (as the plain path's
            # .float()), into the logits themselves: a block's fp32 copy stays in the CPU's cache
            # instead of a (c + pad, V) fp32 temporary (a 512-row bf16 chunk of Phi-3's head:
            # 160 against 127 ms, on a CPU with AMX); every op is a row's own, so the result does
            # not depend on the block size.
            on_cpu = logits.device.type == "cpu"  # elsewhere one block: no extra kernel launches
            step = max(1, _SOFTMAX_BLOCK_ELEMENTS // logits.shape[1]) if on_cpu else max(c, 1)
            for b in range(0, c, step):
                view = logits[b : min(b + step, c)]
                blk = view.to(acc)  # a copy for 16-bit; the rows themselves otherwise
                # torch.logsumexp's own ops (max, exp of the difference, sum, log, + max; bitwise
                # its result), in place
                top = blk.amax(dim=-1, keepdim=True)
                top.masked_fill_(top.abs() == math.inf, 0.0)
                sums = blk.sub_(top).exp_().sum(-1)  # blk now holds exp(logit - max)
                lse = sums.log().add_(top.squeeze(1))
                total += (lse - picked[b : b + blk.shape[0]]).sum()
                if want_grad:  # softmax minus the one-hot, rounded once to hidden's dtype
                    blk.div_(sums[:, None])
                    blk[
                        torch.arange(blk.shape[0], device=blk.device), tgt[b : b + blk.shape[0]]
                    ] -= 1.0
                    if blk.data_ptr() != view.data_ptr():
                        view.copy_(blk)
            if want_grad:
                assert grad is not None
                if pad:
                    logits[c:] = 0.0
                    grad[rows] = mm(logits, weight)[:c]
                else:
                    mm(logits, weight, out=grad[rows])
            del logits
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor):
        if torch.is_grad_enabled():  # backward(create_graph=True): the kept gradient is a constant
            raise RuntimeError(
                "linear_cross_entropy is not twice differentiable (create_graph=True would give a "
                "silently wrong second derivative); set model.chunked_loss = False for it"
            )
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None, None


def loss_chunk_rows(dtype: torch.dtype) -> int:
    """How many rows of logits :func:`linear_cross_entropy` forms at a time in a Phi-3 loss:
    512 for a 16-bit model, 256 otherwise. The chunk's logits are in the model's dtype (the loss
    is computed in fp32, a few rows at a time): 64 KiB a row at Phi-3's vocabulary in bf16, 128 in
    fp32, so 32 MiB either way. A bf16 head's GEMMs
    run faster at 512 rows (a bf16 step at Phi-3-mini's shapes, every token labelled: 4.5%
    faster than at 256, 3% at 1024, on a CPU with AMX); an fp32 step gained nothing measurable
    from 512 rows (docs/performance.md, "The heap's freed pages reused, and the loss's
    chunk")."""
    return 512 if dtype in (torch.bfloat16, torch.float16) else 256


def linear_cross_entropy(
    hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int = 256
) -> Tensor:
    """``F.cross_entropy(hidden @ weight.T, targets, reduction="sum")`` (in fp32) for a frozen
    ``weight`` (V, h), with hidden (N, h) and targets (N,), chunk rows at a time: peak memory one
    (chunk, V) block instead of (N, V). The gradient flows to ``hidden`` only; it is formed in
    forward (when hidden requires grad) and scaled by whatever multiplies the loss afterwards.

    Raises:
        RuntimeError: in backward with ``create_graph=True`` (not twice differentiable)."""
    if targets.numel() == 0:
        return hidden.sum() * 0.0
    dtype = autocast_dtype(hidden.device, hidden, weight)
    if dtype is not None:  # the logits in autocast's dtype, as autocast's lm_head would give them
        with torch.autocast(hidden.device.type, enabled=False):
            # the weight's cast is a transient: only forward multiplies by it
            return _LinearCrossEntropy.apply(hidden.to(dtype), weight.to(dtype), targets, chunk)
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk)


def _fsdp_unit(module: nn.Module) -> bool:
    """Whether ``module`` is an FSDP2 unit (``fully_shard``: an ``FSDPModule``). Nothing is
    imported for it: without torch.distributed.fsdp imported, no module can be one."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(module, fsdp.FSDPModule)


def _plain_linear(module: nn.Module) -> bool:
    """A torch ``nn.Linear`` itself, or one that FSDP2 made a unit of its own (``fully_shard``
    swaps its class for ``FSDPLinear(FSDPModule, nn.Linear)``: the same forward and weight)."""
    cls = type(module)
    return cls is nn.Linear or (cls.__bases__[-1:] == (nn.Linear,) and _fsdp_unit(module))


@contextlib.contextmanager
def _whole_weight(linear: nn.Linear) -> Iterator[Tensor]:
    """``linear.weight`` whole, for the block. An FSDP2 unit holds only its shard between its
    forwards: it is gathered here (``unshard``, FSDP's own all-gather: what its forward would
    gather) and resharded when the block ends, error or not. Only the chunked loss's forward
    reads the weight (its backward scales the gradient it kept), so the unit is not gathered in
    backward, and it is gathered alone: the layer before it was resharded after its forward.
    A unit found gathered already (its weight no DTensor shard) is used and left as it is."""
    if not (_fsdp_unit(linear) and hasattr(linear.weight, "to_local")):
        yield linear.weight
        return
    linear.unshard()  # type: ignore[operator]
    try:
        yield linear.weight
    finally:
        linear.reshard()  # type: ignore[operator]


class Phi3ForCausalLM(nn.Module):
    """Phi-3 decoder with a language-model head: ``model`` (Phi3Model) and ``lm_head``.

    Build from a config (weights drawn from N(0, initializer_range), norms at 1) or load a checkpoint
    directory with ``from_pretrained``. With ``tie_word_embeddings`` (Phi-4-mini) ``lm_head.weight``
    is the embedding matrix itself.

    ``chunked_loss`` (default True): with labels and a frozen plain ``lm_head`` (an ``nn.Linear``
    without bias, an FSDP2 unit of its own too), the loss runs through
    :func:`linear_cross_entropy`, a few hundred rows of logits at a time
    (:func:`loss_chunk_rows`), never the whole (N, V) logits;
    ``model.chunked_loss = False`` takes the plain ``F.cross_entropy`` over full logits. A LoRA or
    modules_to_save (trained) head takes the plain path.
    """

    chunked_loss: bool = True

    def __init__(self, config: Phi3Config) -> None:
        super().__init__()
        self.config = config
        self.model = Phi3Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        self.tie_weights()

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, Phi3RMSNorm):
            nn.init.ones_(module.weight)

    # -- small API ------------------------------------------------------------------------------

    def tie_weights(self) -> None:
        """With ``config.tie_word_embeddings``: make ``lm_head.weight`` the embedding Parameter. Else a no-op.

        On a model with modules_to_save wrappers (``lora.inject``) the base modules are tied (each
        wrapper's ``original_module``); the adapters' trained copies are left as they are."""
        if self.config.tie_word_embeddings:
            head = getattr(self.lm_head, "original_module", self.lm_head)
            embed = getattr(self.model.embed_tokens, "original_module", self.model.embed_tokens)
            head.weight = embed.weight

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Number of parameters, tied ones counted once (works on the meta device)."""
        skip = (
            {id(self.model.embed_tokens.weight), id(self.lm_head.weight)}
            if exclude_embeddings
            else set()
        )
        return sum(
            p.numel()
            for p in self.parameters()
            if id(p) not in skip and (p.requires_grad or not only_trainable)
        )

    @property
    def fused_splits(self) -> OrderedDict[str, OrderedDict[str, int]]:
        """Slices of the fused projections, in output-row order: ``{"qkv_proj": {"q": H*d, "k": KV*d, "v": KV*d},
        "gate_up_proj": {"gate": I, "up": I}}``. A surgery pass uses it to adapt e.g. ``"qkv_proj[q,v]"``."""
        return fused_layout(self.config)

    @property
    def gradient_checkpointing(self) -> bool:
        """Whether decoder layers recompute activations in backward (only while ``self.training``)."""
        return self.model.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        self.model.gradient_checkpointing = bool(value)

    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs: dict | None = None, *, layers: int | None = None
    ):
        """Checkpoint decoder layers with ``torch.utils.checkpoint`` while training.

        ``gradient_checkpointing_kwargs``: ``{"use_reentrant": bool}`` (default False, the kind
        torch recommends), as transformers takes it. Both give the same gradients.

        ``layers``: checkpoint only the first ``layers`` decoder layers (None: all of them, as
        transformers does). Each layer left out keeps its activations for backward (about 68 KiB
        a token in bf16 at Phi-3-mini's size, with the cheap ones recomputed) and saves its
        forward's recomputation (a third of its step time): a dial between memory and speed.
        The first layers are the ones checkpointed because backward reaches them last, when the
        other layers' activations are already freed.

        Raises:
            ValueError: another key, a use_reentrant that is not a bool, ``layers`` not a
                non-negative int or None.
        """
        kwargs = dict(gradient_checkpointing_kwargs or {})
        reentrant = kwargs.pop("use_reentrant", False)
        if kwargs or not isinstance(reentrant, bool):
            raise ValueError(
                f"gradient_checkpointing_kwargs={gradient_checkpointing_kwargs!r}; expected at "
                "most {'use_reentrant': True or False}"
            )
        check_checkpoint_layers(layers, "layers")
        self.model.checkpoint_use_reentrant = reentrant
        self.model.checkpoint_layers = layers
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.gradient_checkpointing = False

    # -- forward and loss -------------------------------------------------------------------------

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        labels: Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool | None = None,
        *,
        return_logits: bool = False,
        logits_to_keep: int = 0,
        num_items_in_batch: int | Tensor | None = None,
    ) -> CausalLMOutput:
        """Run the model on input_ids (b, s).

        Args:
            attention_mask: 2D (b, past + s) padding mask (nonzero = real token), or 4D bool
                (b|1, 1, s, past + s) with True = may attend (packed documents). The causal mask and the
                sliding window are always ANDed on top.
            position_ids: (b|1, s). None: past + arange(s) for every row, padding included (as
                transformers' forward; for left-padding-aware ids pass
                ``position_ids_from_mask(mask)``, which ``generate`` does). Ids that restart (a step
                other than +1, e.g. [0 1 2 0 1]) mark packed documents that do not see each other
                exactly when transformers 5 infers them: no attention_mask, no past_key_values and
                use_cache resolved to False.
            labels: (b, s) token ids, -100 = ignored. Position t predicts labels[t + 1]. The loss is the
                fp32 mean cross-entropy over counted labels (0.0 when none counts), and lm_head then runs
                only at the counted positions: ``logits`` is None unless ``return_logits=True``.
            past_key_values: a cache returned by a previous call with ``use_cache=True``.
            use_cache: return the cache, extended by this call's keys and values. None (the
                default): ``config.use_cache`` (True unless the config says otherwise), as
                transformers. Always False in a training step under gradient checkpointing. Pass
                False in training and evaluation loops: a returned cache keeps every layer's keys
                and values alive.
            return_logits: with labels, also compute the full logits.
            logits_to_keep: >0: logits only for the last that many positions (generation); 0: all.
            num_items_in_batch: divide the summed loss by this instead of this batch's counted labels
                (gradient accumulation over micro-batches).

        Raises:
            ValueError: inputs of the wrong shape (the message names the argument, its shape and the
            expected one); TypeError: a 4D attention_mask that is not bool.
        """
        hidden, cache = self.model(
            input_ids, attention_mask, position_ids, past_key_values, use_cache
        )
        loss = logits = None
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(
                    f"labels has shape {tuple(labels.shape)}; expected input_ids' shape {tuple(input_ids.shape)}"
                )
            loss = self._loss(hidden, labels.to(hidden.device), num_items_in_batch)
        if labels is None or return_logits:
            if logits_to_keep > 0:
                # contiguous: for a strided (b, k, h) slice and a weight that needs no grad (any
                # frozen or LoRA-wrapped head), torch's matmul takes a batched path that copies
                # the whole weight, expanded to (b, h, V), on every call (1.3 s at Phi-3's head
                # for b = 2), where the contiguous slice folds into one (b·k, h) matmul.
                hidden = hidden[:, -logits_to_keep:].contiguous()
            logits = frozen_linear(self.lm_head, hidden)
        return CausalLMOutput(loss=loss, logits=logits, past_key_values=cache)

    def _loss(
        self, hidden: Tensor, labels: Tensor, num_items_in_batch: int | Tensor | None
    ) -> Tensor:
        """Cross-entropy with lm_head run only where a label counts: (N, h) -> (N, V) instead of (b, s, V)."""
        targets = labels[:, 1:]  # (b, s-1): position t predicts token t+1
        counted = targets != IGNORE_INDEX
        head = self.lm_head
        if (
            self.chunked_loss
            and _plain_linear(head)
            and head.bias is None
            and not head.weight.requires_grad
            and not torch.compiler.is_compiling()
        ):
            # A frozen plain head, chunked, never the whole (N, V) logits: exact to round-off
            # (tests/test_chunked_loss.py), faster and smaller (docs/performance.md).
            with _whole_weight(head) as weight:
                rows = loss_chunk_rows(
                    autocast_dtype(hidden.device, hidden, weight) or hidden.dtype
                )
                total = linear_cross_entropy(
                    hidden[:, :-1][counted], weight, targets[counted], chunk=rows
                )
        else:
            logits = head(hidden[:, :-1][counted]).float()  # (N, V)
            total = F.cross_entropy(logits, targets[counted], reduction="sum")
        denominator = (
            counted.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        )
        return total / denominator

    # -- generation -------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        attention_mask: Tensor | None = None,
        generator: torch.Generator | None = None,
        pad_token_id: int | None = None,
    ) -> Tensor:
        """Extend input_ids (b, s) by up to max_new_tokens tokens with the KV cache; returns (b, s + n).

        temperature 0 is greedy (argmax); > 0 samples from softmax(logits / temperature), restricted to
        the top_k tokens and/or the smallest set whose probability reaches top_p. A row stops at any of
        eos_token_id (None: never stops early); after that it is filled with pad_token_id (default:
        config.pad_token_id, else the first eos id). Generation ends when every row has stopped.
        attention_mask (b, s) marks left padding of a batch of prompts; positions then count each
        row's real tokens (``position_ids_from_mask``), so a padded row generates what it would
        alone. Runs in eval mode (restored afterwards) and without autograd. Under longrope, once
        the sequence grows past original_max_position_embeddings the cache (built with the short
        factors) is recomputed once with the long ones, as transformers does.

        Raises:
            ValueError: a bad argument (named, with its value and what was expected).
        """
        if input_ids.dim() != 2:
            raise ValueError(
                f"input_ids has shape {tuple(input_ids.shape)}; expected (batch, seq_len)"
            )
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens}; expected >= 0")
        if temperature < 0:
            raise ValueError(f"temperature={temperature}; expected 0 (greedy) or > 0")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k={top_k}; expected None or >= 1")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p={top_p}; expected None or in (0, 1]")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}; "
                f"expected input_ids' shape {tuple(input_ids.shape)}"
            )
        eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
        if pad_token_id is None:
            pad_token_id = (
                self.config.pad_token_id
                if self.config.pad_token_id is not None
                else (eos[0] if eos else 0)
            )
        device = input_ids.device
        eos_ids = torch.tensor(eos, dtype=torch.long, device=device)
        rope = self.config.rope
        switch_at = rope.original_max_position_embeddings if rope.rope_type == "longrope" else None

        was_training = self.training
        self.eval()
        try:
            sequences = input_ids
            finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=device)
            cache: KVCache | None = None
            cache_is_long = False
            for _ in range(max_new_tokens):
                total = sequences.shape[1]
                if (
                    cache is not None
                    and switch_at is not None
                    and not cache_is_long
                    and total > switch_at
                ):
                    cache = None  # keys were rotated with the short factors: recompute them all
                step_ids = sequences if cache is None else sequences[:, cache[0][0].shape[2] :]
                # Left padding: each row's positions count its real tokens (as transformers')
                mask = attention_mask
                positions = None if mask is None else position_ids_from_mask(mask)
                out = self(
                    step_ids,
                    attention_mask=attention_mask,
                    position_ids=None if positions is None else positions[:, -step_ids.shape[1] :],
                    past_key_values=cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
                cache = out.past_key_values
                cache_is_long = switch_at is not None and total > switch_at
                next_token = self._pick(
                    out.logits[:, -1].float(), temperature, top_k, top_p, generator
                )
                next_token = torch.where(
                    finished, torch.full_like(next_token, pad_token_id), next_token
                )
                sequences = torch.cat((sequences, next_token[:, None]), dim=1)
                if attention_mask is not None:
                    attention_mask = torch.cat(
                        (attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)), dim=1
                    )
                if eos:
                    finished = finished | torch.isin(next_token, eos_ids)
                    if bool(finished.all()):
                        break
            return sequences
        finally:
            self.train(was_training)

    @staticmethod
    def _pick(
        logits: Tensor,
        temperature: float,
        top_k: int | None,
        top_p: float | None,
        generator: torch.Generator | None,
    ) -> Tensor:
        """(b, V) fp32 logits -> (b,) next token ids."""
        if temperature == 0:
            return logits.argmax(dim=-1)
        logits = logits / temperature
        if top_k is not None and top_k < logits.shape[-1]:
            kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p is not None and top_p < 1.0:
            sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
            probs = sorted_logits.softmax(dim=-1)
            # drop a token when the more likely ones alone already reach top_p (the top one always stays)
            drop = probs.cumsum(dim=-1) - probs >= top_p
            logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
        probs = logits.softmax(dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)

    # -- checkpoint directories -------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        quantize: str | None = None,
    ) -> Phi3ForCausalLM:
        """Load a checkpoint directory: config.json plus model.safetensors, or shards listed in
        model.safetensors.index.json. Never unpickles.

        The model is built on the meta device and each tensor is read, cast and assigned one at a time,
        so peak memory is about one copy of the weights. dtype: None (or "auto") takes the config's
        ``dtype`` / ``torch_dtype``, else float32; a torch.dtype or its name ("bfloat16") forces one.
        device: default "cpu". Rope frequencies are computed after loading. A tied config ignores a
        checkpoint's lm_head.weight. Returns the model in eval mode, parameters requiring grad.
        quantize: None, or ``"nf4"`` to store every Linear weight but the head as 4-bit NF4,
        quantised as each tensor is read (see docs/qlora.md); ``dtype`` is then the compute dtype.

        Raises:
            FileNotFoundError: no config.json or no safetensors weights in ``path``.
            CheckpointError: tensors missing, unexpected or of the wrong shape (all named), checked
                from the file headers before any weight is read.
        """
        path = Path(path)
        config = Phi3Config.from_json_file(ckpt.require_file(path, ckpt.CONFIG_NAME))
        # The config is checked against the weights' headers before anything is built: a config
        # claiming a million layers must not build them for minutes before the shapes disagree.
        _check_config_against_tensors(config, ckpt.tensor_shapes(path), path)
        dtype = _resolve_dtype(dtype, config)
        device = torch.device(device if device is not None else "cpu")
        with torch.device("meta"):
            model = cls(config)
        skip = {"lm_head.weight"} if config.tie_word_embeddings else set()
        assign = None
        if quantize is not None:  # quantise on read: never the whole model in 16 bits
            from lora.quant import quantizing_assign

            assign = quantizing_assign(model, quantize)
        ckpt.load_into(
            model,
            path,
            dtype=dtype,
            device=device,
            skip=skip,
            ignore_unexpected=(
                r"(^|\.)rotary_emb\.inv_freq$",
            ),  # frequencies some old checkpoints stored
            assign=assign,
        )
        model.tie_weights()
        model.model.rotary_emb.reset_buffers(device)
        model.name_or_path = str(path)  # type: ignore[assignment]  # what save_adapter records
        return model.eval()

    def save_pretrained(
        self, path: str | os.PathLike, max_shard_size: int | str = "5GB"
    ) -> list[Path]:
        """Write config.json and the weights as safetensors, in transformers' layout: one
        model.safetensors, or model-0000i-of-0000n.safetensors shards plus model.safetensors.index.json
        when the weights exceed max_shard_size (bytes, or "2GB" / "500MB" / "2GiB"). Every file is
        written atomically; weight files of an earlier save that the new one does not use are removed.
        A tied lm_head.weight is not written (as transformers). Returns the weight files written.
        """
        from lora.quant import quantized_modules

        if quantized_modules(self):  # its state dict would hold 4-bit parts no reader expects
            raise ValueError(
                "save_pretrained: the model's Linear weights are 4-bit NF4; call lora.dequantize(model) "
                "(or lora.merge_and_unload) first to write a normal checkpoint"
            )
        state = self.state_dict()
        if self.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
        written = ckpt.save_state_dict(state, path, max_shard_size=max_shard_size)
        config = self.config.to_dict()
        if len(dtypes) == 1:
            name = str(dtypes.pop()).removeprefix("torch.")
            config["torch_dtype"] = name
            if "dtype" in config:
                config["dtype"] = name
        config.setdefault("architectures", ["Phi3ForCausalLM"])
        atomic_write_json(Path(path) / ckpt.CONFIG_NAME, config)
        return written


# --- config checks (types when read; against the checkpoint before building) ----------------
_INT_OR_NONE = (
    "num_key_value_heads",
    "head_dim",
    "original_max_position_embeddings",
    "sliding_window",
    "bos_token_id",
    "pad_token_id",
)
_REAL = {
    "rms_norm_eps": (0.0, None, False),
    "rope_theta": (0.0, None, False),
    "resid_pdrop": (0.0, 1.0, True),
    "embd_pdrop": (0.0, 1.0, True),
    "attention_dropout": (0.0, 1.0, True),
    "initializer_range": (0.0, None, True),
}
_BOOL = ("tie_word_embeddings", "use_cache")
_STR_OR_NONE = ("torch_dtype", "dtype")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_field_types(c: Phi3Config) -> None:
    """Every known key's type, so that a bad value fails when config.json is read, naming the key,
    not at the first forward pass."""
    for key in _INT_OR_NONE:
        v = getattr(c, key)
        if v is not None and not _is_int(v):
            raise ValueError(f"Phi3Config: {key}={v!r}; expected an int or null")
    for key, (low, high, low_ok) in _REAL.items():
        v = getattr(c, key)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        ok = ok and (v >= low if low_ok else v > low) and (high is None or v < high)
        if not ok:
            bound = f"{'>=' if low_ok else '>'} {low}"
            bound += f" and < {high}" if high is not None else ""
            raise ValueError(f"Phi3Config: {key}={v!r}; expected a finite number {bound}")
    if c.partial_rotary_factor is not None:
        v = c.partial_rotary_factor
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
            raise ValueError(
                f"Phi3Config: partial_rotary_factor={v!r}; expected a number in (0, 1] or null"
            )
    for key in _BOOL:
        if not isinstance(getattr(c, key), bool):
            raise ValueError(f"Phi3Config: {key}={getattr(c, key)!r}; expected true or false")
    for key in _STR_OR_NONE:
        v = getattr(c, key)
        if v is not None and not isinstance(v, str):
            raise ValueError(
                f"Phi3Config: {key}={v!r}; expected a dtype name such as 'bfloat16', or null"
            )
    for key in ("rope_scaling", "rope_parameters"):
        v = getattr(c, key)
        if v is not None and not isinstance(v, dict):
            raise ValueError(f"Phi3Config: {key}={v!r}; expected a dict or null")
    eos = c.eos_token_id
    eos_ok = eos is None or _is_int(eos) or (isinstance(eos, list) and all(map(_is_int, eos)))
    if not eos_ok:
        raise ValueError(
            f"Phi3Config: eos_token_id={eos!r}; expected an int, a list of ints, or null"
        )
    if not isinstance(c.hidden_act, str) or not isinstance(c.model_type, str):
        bad = "hidden_act" if not isinstance(c.hidden_act, str) else "model_type"
        raise ValueError(f"Phi3Config: {bad}={getattr(c, bad)!r}; expected a string")


def _check_config_against_tensors(
    config: Phi3Config, shapes: dict[str, tuple[int, ...]], path
) -> None:
    """The config keys that size the model agree with the checkpoint's tensor headers.

    Raises ``CheckpointError`` naming the key, its value and what the tensors say.
    """
    problems = []
    layers = {
        int(name.split(".")[2])
        for name in shapes
        if name.startswith("model.layers.") and name.split(".")[2].isdigit()
    }
    found = max(layers) + 1 if layers else 0
    if config.num_hidden_layers != found:
        problems.append(
            f"num_hidden_layers={config.num_hidden_layers}, but the weights hold {found} layers"
        )
    embed = shapes.get("model.embed_tokens.weight")
    if embed is not None and embed != (config.vocab_size, config.hidden_size):
        problems.append(
            f"vocab_size={config.vocab_size}, hidden_size={config.hidden_size}, but "
            f"model.embed_tokens.weight is {embed}"
        )
    down = shapes.get("model.layers.0.mlp.down_proj.weight")
    if down is not None and down != (config.hidden_size, config.intermediate_size):
        problems.append(
            f"intermediate_size={config.intermediate_size}, but "
            f"model.layers.0.mlp.down_proj.weight is {down}"
        )
    if problems:
        raise ckpt.CheckpointError(
            f"{Path(path) / ckpt.CONFIG_NAME} does not match the weights: " + "; ".join(problems)
        )
