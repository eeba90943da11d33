"""The end-to-end LoRA step on a GPU: full-size Phi-3-mini, ours beside transformers + PEFT, one process.

    python benchmarks/bench_cuda.py --json OUT.json          # 32 layers, bf16, batch 4 x 1024, CUDA
    python benchmarks/bench_cuda.py --device cpu --layers 1 --hidden 256 --intermediate 512 \\
        --heads 4 --kv-heads 4 --vocab 1024 --batch 1 --seq 64 --repeat 7   # the same code, tiny, on a CPU

Issue 10 asks for the comparison on the GPU machine too (random weights, bf16, CUDA). Both models
fit side by side on one large card, so this runs in one process (bench_step.py, the CPU benchmark,
gives each variant its own process for RSS): the same weights (drawn on the device, seeded by
parameter name), the same LoRA A matrices, the same inputs, r=16, alpha 32, dropout 0.05,
all-linear, fp32 adapters on the bf16 base in both. For each label mode (every token labelled, and
chat-style: the last quarter labelled) the first step's losses must agree, then steps of the two
variants are timed interleaved (each step ends with a device synchronisation); medians.

Memory, per variant, from the CUDA caching allocator: ``model`` is what building the model took
(weights, adapters), ``step peak`` the most allocated during its steps above what was allocated
before them (activations, gradients, optimizer state); their sum is what the variant alone needs.
MFU is model FLOPs (bench_step.model_flops) over the matmul rate measured on the device at the
step's token count. Prints a table and, with --json, writes the figures. No timing is asserted.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402
import bench_step as S  # noqa: E402

LABELS = ("all", "chat")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--vocab", type=int, default=32064)
    ap.add_argument("--hidden", type=int, default=3072)
    ap.add_argument("--intermediate", type=int, default=8192)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    ap.add_argument(
        "--autocast",
        action="store_true",
        help="fp32 weights, each step under torch.autocast(bf16) for both (transformers' Trainer's "
        "bf16=True on a model loaded in fp32); MFU over the bf16 matmul rate",
    )
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing in both")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.autocast:
        args.dtype = "float32"  # the weights; the matmuls run in bf16
    args.torch_dtype = getattr(torch, args.dtype)
    args.compute_dtype = torch.bfloat16 if args.autocast else args.torch_dtype
    args.labels = "all"
    # what bench_step's builders read besides: the model's own heap and checkpointing settings
    args.checkpoint_layers, args.release_heap_every, args.heap = None, 4, "shipped"
    return args


def allocated(device) -> int:
    return torch.cuda.memory_allocated(device) if torch.device(device).type == "cuda" else 0


def build_measured(variant, args, device) -> tuple[object, object, int]:
    """(model, optimizer, bytes the build took on the device)."""
    gc.collect()
    before = allocated(device)
    model, opt = S.build(variant, args, device)
    C.synchronize(device)
    return model, opt, allocated(device) - before


def step_peak(model, opt, ids, labels, device, steps: int = 2) -> int | None:
    """The most the device allocator held during ``steps`` steps, above what it held before them."""
    if torch.device(device).type != "cuda":
        for _ in range(steps):
            S.train_step(model, opt, ids, labels)
        return None
    C.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    for _ in range(steps):
        S.train_step(model, opt, ids, labels)
    C.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_cuda: --device cuda, but torch sees no CUDA device")
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else C.machine()["cpu"]
    print(
        f"{card}; torch {torch.__version__}; Phi-3 hidden={args.hidden} intermediate="
        f"{args.intermediate} layers={args.layers} heads={args.heads}/{args.kv_heads} vocab="
        f"{args.vocab}; batch {args.batch} x {args.seq}; {args.dtype}"
        f"{' under bf16 autocast' if args.autocast else ''}"
        f"{'; checkpointing' if args.checkpointing else ''}; LoRA {S.LORA}",
        flush=True,
    )
    built = {v: build_measured(v, args, device) for v in S.VARIANTS}
    models = {v: (m, o) for v, (m, o, _) in built.items()}
    peak = C.matmul_peak(args.compute_dtype, device=device, tokens=args.batch * args.seq)["flops"]
    tokens = args.batch * args.seq
    results: dict = {}
    for labels in LABELS:
        args.labels = labels
        ids, lab = (t.to(device) for t in S.make_inputs(args))
        n_labelled = int((lab[:, 1:] != -100).sum())
        losses = S.check_losses(models, ids, lab)  # also the warm-up: 2 steps each
        a, b = (losses[v][0] for v in S.VARIANTS)
        tol = 1e-4 if args.compute_dtype == torch.float32 else 3e-2
        if abs(a - b) > tol * max(abs(a), 1e-12):
            raise SystemExit(f"first-step losses differ ({losses}): timing them means nothing")
        mem = {v: step_peak(*models[v], ids, lab, device) for v in S.VARIANTS}

        def step(v, ids=ids, lab=lab):
            S.train_step(*models[v], ids, lab)
            C.synchronize(device)

        times = C.interleaved({v: (lambda v=v: step(v)) for v in S.VARIANTS}, args.repeat, warmup=1)
        flops = S.model_flops(args, n_labelled)
        rows = {}
        for v in S.VARIANTS:
            med = C.median(times[v])
            rows[v] = dict(
                step_s=med,
                tokens_per_s=tokens / med,
                spread=C.spread(times[v]),
                mfu=flops / med / peak,
                model_mib=built[v][2] / 2**20,
                step_peak_mib=None if mem[v] is None else mem[v] / 2**20,
                losses=losses[v],
            )
        o, p = rows["ours"], rows["peft"]
        ratios = dict(speed=o["tokens_per_s"] / p["tokens_per_s"])
        if o["step_peak_mib"] is not None:
            ratios["memory"] = (o["model_mib"] + o["step_peak_mib"]) / (
                p["model_mib"] + p["step_peak_mib"]
            )
            ratios["step_peak"] = o["step_peak_mib"] / max(p["step_peak_mib"], 1e-9)
        results[labels] = dict(variants=rows, ours_over_peft=ratios, model_flops=flops)
        print(f"\nlabels={labels}: median of {len(times['ours'])} interleaved steps")
        print(
            f"{'variant':8s} {'step ms':>9s} {'tokens/s':>10s} {'MFU':>6s} {'model MiB':>10s} {'step peak MiB':>14s}"
        )
        for v, r in rows.items():
            sp = "n/a" if r["step_peak_mib"] is None else f"{r['step_peak_mib']:.0f}"
            print(
                f"{v:8s} {r['step_s'] * 1e3:9.1f} {r['tokens_per_s']:10.0f} {r['mfu']:6.1%} "
                f"{r['model_mib']:10.0f} {sp:>14s}"
            )
        print("ours/peft: " + ", ".join(f"{k} {x:.3f}x" for k, x in ratios.items()), flush=True)
    report = dict(
        device=card,
        torch=torch.__version__,
        dtype=args.dtype,
        autocast=args.autocast,
        checkpointing=args.checkpointing,
        shape=S.shape_of(args),
        lora=S.LORA,
        peak_flops=peak,
        labels=results,
    )
    if args.json:
        C.write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
