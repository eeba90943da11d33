"""What the benchmark scripts share: interleaved timing, the machine's matmul peak, JSON output.

Method (issue 10): every variant is warmed up, then the variants run interleaved (the order rotates
each round, so slow spells of a shared machine hit all of them alike), and each figure is the
median of at least 7 runs. Ratios are taken between medians of the same run.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Callable

import torch

MIN_REPEAT = 7


def interleaved(
    fns: dict[str, Callable[[], object]], repeat: int = MIN_REPEAT, warmup: int = 2
) -> dict[str, list[float]]:
    """Seconds per call of each ``fns[name]()``: ``warmup`` calls each, then ``repeat`` rounds in
    which every variant runs once, in an order that rotates from round to round."""
    repeat = max(repeat, MIN_REPEAT)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in names}
    for i in range(repeat):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def spread(xs: list[float]) -> float:
    """(max - min) / median: how noisy a figure was."""
    return (max(xs) - min(xs)) / statistics.median(xs)


def peak_rss_bytes() -> int:
    """This process's peak RSS: Linux's VmHWM, which starts anew at exec (and at a reset through
    /proc/self/clear_refs). ``ru_maxrss`` does not: it keeps the RSS the parent had when it forked,
    so a child of a big parent would report the parent's. ``ru_maxrss`` where there is no
    /proc/self/status."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # KiB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def synchronize(device: str | torch.device = "cpu") -> None:
    """Wait for ``device``'s queued work (CUDA runs asynchronously; a CPU needs no wait)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(
    dtype: torch.dtype, repeat: int = MIN_REPEAT, device: str | torch.device = "cpu", tokens=1024
) -> dict:
    """The machine's measured matmul rate (FLOP/s) in ``dtype``: the best median over the GEMM
    shapes of a Phi-3-mini layer at ``tokens`` tokens (3072→3072, 3072→9216, 3072→16384,
    8192→3072), on ``device``."""
    best = {"flops": 0.0}
    for k, n in ((3072, 3072), (3072, 9216), (3072, 16384), (8192, 3072)):
        a = torch.randn(tokens, k, dtype=dtype, device=device)
        b = torch.randn(n, k, dtype=dtype, device=device)
        out = torch.empty(tokens, n, dtype=dtype, device=device)

        def mm(a=a, b=b, out=out):
            torch.mm(a, b.T, out=out)
            synchronize(device)

        t = median(interleaved({"mm": mm}, repeat, warmup=2)["mm"])
        rate = 2 * tokens * k * n / t
        if rate > best["flops"]:
            best = {"flops": rate, "shape": [tokens, k, n], "seconds": t}
    best["dtype"] = str(dtype).removeprefix("torch.")
    return best


def machine() -> dict:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_average": list(os.getloadavg()),
    }


def write_json(path: str, obj) -> None:
    """Atomically: a temporary file in the same folder, then a rename."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def finetune_job(
    *,
    steps: int,
    seq: int,
    per_device: int = 1,
    packing: bool = True,
    checkpointing: bool = True,
    bf16: bool = True,
    **training,
) -> dict:
    """The two dictionaries of a benchmark's ``lora-finetune --config`` job: ``steps`` optimizer
    steps of ``per_device`` packed rows of ``seq`` tokens, logged every step, no eval, no checkpoint
    saved, r=16 / alpha 32 on all-linear without dropout; ``training``: more training_config keys."""
    return {
        "training_config": {
            "per_device_train_batch_size": per_device,
            "max_steps": steps,
            "logging_steps": 1,
            "save_steps": 10_000,
            "max_seq_length": seq,
            "packing": packing,
            "gradient_checkpointing": checkpointing,
            "eval_fraction": 0.0,
            "bf16": bf16,
            "learning_rate": 1e-3,
            **training,
        },
        "peft_config": {
            "r": 16,
            "lora_alpha": 32,
            "lora_dropout": 0.0,
            "target_modules": "all-linear",
        },
    }
