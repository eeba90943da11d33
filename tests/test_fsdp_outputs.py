"""Under FSDP2, a LoRA layer that is its own unit (a LoRA lm_head) returns a tensor of its own, not
a view: FSDP2 warns of a unit output that is a view, since an in-place op on it drops the unit's
pre-backward all-gather (then backward fails or the gradients are wrong). An in-place op on such
an output trains as the out-of-place one.

One gloo process (world size 1) in a subprocess, so that no process group outlives the test."""

from __future__ import annotations

import pytest
import torch
from test_sharded_copies import one_gloo_rank

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="needs torch.distributed"
)

SCRIPT = r"""
import json, sys, warnings
from pathlib import Path
import torch
import lora
from lora.finetune.distributed import load_sharded_phi3, setup
from tiny import write_checkpoint

root, quant = Path(sys.argv[1]), sys.argv[2]
ckpt = write_checkpoint(root / "ckpt")
cfg = lora.LoRAConfig(r=4, lora_alpha=8, target_modules=["qkv_proj", "lm_head"])
ctx = setup("cpu", fsdp=True)
model = load_sharded_phi3(ckpt, cfg, torch.float32, ctx, quantize=None if quant == "none" else quant)
model.train()
ids = torch.tensor([[3, 5, 7, 11, 13, 17, 19, 23], [2, 4, 6, 8, 10, 12, 14, 16]])
grads = []
with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    for in_place in (False, True):
        model.zero_grad(set_to_none=True)
        logits = model(ids).logits
        logits = logits.mul_(0.5) if in_place else logits * 0.5
        logits.float().logsumexp(-1).sum().backward()
        grads.append({n: getattr(p.grad, "full_tensor", p.grad.clone)() for n, p in model.named_parameters() if p.grad is not None})
views = [str(w.message) for w in seen if "returned a view tensor" in str(w.message)]
same = sorted(grads[0]) == sorted(grads[1]) and all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])
print("RESULT " + json.dumps({"views": views, "same": same, "n": len(grads[0])}))
ctx.close()
"""


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_a_lora_lm_head_unit_returns_its_own_tensor(tmp_path, quant):
    out = one_gloo_rank(SCRIPT, str(tmp_path), quant)
    assert out["views"] == []
    assert out["same"] and out["n"] > 0
