"""LoRA for ``nn.Embedding``."""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor, nn

from .. import functional as LF
from .base import LoRALayer

__all__ = ["Embedding"]


class Embedding(LoRALayer, nn.Embedding):
    """``nn.Embedding`` whose table is ``W + s·(B A)ᵀ``.

    Args:
        num_embeddings, embedding_dim, **kwargs: as ``nn.Embedding`` (padding_idx, max_norm,
            norm_type, scale_grad_by_freq, sparse, _weight, device, dtype).
        r, lora_alpha, merge_weights, use_rslora: as :class:`lora.Linear`.

    Parameters: ``weight`` (num_embeddings, dim), ``lora_A`` (r, num_embeddings) initialised to
    zeros and ``lora_B`` (dim, r) normal, as loralib, so loralib checkpoints mean the same here.
    ``padding_idx`` rows get no gradient (in W or A); ``max_norm`` renormalises looked-up rows of
    the effective table, out of place (the frozen W is never rewritten, unlike nn.Embedding's
    in-place renorm). With ``sparse=True`` the base weight's gradient is sparse, the adapter's dense.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        r: int = 0,
        lora_alpha: float = 1,
        merge_weights: bool = True,
        use_rslora: bool = False,
        **kwargs,
    ):
        nn.Embedding.__init__(self, num_embeddings, embedding_dim, **kwargs)
        self._init_lora(r, lora_alpha, 0.0, merge_weights, use_rslora)
        if self.r > 0:
            self._add_lora_parameters((self.r, num_embeddings), (embedding_dim, self.r))

    @classmethod
    def from_base(
        cls,
        base: nn.Embedding,
        r: int,
        lora_alpha: float = 1,
        merge_weights: bool = False,
        use_rslora: bool = False,
        lora_dtype: torch.dtype | None = None,
        init_lora_weights: bool = True,
        **_ignored,
    ) -> Embedding:
        """Wrap an existing ``nn.Embedding``, sharing its weight (no copy). Dropout does not apply."""
        layer = cls(
            **cls._options_of(base),
            r=r,
            lora_alpha=lora_alpha,
            merge_weights=merge_weights,
            use_rslora=use_rslora,
            device="meta",
            dtype=base.weight.dtype,
        )
        return layer._adopt_base(base, lora_dtype, init_lora_weights)

    # --- what this kind says about its module -------------------------------------------
    kind = "embedding"
    peft_keys = ("lora_embedding_A", "lora_embedding_B")
    _torch_options = (
        "num_embeddings",
        "embedding_dim",
        "padding_idx",
        "max_norm",
        "norm_type",
        "scale_grad_by_freq",
        "sparse",
    )

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        return type(module) is nn.Embedding or isinstance(module, Embedding)

    @classmethod
    def peft_incompatibility(cls, module: nn.Module) -> str | None:
        if getattr(module, "max_norm", None) is not None:
            return "max_norm (PEFT renormalises the adapter's rows, not the adapted table's)"
        return None

    @classmethod
    def peft_shapes(
        cls,
        module: nn.Module,
        r: int,
        fan_in_fan_out: bool = False,
        enable_lora: tuple[bool, ...] = (),
    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        emb = cast(nn.Embedding, module)
        return (r, emb.num_embeddings), (emb.embedding_dim, r)

    def dropout_for(self, p: float) -> nn.Module:
        return nn.Identity()  # dropout does not apply to a lookup

    def _plain_like(self) -> nn.Module:
        return nn.Embedding(**self._options_of(self), device="meta", dtype=self.weight.dtype)

    def reset_lora_parameters(self) -> None:
        if "lora_A" in self._parameters:
            nn.init.zeros_(self.lora_A)
            nn.init.normal_(self.lora_B)

    def delta_weight(self) -> Tensor:
        return LF.embedding_delta_weight(self.lora_A, self.lora_B, self.scaling)

    def forward(self, x: Tensor) -> Tensor:
        if self.r == 0:
            return nn.Embedding.forward(self, x)
        if self.merged:
            out = nn.functional.embedding(
                x,
                self.weight,
                self.padding_idx,
                None,
                self.norm_type,
                self.scale_grad_by_freq,
                self.sparse,
            )
            return (
                out if self.max_norm is None else LF.renorm_rows(out, self.max_norm, self.norm_type)
            )
        return LF.lora_embedding(
            x,
            self.weight,
            self.lora_A,
            self.lora_B,
            self.scaling,
            self.padding_idx,
            self.max_norm,
            self.norm_type,
            self.scale_grad_by_freq,
            self.sparse,
        )
