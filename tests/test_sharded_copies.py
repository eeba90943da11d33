"""A modules_to_save copy cannot be made of a module FSDP2 has sharded: loading a second adapter
with modules_to_save onto an FSDP model (4-bit or not), or injecting into a sharded plain model,
is refused before anything changes, with what to do instead. Before, FSDP's own deepcopy guard
surfaced ("FSDP does not support deepcopy") after the new adapter's LoRA layers were already in.

One gloo process (world size 1) in a subprocess, so that no process group outlives the test."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="needs torch.distributed"
)

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json, sys, warnings
from pathlib import Path
import torch
from torch import nn
import lora
from lora.finetune.distributed import load_sharded_phi3, setup
from lora.models import Phi3ForCausalLM
from tiny import write_checkpoint

warnings.simplefilter("ignore")
root, quant = Path(sys.argv[1]), sys.argv[2]
ckpt = write_checkpoint(root / "ckpt")
cfg = lora.LoRAConfig(r=4, lora_alpha=8, target_modules="all-linear",
                      modules_to_save=["layers.1.mlp"])
one = Phi3ForCausalLM.from_pretrained(ckpt)
lora.inject(one, cfg)
lora.save_adapter(one, root / "second")

ctx = setup("cpu", fsdp=True)
out = {}
model = load_sharded_phi3(ckpt, cfg, torch.float32, ctx, quantize=None if quant == "none" else quant)
before = sorted(model.state_dict())
try:
    lora.load_adapter(model, root / "second", adapter_name="b")
    out["load"] = None
except Exception as e:
    out["load"] = [type(e).__name__, str(e)]
out["unchanged"] = sorted(model.state_dict()) == before

from torch.distributed.fsdp import fully_shard
plain = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 8), nn.ReLU()))
fully_shard(plain[1])
try:
    lora.inject(plain, {"r": 2, "target_modules": ["0"], "modules_to_save": ["1"]})
    out["inject"] = None
except Exception as e:
    out["inject"] = [type(e).__name__, str(e)]
out["plain_unchanged"] = isinstance(plain[0], nn.Linear)
print("RESULT " + json.dumps(out))
ctx.close()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_gloo_rank(script: str, *args: str) -> dict:
    """Run ``script`` (python -c) as the only rank of a gloo job (world size 1) with ``args``;
    returns the JSON it printed last on a line starting ``RESULT ``."""
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
        OMP_NUM_THREADS="1",
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="1",
        LOCAL_WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_a_copy_of_a_sharded_module_is_refused_before_the_model_changes(tmp_path, quant):
    out = one_gloo_rank(SCRIPT, str(tmp_path), quant)
    kind, message = out["load"]
    assert kind == "AdapterError"
    assert "model.layers.1.mlp" in message and "FSDP has sharded it" in message
    assert "before fully_shard" in message and "nothing was loaded" in message
    assert out["unchanged"]
    kind, message = out["inject"]
    assert kind == "InjectionError"
    assert "FSDP has sharded it" in message and message.startswith("modules_to_save: 1 ")
    assert out["plain_unchanged"]
