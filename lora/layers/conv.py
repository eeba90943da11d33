"""LoRA for ``nn.Conv1d``/``nn.Conv2d``/``nn.Conv3d``.

Factorisation (the same as PEFT's, so conv adapters export to its format unchanged):

    lora_A: (r, in/groups, *kernel_size)    a convolution with the layer's own kernel, stride,
                                            padding, dilation and padding mode, r output channels
    lora_B: (out, r, 1, ..., 1)             a 1×1 convolution back to out channels
    ΔW    = s · (B.view(out, r) @ A.view(r, -1)).view(out, in/groups, *kernel_size)

ΔW has W's shape, rank ≤ r as an (out × in/groups·∏kernel) matrix. Grouped convolutions run the
same two stages per group (A shared across groups, B's rows in their output group), which is
exactly ``conv(x, ΔW, groups)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import functional as LF
from .base import LoRALayer

__all__ = ["ConvLoRA", "Conv1d", "Conv2d", "Conv3d"]


class ConvLoRA(LoRALayer):
    """Mixin for nn.ConvNd: the base keys stay exactly ``weight`` and ``bias``. Its ``__init__``
    is each conv's (see :class:`Conv1d`)."""

    _conv_fn: Any = None  # F.conv1d / conv2d / conv3d, set by each subclass
    _torch_class: ClassVar[type[nn.Module]]  # nn.Conv1d / Conv2d / Conv3d, set by each subclass
    kind = "conv"
    _torch_options = (
        "in_channels",
        "out_channels",
        "kernel_size",
        "stride",
        "padding",
        "dilation",
        "groups",
        "padding_mode",
    )

    if TYPE_CHECKING:  # from the torch conv class it is combined with
        in_channels: int
        out_channels: int
        kernel_size: tuple[int, ...]
        stride: tuple[int, ...]
        padding: Any
        dilation: tuple[int, ...]
        groups: int
        bias: Tensor | None

        def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor: ...

    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_size,
        r=0,
        lora_alpha=1,
        lora_dropout=0.0,
        merge_weights=True,
        use_rslora=False,
        **kwargs,
    ):
        _check_groups(in_channels, out_channels, kwargs.get("groups", 1))
        self._torch_class.__init__(self, in_channels, out_channels, kernel_size, **kwargs)
        self._init_lora(r, lora_alpha, lora_dropout, merge_weights, use_rslora)
        if self.r > 0:  # the shapes are PEFT's (see the module docstring)
            self._add_lora_parameters(*self.peft_shapes(self, self.r))

    # --- what this kind says about its module -------------------------------------------
    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        return type(module) is cls._torch_class or isinstance(module, cls)

    @classmethod
    def peft_incompatibility(cls, module: Any) -> str | None:
        if module.groups != 1:
            return f"groups={module.groups} (PEFT's conv lora_A is not grouped)"
        if any(d != 1 for d in module.dilation):
            return f"dilation={module.dilation} (PEFT's conv lora_A ignores dilation)"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r} (PEFT's conv lora_A pads with zeros)"
        return None

    @classmethod
    def peft_shapes(
        cls, module: Any, r: int, fan_in_fan_out: bool = False, enable_lora: tuple[bool, ...] = ()
    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        ones = (1,) * len(module.kernel_size)
        a_shape = (r, module.in_channels // module.groups, *module.kernel_size)
        return a_shape, (module.out_channels, r, *ones)

    def _plain_like(self) -> nn.Module:
        return self._torch_class(
            **self._options_of(self),
            bias=self.bias is not None,
            device="meta",
            dtype=self.weight.dtype,
        )

    @classmethod
    def from_base(
        cls,
        base: nn.Module,
        r: int,
        lora_alpha: float = 1,
        lora_dropout: float = 0.0,
        merge_weights: bool = False,
        use_rslora: bool = False,
        lora_dtype: torch.dtype | None = None,
        init_lora_weights: bool = True,
        **_ignored,
    ):
        """Wrap an existing ``nn.ConvNd`` of the same dimensionality, sharing its weight and bias (no copy)."""
        layer = cls(
            **cls._options_of(base),
            r=r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            merge_weights=merge_weights,
            use_rslora=use_rslora,
            bias=False,
            device="meta",
            dtype=base.weight.dtype,
        )
        return layer._adopt_base(base, lora_dtype, init_lora_weights)

    def delta_weight(self) -> Tensor:
        return LF.conv_delta_weight(self.lora_A, self.lora_B, self.scaling)

    def forward(self, x: Tensor) -> Tensor:
        result = self._conv_forward(x, self.weight, self.bias)
        if self.r == 0 or self.merged:
            return result
        h = self.lora_dropout(x)
        if h.dtype != self.lora_A.dtype:
            h = h.to(self.lora_A.dtype)
        a = (
            self.lora_A
            if self.groups == 1
            else self.lora_A.repeat(self.groups, *([1] * (self.lora_A.dim() - 1)))
        )
        hidden = self._conv_forward(
            h, a, None
        )  # (N, r·groups, *spatial): stride, padding, dilation applied here
        adapter = self._conv_fn(hidden * self.scaling, self.lora_B, None, 1, 0, 1, self.groups)
        if adapter.dtype != result.dtype:
            adapter = adapter.to(result.dtype)
        return result + adapter

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # loralib's ConvLoRA wraps the conv as `.conv`: accept its base keys as ours.
        for name in ("weight", "bias"):
            old = prefix + "conv." + name
            if old in state_dict and prefix + name not in state_dict:
                state_dict[prefix + name] = state_dict.pop(old)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _check_groups(in_channels, out_channels, groups) -> None:
    if isinstance(groups, bool) or not isinstance(groups, int) or groups <= 0:
        raise ValueError(f"groups={groups!r}: expected a positive int")
    if in_channels % groups or out_channels % groups:
        raise ValueError(
            f"groups={groups}: must divide in_channels={in_channels} and out_channels={out_channels}"
        )


class Conv1d(ConvLoRA, nn.Conv1d):
    """``nn.Conv1d`` with a low-rank update of its kernel (factorisation: see :mod:`lora.layers.conv`).

    Args: in_channels, out_channels, kernel_size and ``**kwargs`` (stride, padding, dilation,
    groups, bias, padding_mode, device, dtype) as ``nn.Conv1d``; r, lora_alpha, lora_dropout,
    merge_weights, use_rslora as :class:`lora.Linear`. Parameters: ``weight``, ``bias`` (the base
    keys, so a pretrained ``nn.Conv1d`` state dict loads), ``lora_A`` (r, in/groups, k),
    ``lora_B`` (out, r, 1). Raises ``ValueError`` when groups does not divide the channel counts.
    """

    _conv_fn = staticmethod(F.conv1d)
    _torch_class = nn.Conv1d


class Conv2d(ConvLoRA, nn.Conv2d):
    """``nn.Conv2d`` with a low-rank update of its kernel; as :class:`Conv1d`, with
    ``lora_A`` (r, in/groups, kh, kw) and ``lora_B`` (out, r, 1, 1)."""

    _conv_fn = staticmethod(F.conv2d)
    _torch_class = nn.Conv2d


class Conv3d(ConvLoRA, nn.Conv3d):
    """``nn.Conv3d`` with a low-rank update of its kernel; as :class:`Conv1d`, with
    ``lora_A`` (r, in/groups, kd, kh, kw) and ``lora_B`` (out, r, 1, 1, 1)."""

    _conv_fn = staticmethod(F.conv3d)
    _torch_class = nn.Conv3d


_ConvLoRA = ConvLoRA  # the old private name, kept for code written against it
