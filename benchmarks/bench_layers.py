"""Forward+backward time of LoRA layers, ours beside loralib and PEFT, in one run.

Reports medians and ratios (machines are shared and noisy: trust the ratios, not the absolutes).
    python benchmarks/bench_layers.py [--tokens 2048] [--dim 1024] [--r 16] [--repeat 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from torch import nn

import lora


def timeit(fn, repeat: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def step(layer, x):
    def run():
        layer.zero_grad(set_to_none=True)
        layer(x).sum().backward()
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    d, r = args.dim, args.r
    torch.manual_seed(0)
    x = torch.randn(args.tokens, d)
    rows = []

    # A plain LoRA Linear (d -> d).
    cands = {"lora": lambda: lora.Linear(d, d, r=r, lora_alpha=2 * r)}
    try:
        import loralib
        cands["loralib"] = lambda: loralib.Linear(d, d, r=r, lora_alpha=2 * r)
    except ImportError:
        pass
    try:
        import peft

        def peft_linear():
            base = nn.Sequential(nn.Linear(d, d))
            return peft.get_peft_model(base, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"]))
        cands["peft"] = peft_linear
    except ImportError:
        pass
    times = {name: timeit(step(make(), x), args.repeat) for name, make in cands.items()}
    rows.append(("Linear d->d", times))

    # A fused qkv projection (d -> 3d) with LoRA on q and v only.
    cands = {"lora": lambda: lora.MergedLinear(d, 3 * d, r=r, lora_alpha=2 * r, enable_lora=[True, False, True])}
    if "loralib" in sys.modules:
        cands["loralib"] = lambda: sys.modules["loralib"].MergedLinear(
            d, 3 * d, r=r, lora_alpha=2 * r, enable_lora=[True, False, True])
    times = {name: timeit(step(make(), x), args.repeat) for name, make in cands.items()}
    rows.append(("MergedLinear d->3d [q,v]", times))

    print(f"tokens={args.tokens} dim={d} r={r} threads={torch.get_num_threads()} (forward+backward, median of {args.repeat})")
    for name, times in rows:
        ours = times["lora"]
        parts = [f"{k} {1e3 * v:8.2f} ms" for k, v in times.items()]
        ratios = [f"{k}/lora = {v / ours:.2f}x" for k, v in times.items() if k != "lora"]
        print(f"{name:28s} " + "  ".join(parts) + ("   " + "  ".join(ratios) if ratios else ""))


if __name__ == "__main__":
    main()
