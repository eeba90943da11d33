"""The FSDP loader draws the LoRA parameters as one process's ``inject`` draws them, also with
``init_lora_weights=False`` (B non-zero). Before, that setting failed in the loader's inject on
the meta device ("Tensor.item() cannot be called on meta tensors"): B was randomised there,
before any values existed. Also an Embedding target (its A starts at zero, then is drawn).

One gloo process (world size 1) in a subprocess, so that no process group outlives the test."""

from __future__ import annotations

import pytest
import torch
from test_sharded_copies import one_gloo_rank

import lora

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="needs torch.distributed"
)

SCRIPT = r"""
import json, sys
from pathlib import Path
import torch
import lora
from lora.finetune.distributed import load_sharded_phi3, setup
from lora.models import Phi3ForCausalLM
from tiny import write_checkpoint

root = Path(sys.argv[1])
ckpt = write_checkpoint(root / "ckpt")
cfg = lora.LoRAConfig(r=4, lora_alpha=8, target_modules=["qkv_proj", "down_proj", "embed_tokens"],
                      init_lora_weights=False)
torch.manual_seed(0)
one = lora.inject(Phi3ForCausalLM.from_pretrained(ckpt), cfg)
want = {n: p.detach() for n, p in one.named_parameters() if "lora_" in n}
ctx = setup("cpu", fsdp=True)
torch.manual_seed(0)
model = load_sharded_phi3(ckpt, cfg, torch.float32, ctx)
got = {}
for n, p in model.named_parameters():
    if "lora_" in n:
        t = p.detach()
        got[n] = (t.full_tensor() if hasattr(t, "full_tensor") else t)
out = {
    "names": sorted(want) == sorted(got),
    "equal": all(torch.equal(want[n], got[n]) for n in want if n in got),
    "b_nonzero": all(bool(t.any()) for n, t in got.items() if "lora_B" in n),
    "n": len(got),
}
print("RESULT " + json.dumps(out))
ctx.close()
"""


def test_the_fsdp_loader_draws_a_non_zero_adapter_as_inject_does(tmp_path):
    out = one_gloo_rank(SCRIPT, str(tmp_path))
    assert out["n"] >= 6 and out["names"]
    assert out["b_nonzero"]
    assert out["equal"]


def test_inject_on_the_meta_device_takes_init_lora_weights_false():
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Embedding(10, 8))
    cfg = lora.LoRAConfig(r=2, target_modules=["0", "1"], init_lora_weights=False)
    lora.inject(model, cfg)
    assert model[0].lora_B.is_meta and model[1].lora_B.is_meta
