"""Phi-3's fused RMSNorm and SwiGLU (``lora.models.fused_ops``) against the plain composites, at
Phi-3-mini's shapes (bench_step.py's model: 2 layers, batch 2 x 512, LoRA r=16, dropout 0.05,
all-linear, every token labelled).

    python benchmarks/bench_fused_ops.py saved   [--dtype bfloat16]   # bytes kept for backward
    python benchmarks/bench_fused_ops.py ops     [--dtype bfloat16]   # each op alone, fwd + bwd
    python benchmarks/bench_fused_ops.py step    [--dtype bfloat16] [--pairs 7]
    python benchmarks/bench_fused_ops.py memory  [--dtype bfloat16] [--labels all|chat]
    python benchmarks/bench_fused_ops.py peak    [--dtype bfloat16]   # what is live at the peak

saved: distinct storages kept for backward by one step's forward (saved_tensors_hooks; parameters
left out), fused and plain. ops: one RMSNorm (1024 x 3072) and one SwiGLU (1024 x 16384 -> 8192)
forward + backward, interleaved medians. step: whole training steps on one model, the two variants
alternating (ABBA), median of the paired ratios. memory: peak RSS of a process per variant
(bench_step.py's measurement). peak: the torch allocator's live tensors at the peak of one step,
grouped by the op that allocated them (torch.profiler's memory events). Nothing asserts on time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from unittest import mock

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402
import bench_step as S  # noqa: E402

import lora.models.fused_ops as FO  # noqa: E402
import lora.models.phi3 as phi3  # noqa: E402


@contextlib.contextmanager
def variant(name: str):
    """The model as it is ("fused"), or with the composites, autograd through each op ("plain")."""
    if name == "fused":
        yield
        return
    with (
        mock.patch.object(phi3, "rms_norm", FO.rms_norm_reference),
        mock.patch.object(phi3, "swiglu", FO.swiglu_reference),
    ):
        yield


def step_args(dtype: str, labels: str = "all"):
    return S.parse_args(["--dtype", dtype, "--labels", labels])


def cmd_saved(args) -> dict:
    sargs = step_args(args.dtype, args.labels)
    model, _ = S.build("ours", sargs)
    ids, labels = S.make_inputs(sargs)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    out = {}
    for name in ("plain", "fused"):
        seen, sizes = set(params), []

        def pack(t, seen=seen, sizes=sizes):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in seen:
                seen.add(ptr)
                sizes.append(t.untyped_storage().nbytes())
            return t

        with variant(name), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(ids, labels=labels).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        out[name] = dict(saved_mib=sum(sizes) / 2**20, storages=len(sizes))
    out["saved_less_mib"] = out["plain"]["saved_mib"] - out["fused"]["saved_mib"]
    print(json.dumps(out, indent=1))
    return out


def cmd_ops(args) -> dict:
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 3072, generator=g).to(dtype).requires_grad_()
    w = torch.ones(3072, dtype=dtype)
    gu = torch.randn(1024, 16384, generator=g).to(dtype).requires_grad_()
    up_norm, up_glu = torch.randn(1024, 3072).to(dtype), torch.randn(1024, 8192).to(dtype)

    def run(fn, inp, upstream):
        def f():
            inp.grad = None
            fn().backward(upstream)

        return f

    fns = {
        "rms_norm fused": run(lambda: FO.rms_norm(x, w, 1e-5), x, up_norm),
        "rms_norm plain": run(lambda: FO.rms_norm_reference(x, w, 1e-5), x, up_norm),
        "swiglu fused": run(lambda: FO.swiglu(gu), gu, up_glu),
        "swiglu plain": run(lambda: FO.swiglu_reference(gu), gu, up_glu),
    }
    times = C.interleaved(fns, max(args.pairs, C.MIN_REPEAT) * 3, warmup=3)
    out = {k: dict(median_ms=C.median(v) * 1e3, min_ms=min(v) * 1e3) for k, v in times.items()}
    for k, v in out.items():
        print(
            f"{k:16s} median {v['median_ms']:7.2f} ms, min {v['min_ms']:7.2f} ms "
            f"(fwd + bwd, spread {C.spread(times[k]):.0%})"
        )
    return out


def cmd_step(args) -> dict:
    sargs = step_args(args.dtype, args.labels)
    model, opt = S.build("ours", sargs)
    ids, labels = S.make_inputs(sargs)

    def step(name: str) -> float:
        with variant(name):
            t = time.perf_counter()
            S.train_step(model, opt, ids, labels)
            return time.perf_counter() - t

    for _ in range(2):
        step("plain"), step("fused")
    got: dict[str, list[float]] = {"plain": [], "fused": []}
    ratios = []
    for i in range(args.pairs):
        order = ("plain", "fused") if i % 2 == 0 else ("fused", "plain")
        t = {n: step(n) for n in order}
        for n in order:
            got[n].append(t[n])
        ratios.append(t["fused"] / t["plain"])
    out = dict(
        plain_s=C.median(got["plain"]),
        fused_s=C.median(got["fused"]),
        fused_over_plain=statistics.median(ratios),
        ratios=ratios,
    )
    print(
        f"{args.dtype} {args.labels}: plain {out['plain_s']:.3f} s, fused {out['fused_s']:.3f} s, "
        f"fused/plain (paired median) {out['fused_over_plain']:.3f}; "
        f"ratios {', '.join(f'{r:.3f}' for r in ratios)}"
    )
    return out


def cmd_memory(args) -> dict:
    out = {}
    for name in ("plain", "fused"):
        cmd = [sys.executable, os.path.abspath(__file__), "child-memory", "--variant", name]
        cmd += ["--dtype", args.dtype, "--labels", args.labels]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[name] = json.loads(res.stdout.strip().splitlines()[-1])
        row = out[name]
        print(
            f"{args.dtype} {args.labels} {name}: peak RSS {row['peak_rss_mb']:.0f} MB, working set "
            f"{row['working_set_mb']:.0f} MB, allocator peak {row['alloc_peak_mb']:.0f} MB"
        )
    return out


def cmd_child_memory(args) -> None:
    with variant(args.variant):
        print(json.dumps(S.measure_memory("ours", step_args(args.dtype, args.labels))))


def cmd_peak(args) -> dict:
    """Live tensors at the allocator's peak during one step, by the op that allocated them."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    sargs = step_args(args.dtype, args.labels)
    model, opt = S.build("ours", sargs)
    ids, labels = S.make_inputs(sargs)
    out = {}
    for name in ("plain", "fused"):
        with variant(name):
            S.train_step(model, opt, ids, labels)
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                S.train_step(model, opt, ids, labels)
        events = []
        stack = [(n, None) for n in prof.profiler.kineto_results.experimental_event_tree()]
        while stack:
            node, parent = stack.pop()
            if node.tag == _EventType.Allocation:
                alloc = node.typed[1]
                events.append((node.start_time_ns, alloc.ptr, alloc.alloc_size, parent))
            else:
                parent = node  # the innermost op
            stack.extend((c, parent) for c in node.children)
        events.sort(key=lambda e: e[0])
        live: dict[int, tuple[int, str]] = {}
        total = peak = 0
        at_peak: dict[int, tuple[int, str]] = {}
        in_backward = False
        phase = "forward"
        for _, ptr, size, parent in events:
            op = parent.name if parent is not None else "?"
            if "Backward" in op or "backward" in op:
                in_backward = True
            if size > 0:
                live[ptr] = (size, f"{'bwd' if in_backward else 'fwd'}: {op}")
            else:
                live.pop(ptr, None)
            total += size
            if total > peak:
                peak, at_peak, phase = total, dict(live), op
        groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for size, op in at_peak.values():
            groups[op][0] += size
            groups[op][1] += 1
        rows = sorted(groups.items(), key=lambda kv: -kv[1][0])
        out[name] = dict(
            peak_mib=peak / 2**20,
            at_op=phase,
            by_op=[(op, s / 2**20, n) for op, (s, n) in rows],
        )
        print(
            f"\n{name}: allocator peak {peak / 2**20:.0f} MiB above the step's start, during {phase}"
        )
        for op, (s, n) in rows[: args.top]:
            print(f"  {s / 2**20:8.1f} MiB  {n:4d} tensors  allocated by {op}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("cmd", choices=("saved", "ops", "step", "memory", "peak", "child-memory"))
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    ap.add_argument("--labels", choices=("all", "chat"), default="all")
    ap.add_argument("--pairs", type=int, default=C.MIN_REPEAT)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--variant", choices=("plain", "fused"), default="fused")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.cmd == "child-memory":
        cmd_child_memory(args)
        return
    fn = {
        "saved": cmd_saved,
        "ops": cmd_ops,
        "step": cmd_step,
        "memory": cmd_memory,
        "peak": cmd_peak,
    }[args.cmd]
    result = fn(args)
    if args.json:
        C.write_json(
            args.json, dict(cmd=args.cmd, dtype=args.dtype, labels=args.labels, result=result)
        )


if __name__ == "__main__":
    main()
