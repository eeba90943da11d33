"""LoRA for dense layers: :class:`Linear` and the fused-projection :class:`MergedLinear`."""

from __future__ import annotations

import math
import operator
import warnings
from collections.abc import Callable, Sequence
from typing import cast

import torch
from torch import Tensor, nn

from .. import functional as LF
from .base import LoRALayer, alpha_for_slices

__all__ = ["Linear", "MergedLinear", "is_gpt2_conv1d", "stores_in_out"]


def is_gpt2_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' GPT-2 ``Conv1D``: a linear layer storing its weight
    as (in, out)."""
    return (
        type(module).__name__ == "Conv1D"
        and hasattr(module, "nf")
        and getattr(module, "weight", None) is not None
    )


def stores_in_out(module: nn.Module, fan_in_fan_out: bool = False, *, warn: bool = True) -> bool:
    """Whether ``module`` stores its weight as (in, out): what its type says where it says
    (a LoRA Linear/MergedLinear its own ``fan_in_fan_out``, a torch ``nn.Linear`` no, GPT-2's
    Conv1D yes), else ``fan_in_fan_out`` (a layer of another type with an (in, out) weight).

    ``fan_in_fan_out=True`` for a torch ``nn.Linear`` would read its (out, in) weight transposed:
    wrong outputs (an error only where in != out). It is set right, with a warning (unless
    ``warn=False``) as PEFT does, so a config written for GPT-2 still adapts the model's plain
    linear layers correctly."""
    if isinstance(module, _LinearBase):
        return module.fan_in_fan_out
    if is_gpt2_conv1d(module):
        return True
    if isinstance(module, nn.Linear):
        if fan_in_fan_out and warn:
            warnings.warn(
                f"fan_in_fan_out=True: ignored for {type(module).__name__}, a torch nn.Linear, whose "
                "weight is stored (out_features, in_features); using fan_in_fan_out=False "
                "(True is for layers storing (in, out), as GPT-2's Conv1D)",
                stacklevel=3,
            )
        return False
    return bool(fan_in_fan_out)


class _LinearBase(LoRALayer, nn.Linear):
    """What Linear and MergedLinear share: ``fan_in_fan_out`` storage and the base forward."""

    fan_in_fan_out: bool = False

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        """A plain ``nn.Linear`` (not a LoRA layer), GPT-2's Conv1D, or a Linear/MergedLinear."""
        if isinstance(module, _LinearBase):
            return True
        plain = isinstance(module, nn.Linear) and not isinstance(module, LoRALayer)
        return plain or is_gpt2_conv1d(module)

    @staticmethod
    def linear_dims(module: nn.Module, fan_in_fan_out: bool = False) -> tuple[int, int]:
        """``(in_features, out_features)`` of a linear-like module (GPT-2's Conv1D: (in, out))."""
        if isinstance(module, _LinearBase):
            return module.in_features, module.out_features
        fifo = stores_in_out(module, fan_in_fan_out, warn=False)  # from_base is what warns
        rows, cols = cast(Tensor, module.weight).shape
        return (rows, cols) if fifo else (cols, rows)

    @classmethod
    def peft_shapes(
        cls,
        module: nn.Module,
        r: int,
        fan_in_fan_out: bool = False,
        enable_lora: tuple[bool, ...] = (),
    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        # A sliced adapter is written as the one LoRA over the fused matrix: rank r·k.
        in_f, out_f = cls.linear_dims(module, fan_in_fan_out)
        rank = r * sum(enable_lora) if enable_lora else r
        return (rank, in_f), (out_f, rank)

    @classmethod
    def _over_base(
        cls, base: nn.Module, fan_in_fan_out: bool, lora_dtype, init_lora_weights: bool, **options
    ):
        # from_base's work for both kinds: shapes and layout read from ``base`` (stores_in_out),
        # built on meta, then given base's weight and bias (_adopt_base).
        fan_in_fan_out = stores_in_out(base, fan_in_fan_out)
        in_f, out_f = cls.linear_dims(base, fan_in_fan_out)
        build = cast(Callable[..., _LinearBase], cls)  # Linear's or MergedLinear's __init__
        layer = build(
            in_f,
            out_f,
            fan_in_fan_out=fan_in_fan_out,
            bias=False,
            device="meta",
            dtype=cast(Tensor, base.weight).dtype,
            **options,
        )
        return layer._adopt_base(base, lora_dtype, init_lora_weights)

    def _plain_like(self) -> nn.Module:
        return nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device="meta",
            dtype=self.weight.dtype,
        )

    def _store_fan_in_fan_out(self, fan_in_fan_out: bool) -> None:
        # GPT-2's Conv1D checkpoints store the weight as (in, out); keep that layout so they load.
        self.fan_in_fan_out = bool(fan_in_fan_out)
        if self.fan_in_fan_out:
            self.weight = nn.Parameter(
                self.weight.detach().T.contiguous(), requires_grad=self.weight.requires_grad
            )

    def reset_parameters(self) -> None:
        """Re-initialise the base weight (as nn.Linear does) and the LoRA parameters (A Kaiming, B zero)."""
        if self.fan_in_fan_out:
            # Initialise through the (out, in) view so the fan-in is in_features, as for nn.Linear.
            nn.init.kaiming_uniform_(self.weight.T, a=math.sqrt(5))
            if self.bias is not None:
                bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
                nn.init.uniform_(self.bias, -bound, bound)
        else:
            nn.Linear.reset_parameters(self)
        self.reset_lora_parameters()

    def _base_forward(self, x: Tensor) -> Tensor:
        return LF.base_linear(x, self.weight, self.bias, self.fan_in_fan_out)

    def _dense_lora_B(self) -> Tensor:
        # (out, r) for a fused layer whose compact B is given as blocks (MergedLinear).
        raise NotImplementedError(f"{type(self).__name__} has no fused adapter blocks")

    def _lora_forward(self, x: Tensor, blocks=None) -> Tensor:
        # The fused autograd function when the dropout is plain (or none); any other dropout
        # module (a user's own) goes through the composite path, which calls it.
        drop = self.lora_dropout
        if isinstance(drop, nn.Identity) or type(drop) is nn.Dropout:
            p = drop.p if isinstance(drop, nn.Dropout) and drop.training else 0.0
            return LF.lora_linear_fused(
                x,
                self.weight,
                self.bias,
                self.lora_A,
                self.lora_B,
                self.scaling,
                p,
                self.fan_in_fan_out,
                blocks=blocks,
            )
        lora_B = self.lora_B if blocks is None else self._dense_lora_B()
        return LF.lora_linear(
            x, self.weight, self.bias, self.lora_A, lora_B, self.scaling, drop, self.fan_in_fan_out
        )


class Linear(_LinearBase):
    """``nn.Linear`` with a low-rank update: ``y = x (W + s·B A)ᵀ + b``.

    Args:
        in_features, out_features, bias, device, dtype: as ``nn.Linear``.
        r: rank (0 means a plain ``nn.Linear``: no LoRA parameters, weight trainable).
        lora_alpha: ``scaling = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``).
        lora_dropout: dropout on the adapter's input, p in [0, 1).
        fan_in_fan_out: store ``weight`` as (in, out), as GPT-2's Conv1D does.
        merge_weights: merge on ``eval()`` and unmerge on ``train()`` (loralib's behaviour).

    Parameters: ``weight`` (out, in), ``bias`` (out,), ``lora_A`` (r, in), ``lora_B`` (out, r).
    A is Kaiming-uniform (a=√5), B is zero, so a fresh layer computes exactly its base layer.
    Raises ``TypeError``/``ValueError`` naming the argument for a bad r, lora_alpha or lora_dropout.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 0,
        lora_alpha: float = 1,
        lora_dropout: float = 0.0,
        fan_in_fan_out: bool = False,
        merge_weights: bool = True,
        bias: bool = True,
        device=None,
        dtype=None,
        use_rslora: bool = False,
    ):
        _check_bias_flag(bias)
        nn.Linear.__init__(self, in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_lora(r, lora_alpha, lora_dropout, merge_weights, use_rslora)
        self._store_fan_in_fan_out(fan_in_fan_out)
        if self.r > 0:
            self._add_lora_parameters((self.r, in_features), (out_features, self.r))

    @classmethod
    def from_base(
        cls,
        base: nn.Module,
        r: int,
        lora_alpha: float = 1,
        lora_dropout: float = 0.0,
        fan_in_fan_out: bool = False,
        merge_weights: bool = False,
        use_rslora: bool = False,
        lora_dtype: torch.dtype | None = None,
        init_lora_weights: bool = True,
    ) -> Linear:
        """Wrap an existing ``nn.Linear`` (or an (in, out)-weight layer with ``fan_in_fan_out``),
        sharing its weight and bias tensors: no copy, same device and dtype. The layout of a torch
        ``nn.Linear`` and of GPT-2's Conv1D is read from the module (:func:`stores_in_out`)."""
        return cls._over_base(
            base,
            fan_in_fan_out,
            lora_dtype,
            init_lora_weights,
            r=r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            merge_weights=merge_weights,
            use_rslora=use_rslora,
        )

    @classmethod
    def _kind_options(cls, module: nn.Module, fan_in_fan_out, enable_lora, split_sizes) -> dict:
        # from_base reads the layout of the types that say it (stores_in_out)
        return {"fan_in_fan_out": fan_in_fan_out}

    def delta_weight(self) -> Tensor:
        return LF.linear_delta_weight(self.lora_A, self.lora_B, self.scaling, self.fan_in_fan_out)

    def forward(self, x: Tensor) -> Tensor:
        if self.r > 0 and not self.merged:
            return self._lora_forward(x)
        return self._base_forward(x)


def _check_split(
    out_features: int, enable_lora, split_sizes
) -> tuple[tuple[bool, ...], tuple[int, ...]]:
    if (
        isinstance(enable_lora, (str, bytes))
        or not isinstance(enable_lora, Sequence)
        or len(enable_lora) == 0
    ):
        raise ValueError(
            f"enable_lora={enable_lora!r}: expected a non-empty sequence of bools, one per fused slice"
        )
    enabled = tuple(bool(e) for e in enable_lora)
    n = len(enabled)
    if split_sizes is None:
        if out_features % n != 0:
            raise ValueError(
                f"enable_lora={list(enable_lora)!r}: its length {n} must divide out_features={out_features} "
                "(or pass split_sizes for unequal slices)"
            )
        return enabled, (out_features // n,) * n
    try:
        sizes = tuple(operator.index(s) for s in split_sizes)
    except TypeError:
        raise TypeError(
            f"split_sizes={split_sizes!r}: expected a sequence of positive ints"
        ) from None
    if len(sizes) != n:
        raise ValueError(
            f"split_sizes={list(sizes)!r}: expected {n} sizes, one per entry of enable_lora={list(enable_lora)!r}"
        )
    if any(s <= 0 for s in sizes):
        raise ValueError(f"split_sizes={list(sizes)!r}: expected positive sizes")
    if sum(sizes) != out_features:
        raise ValueError(
            f"split_sizes={list(sizes)!r}: they sum to {sum(sizes)}, expected out_features={out_features}"
        )
    return enabled, sizes


class MergedLinear(_LinearBase):
    """A fused projection (e.g. attention's qkv) with LoRA on chosen slices of its output.

    The output rows are split into ``len(enable_lora)`` slices: equal ones (loralib), or
    ``split_sizes`` (grouped-query attention: q = heads·head_dim, k = v = kv_heads·head_dim).
    Each enabled slice i gets its own rank-r adapter ``B_i A_i``; disabled slices are untouched.

    Parameters (k = number of enabled slices): ``lora_A`` (r·k, in), ``lora_B`` (Σ enabled sizes, r),
    A_i being rows i·r:(i+1)·r of ``lora_A`` and B_i the i-th block of rows of ``lora_B``: for equal
    slices exactly loralib's shapes, so loralib checkpoints load. The forward costs two thin
    matmuls; the (out × in) delta is built only by :meth:`merge`.

    Raises ``ValueError`` when ``len(enable_lora)`` does not divide out_features (without
    split_sizes), or split_sizes does not match enable_lora's length or sum to out_features.
    """

    _adapter_fields = LoRALayer._adapter_fields + ("enable_lora", "split_sizes")
    kind = "merged"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 0,
        lora_alpha: float = 1,
        lora_dropout: float = 0.0,
        enable_lora: Sequence[bool] = (False,),
        fan_in_fan_out: bool = False,
        merge_weights: bool = True,
        bias: bool = True,
        split_sizes: Sequence[int] | None = None,
        device=None,
        dtype=None,
        use_rslora: bool = False,
    ):
        _check_bias_flag(bias)
        nn.Linear.__init__(self, in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_lora(r, lora_alpha, lora_dropout, merge_weights, use_rslora)
        self.enable_lora, self.split_sizes = _check_split(out_features, enable_lora, split_sizes)
        self._store_fan_in_fan_out(fan_in_fan_out)
        k = sum(self.enable_lora)
        if self.r > 0 and k > 0:
            enabled_rows = sum(s for s, e in zip(self.split_sizes, self.enable_lora) if e)
            self._add_lora_parameters((self.r * k, in_features), (enabled_rows, self.r))

    @classmethod
    def from_base(
        cls,
        base: nn.Module,
        r: int,
        enable_lora: Sequence[bool],
        split_sizes: Sequence[int] | None = None,
        lora_alpha: float = 1,
        lora_dropout: float = 0.0,
        fan_in_fan_out: bool = False,
        merge_weights: bool = False,
        use_rslora: bool = False,
        lora_dtype: torch.dtype | None = None,
        init_lora_weights: bool = True,
    ) -> MergedLinear:
        """Wrap an existing fused ``nn.Linear``, sharing its weight and bias tensors (no copy); the
        weight's layout as for :meth:`Linear.from_base`."""
        return cls._over_base(
            base,
            fan_in_fan_out,
            lora_dtype,
            init_lora_weights,
            r=r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            enable_lora=enable_lora,
            split_sizes=split_sizes,
            merge_weights=merge_weights,
            use_rslora=use_rslora,
        )

    @classmethod
    def _kind_options(cls, module: nn.Module, fan_in_fan_out, enable_lora, split_sizes) -> dict:
        if enable_lora is None:
            raise TypeError("MergedLinear.wrap: enable_lora is required (one bool per fused slice)")
        return {
            "enable_lora": enable_lora,
            "split_sizes": split_sizes,
            "fan_in_fan_out": fan_in_fan_out,
        }

    @property
    def has_adapter(self) -> bool:
        return self.r > 0 and any(self.enable_lora)

    # --- the adapter as one LoRA over the fused matrix (adapter files, combining) -----------------
    def as_one_lora(self, adapter=None) -> tuple[Tensor, Tensor, float]:
        # B expanded to every output row, zeros on the slices the adapter leaves alone.
        adapter = self if adapter is None else adapter
        B = LF.merged_lora_B(adapter.lora_B, adapter.split_sizes, adapter.enable_lora, adapter.r)
        return adapter.lora_A, B, adapter.scaling

    def one_lora_rank_alpha(self, adapter=None) -> tuple[int, float]:
        adapter = self if adapter is None else adapter
        k = sum(adapter.enable_lora)
        return adapter.r * k, alpha_for_slices(adapter.lora_alpha, k, adapter.use_rslora)

    def one_lora_fields(self, rank: int) -> dict:
        one = (self.out_features,)
        return {**super().one_lora_fields(rank), "enable_lora": (True,), "split_sizes": one}

    def adapter_structure(self, adapter=None) -> tuple:
        adapter = self if adapter is None else adapter
        if len(adapter.split_sizes) == 1:
            return ("linear", adapter.r)
        return ("merged", adapter.r, tuple(adapter.enable_lora), tuple(adapter.split_sizes))

    def adapter_slices(self, adapter, declared: dict[str, int] | None) -> list[str] | None:
        if declared is None or len(declared) <= 1:
            return None
        if tuple(declared.values()) != tuple(adapter.split_sizes):
            return None
        return [s for s, e in zip(declared, adapter.enable_lora) if e]

    def slot_fields(
        self,
        r: int,
        lora_alpha: float,
        use_rslora: bool,
        enable_lora: tuple[bool, ...] = (),
        split_sizes: tuple[int, ...] = (),
    ) -> tuple[dict, bool]:
        fields, _ = super().slot_fields(r, lora_alpha, use_rslora)  # those of one rank-r LoRA
        if enable_lora:  # the slices, as blocks of B
            fields.update(enable_lora=tuple(enable_lora), split_sizes=tuple(split_sizes))
            return fields, True
        fields.update(enable_lora=(True,), split_sizes=(self.out_features,))
        return fields, False

    def expanded_lora_B(self) -> Tensor:
        """(out, r·k): ``lora_B``'s blocks placed on their slices' rows, zeros elsewhere."""
        return LF.merged_lora_B(self.lora_B, self.split_sizes, self.enable_lora, self.r)

    def _dense_lora_B(self) -> Tensor:
        return self.expanded_lora_B()

    def lora_blocks(self) -> tuple[tuple[int, int, int, int, int], ...]:
        """Per enabled slice: (out_start, out_stop, lora_B row start, lora_A row start, stop)."""
        return LF.merged_lora_blocks(self.split_sizes, self.enable_lora, self.r)

    def delta_weight(self) -> Tensor:
        return LF.linear_delta_weight(
            self.lora_A, self.expanded_lora_B(), self.scaling, self.fan_in_fan_out
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.has_adapter and not self.merged:
            return self._lora_forward(x, self.lora_blocks())
        return self._base_forward(x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, enable_lora={list(self.enable_lora)}, split_sizes={list(self.split_sizes)}"


Linear.sliced_class = MergedLinear  # slices of a fused Linear ("qkv_proj[q,v]") make a MergedLinear


def _check_bias_flag(bias) -> None:
    # As in nn.Linear, ``bias`` is whether the layer has one; "lora_only" etc. are LoRAConfig.bias
    # modes, and a string here would silently mean True.
    if not isinstance(bias, bool):
        raise TypeError(
            f"bias={bias!r}: expected True or False (whether the layer has a bias, "
            "as in nn.Linear); the 'none'/'all'/'lora_only' modes belong to "
            "LoRAConfig.bias"
        )
