"""One LoRA training step with the chunked cross-entropy (``model.chunked_loss = True``) against the
plain one (full (N, V) logits), at Phi-3-mini's shapes: 2 layers, batch 2 x 512, every label counted.

Each (dtype, variant) runs in its own process, so that peak RSS (``ru_maxrss``) is that variant's;
the processes alternate plain, chunked, plain, chunked, ... so a slow spell of a shared machine
hits both. Each process builds the model, runs ``--warmup`` steps, then times ``--steps`` steps
(forward, backward, AdamW) and reports the median.

    python benchmarks/bench_chunked_loss.py [--dtype float32 bfloat16] [--rounds 2] [--json F]
    python benchmarks/bench_chunked_loss.py --pairs 6   # time only: both on one model, alternating
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build(dtype_name: str):
    """The model (LoRA r=16 on every linear), its AdamW and a (2, 512) batch."""
    import torch

    import lora
    from lora.models.phi3 import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    cfg = Phi3Config(
        vocab_size=32064,
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=2,
        num_attention_heads=32,
        num_key_value_heads=32,
    )
    with torch.device("cpu"):
        model = Phi3ForCausalLM(cfg).to(dtype)
    lora.inject(
        model, lora.LoRAConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
    )
    for p in model.parameters():  # the trainer's bf16: base in bf16, adapters in fp32
        if p.requires_grad:
            p.data = p.data.float()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(3, cfg.vocab_size, (2, 512), generator=torch.Generator().manual_seed(1))
    return model, opt, ids


def one(dtype_name: str, chunked: bool, warmup: int, steps: int) -> dict:
    """Peak RSS (and a step time) of one variant alone in this process."""
    model, opt, ids = build(dtype_name)
    model.chunked_loss = chunked

    def step() -> float:
        loss = model(ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t)
    return {
        "dtype": dtype_name,
        "chunked": chunked,
        "median_s": statistics.median(times),
        "times_s": times,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "loss": loss,
    }


def interleaved(dtype_name: str, warmup: int, pairs: int) -> dict:
    """Step times of both variants on one model, alternating every step (ABBA order), so that a
    slow spell of a shared machine hits both alike; the ratio is over paired steps."""
    model, opt, ids = build(dtype_name)

    def step(chunked: bool) -> float:
        model.chunked_loss = chunked
        t = time.perf_counter()
        model(ids, labels=ids, use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    for _ in range(warmup):
        step(False), step(True)
    plain, chunked, ratios = [], [], []
    for i in range(pairs):
        order = (False, True) if i % 2 == 0 else (True, False)
        got = {c: step(c) for c in order}
        plain.append(got[False])
        chunked.append(got[True])
        ratios.append(got[True] / got[False])
    return {
        "dtype": dtype_name,
        "plain_median_s": statistics.median(plain),
        "chunked_median_s": statistics.median(chunked),
        "chunked_over_plain_median": statistics.median(ratios),
        "ratios": ratios,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--rounds", type=int, default=2, help="processes per variant and dtype")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--json", default=None)
    ap.add_argument("--pairs", type=int, default=0, help="interleaved timing: this many pairs")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.pairs:
        for dtype in args.dtype:
            row = interleaved(dtype, args.warmup, args.pairs)
            print(
                f"{dtype:9s} interleaved: plain {row['plain_median_s']:.3f} s, chunked "
                f"{row['chunked_median_s']:.3f} s, chunked/plain (paired, median) "
                f"{row['chunked_over_plain_median']:.3f}; ratios "
                f"{', '.join(f'{r:.3f}' for r in row['ratios'])}",
                flush=True,
            )
        return
    if args.child:
        dtype, chunked = args.child[0], args.child[1] == "1"
        print(json.dumps(one(dtype, chunked, args.warmup, args.steps)))
        return
    results = []
    for dtype in args.dtype:
        for r in range(args.rounds):
            order = (False, True) if r % 2 == 0 else (True, False)
            for chunked in order:
                out = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--child",
                        dtype,
                        str(int(chunked)),
                        "--warmup",
                        str(args.warmup),
                        "--steps",
                        str(args.steps),
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                    cwd=ROOT,
                )
                row = json.loads(out.stdout.strip().splitlines()[-1])
                results.append(row)
                print(
                    f"{dtype:9s} {'chunked' if chunked else 'plain  '} step "
                    f"{row['median_s']:.3f} s (runs {', '.join(f'{t:.2f}' for t in row['times_s'])})"
                    f" peak RSS {row['peak_rss_mb']:.0f} MiB loss {row['loss']:.5f}",
                    flush=True,
                )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
