"""Smoke test of both torchrun modes on a tiny Phi-3: data-parallel, then FSDP.

    python tests/dist_smoke.py --device cuda --nproc 1     # one GPU: the nccl code paths
    python tests/dist_smoke.py --device cpu --nproc 2      # CPU, gloo
    python tests/dist_smoke.py --device cuda --quantize nf4   # a 4-bit base (QLoRA, FSDP-QLoRA)

Writes a tiny checkpoint and chat file to a temporary directory, runs ``lora-finetune`` under
``torchrun --standalone`` once per mode (4 steps, a checkpoint at step 2, then ``--resume`` of the
same run to step 6), checks that each run exits 0 and leaves an adapter, and prints each run's
last metrics row (loss, world_size, memory and parameters per rank). Exit status 0 when all passed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--nproc", type=int, default=1)
    ap.add_argument("--quantize", choices=["nf4"], help="the base's Linear weights in 4 bits")
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent))
    from tiny import chat_records, write_checkpoint, write_jsonl

    work = Path(tempfile.mkdtemp(prefix="dist-smoke-"))
    ckpt = write_checkpoint(work / "ckpt")
    data = write_jsonl(work / "chat.jsonl", chat_records(40))
    config = work / "c.json"
    config.write_text(
        json.dumps(
            {
                "training_config": {
                    "max_steps": 4,
                    "logging_steps": 1,
                    "save_steps": 2,
                    "max_seq_length": 64,
                    "per_device_train_batch_size": 2,
                    "device": args.device,
                    "quantize": args.quantize,
                },
                "peft_config": {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
            }
        )
    )
    env = dict(os.environ, PYTHONPATH=str(HERE.parent))
    failed = 0
    for mode in ([], ["--fsdp"]):
        out = work / ("fsdp" if mode else "ddp")
        for extra in ([], ["--resume", "--max-steps", "6"]):
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={args.nproc}",
                "-m",
                "lora.finetune",
                "--model",
                str(ckpt),
                "--data",
                str(data),
                "--config",
                str(config),
                "--output",
                str(out),
                "--no-progress",
                *mode,
                *extra,
            ]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
            name = f"{'fsdp' if mode else 'ddp'}{' resume' if extra else ''}"
            ok = proc.returncode == 0 and (out / "adapter" / "adapter_model.safetensors").is_file()
            rows = (
                [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x]
                if (out / "metrics.jsonl").is_file()
                else []
            )
            last = next((r for r in reversed(rows) if "loss" in r), None)
            print(f"{name:<12} {'ok' if ok else 'FAILED'}  {json.dumps(last)}")
            if not ok:
                failed += 1
                print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
