"""One process, two data-parallel ranks, two FSDP ranks: tokens/s and peak memory per rank.

    python benchmarks/bench_distributed.py           # CPU, gloo; a 169M-parameter Phi-3 shape
    python benchmarks/bench_distributed.py --device cuda --nproc 2 --bf16   # 2 GPUs, nccl
    python benchmarks/bench_distributed.py --quantize nf4   # a 4-bit base (QLoRA; FSDP shards it)
    python benchmarks/bench_distributed.py --full --runs fsdp   # full-size Phi-3-mini, FSDP only

Writes a random Phi-3-shaped checkpoint and a chat file to a temporary directory, then runs
``lora-finetune`` on them three ways with the same global batch, and prints, per run, the median
tokens/s of the logged steps (all ranks together; the first step is left out) and each rank's peak
memory (resident set on CPU, max_memory_allocated on CUDA) and the parameter bytes it holds, as the
metrics rows record them. Every run gets OMP_NUM_THREADS=1 (torchrun's default) unless set. On CPU
the ranks share the machine's cores, so tokens/s shows overhead, not scaling; the memory column is
the point there: the frozen base is whole on every data-parallel rank and split under FSDP.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import finetune_job

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32064)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=4, help="global batch (sequences per step)")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--quantize", choices=["nf4"], help="the base's Linear weights in 4 bits")
    ap.add_argument("--seq", type=int, default=128, help="max_seq_length (packed: every row full)")
    ap.add_argument("--no-packing", action="store_true", help="one conversation a row, padded")
    ap.add_argument("--checkpointing", action="store_true", help="gradient_checkpointing")
    ap.add_argument(
        "--runs", default="one,ddp,fsdp", help="which of one (process), ddp, fsdp; comma-separated"
    )
    ap.add_argument(
        "--full",
        action="store_true",
        help="Phi-3-mini's shapes (3072 / 8192, 32 layers, 32 heads), a bf16 checkpoint, "
        "sequences of 512, --bf16 and --checkpointing",
    )
    args = ap.parse_args()
    if args.full:
        args.hidden, args.intermediate, args.layers, args.heads = 3072, 8192, 32, 32
        args.seq, args.bf16, args.checkpointing = 512, True, True
    runs_wanted = set(args.runs.split(","))
    if not runs_wanted <= {"one", "ddp", "fsdp"}:
        ap.error(f"--runs={args.runs!r}: expected names from one, ddp, fsdp")

    from tiny import chat_records, write_checkpoint, write_jsonl

    work = Path(tempfile.mkdtemp(prefix="bench-dist-"))
    ckpt = write_checkpoint(
        work / "ckpt",
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=max(256, args.seq),
        dtype=torch.bfloat16 if args.full else torch.float32,
    )
    data = write_jsonl(
        work / "chat.jsonl", chat_records(200 + args.batch * args.steps * args.seq // 8)
    )
    params = sum(os.path.getsize(p) for p in ckpt.glob("*.safetensors"))
    print(f"checkpoint: {params / 2**20:,.0f} MiB of weights in {ckpt}")

    def config(per_device: int) -> Path:
        path = work / f"c{per_device}.json"
        job = finetune_job(
            steps=args.steps,
            seq=args.seq,
            per_device=per_device,
            packing=not args.no_packing,
            checkpointing=args.checkpointing,
            bf16=args.bf16,
            device=args.device,
            quantize=args.quantize,
        )
        path.write_text(json.dumps(job))
        return path

    env = dict(
        os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")
    )
    common = ["--model", str(ckpt), "--data", str(data), "--no-progress"]
    runs = {
        "1 process": [
            sys.executable,
            "-m",
            "lora.finetune",
            *common,
            "--config",
            str(config(args.batch)),
        ],
        f"DDP x{args.nproc}": [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={args.nproc}",
            "-m",
            "lora.finetune",
            *common,
            "--config",
            str(config(args.batch // args.nproc)),
        ],
    }
    runs[f"FSDP x{args.nproc}"] = runs[f"DDP x{args.nproc}"] + ["--fsdp"]
    keep = dict(zip(runs, ("one", "ddp", "fsdp"), strict=True))
    runs = {name: cmd for name, cmd in runs.items() if keep[name] in runs_wanted}
    print(
        f"{'run':<10} {'wall s':>7} {'tok/s':>9}  "
        "peak memory per rank (MiB) | parameters held per rank (MiB)"
    )
    for name, cmd in runs.items():
        out = work / name.replace(" ", "_")
        start = time.perf_counter()
        proc = subprocess.run([*cmd, "--output", str(out)], env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            print(f"{name}: failed\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
            continue
        rows = [
            json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line
        ]
        train = [r for r in rows if "loss" in r]
        tps = (
            statistics.median(r["tokens_per_second"] for r in train[1:])
            if len(train) > 1
            else float("nan")
        )
        mem = ", ".join(f"{m:,.0f}" for m in train[-1]["memory_mb"])
        held = ", ".join(f"{m:,.0f}" for m in train[-1]["params_mb"])
        print(
            f"{name:<10} {wall:7.1f} {tps:9,.0f}  [{mem}] | [{held}]   "
            f"final loss {train[-1]['loss']:.4f}"
        )


if __name__ == "__main__":
    main()
