"""Dense references for LoRA layers, written independently of lora.functional.

Each returns the effective weight W + s·ΔW in the layout of ``layer.weight``, built the slow and
obvious way, so that tests compare the layers against plain torch ops on it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import lora


def effective_weight(layer) -> torch.Tensor:
    W = layer.weight.detach().clone() if not layer.merged else layer._unmerged_weight.clone()
    if not layer.has_adapter:
        return W
    A, B, s = layer.lora_A.detach(), layer.lora_B.detach(), layer.scaling
    if isinstance(layer, lora.MergedLinear):
        delta = torch.zeros(layer.out_features, layer.in_features, dtype=A.dtype)
        row = src = j = 0
        for size, enabled in zip(layer.split_sizes, layer.enable_lora):
            if enabled:
                delta[row : row + size] = B[src : src + size] @ A[j * layer.r : (j + 1) * layer.r]
                src += size
                j += 1
            row += size
        delta = delta * s
        return W + (delta.T if layer.fan_in_fan_out else delta).to(W.dtype)
    if isinstance(layer, lora.Linear):
        delta = (B @ A) * s
        return W + (delta.T if layer.fan_in_fan_out else delta).to(W.dtype)
    if isinstance(layer, lora.Embedding):
        return W + ((B @ A).T * s).to(W.dtype)
    # conv
    out, r = B.shape[0], B.shape[1]
    delta = (B.reshape(out, r) @ A.reshape(r, -1)).reshape(W.shape) * s
    return W + delta.to(W.dtype)


def dense_forward(layer, x, weight=None):
    """What the layer must compute, using the torch op of its base type on the effective weight."""
    W = effective_weight(layer) if weight is None else weight
    if isinstance(layer, (lora.Linear, lora.MergedLinear)):
        return F.linear(x, W.T if layer.fan_in_fan_out else W, layer.bias)
    if isinstance(layer, lora.Embedding):
        table = W
        out = F.embedding(x, table, layer.padding_idx, None, layer.norm_type)
        if layer.max_norm is not None:
            norms = out.norm(p=layer.norm_type, dim=-1, keepdim=True)
            out = torch.where(norms > layer.max_norm, out * (layer.max_norm / (norms + 1e-7)), out)
        return out
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[W.dim() - 2]
    if layer.padding_mode != "zeros":
        x = F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
        padding = 0
    else:
        padding = layer.padding
    return conv(x, W, layer.bias, layer.stride, padding, layer.dilation, layer.groups)


def randomize_lora(layer, generator=None, scale=0.5):
    """Give A and B non-zero random values (a fresh B is zero, which would hide every bug)."""
    with torch.no_grad():
        for p in (layer.lora_A, layer.lora_B):
            p.copy_(
                torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p.dtype) * scale
            )
    return layer


def saved_bytes(fn, exclude=()):
    """Bytes of distinct tensor storages saved for backward by ``fn()``, leaving out ``exclude``."""
    seen = {t.untyped_storage().data_ptr() for t in exclude}
    total = [0]

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total[0] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return total[0], out


def state_snapshot(model) -> dict[str, torch.Tensor]:
    """A copy of every state-dict entry of ``model``, for :func:`assert_state_unchanged`."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_unchanged(model, before: dict[str, torch.Tensor]) -> None:
    """``model``'s state dict holds the keys and values of ``before`` exactly (a refused load
    changed nothing)."""
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
