"""Where an FSDP rank's memory goes over a training step: resident set over time, and what is live.

    python benchmarks/fsdp_memory.py --layers 4             # Phi-3-mini's width, 4 decoder layers
    python benchmarks/fsdp_memory.py --full                 # full-size Phi-3-mini (32 layers)
    python benchmarks/fsdp_memory.py --ckpt DIR ...         # reuse a checkpoint written before
    python benchmarks/fsdp_memory.py --hidden 768 --intermediate 2048 --per-device 2 \
        --seq 1024 --reply-words 16                         # where the logits weigh most

Writes a random bf16 Phi-3-shaped checkpoint (Phi-3-mini's width unless ``--hidden`` /
``--intermediate`` say otherwise: hidden 3072, intermediate 8192, heads of 96, vocab 32064;
``--layers`` of them) unless ``--ckpt`` names one, and runs the real trainer (``lora-finetune
--fsdp`` under ``torchrun``, 2 gloo ranks: packed rows of ``--seq`` tokens, ``--per-device`` a
rank, gradient checkpointing, bf16, LoRA r=16 on all linear layers) with two
instruments on each rank:

- a sampler, a separate process (so the rank's GIL never delays it), reads the rank's resident
  set from ``/proc/PID/statm`` every 2 ms;
- hooks on the rank record events with the resident set, glibc's ``mallinfo2`` (bytes the C heap
  has handed out, and holds free) and what FSDP holds gathered: the unsharded parameters of each
  unit and the flat all-gather buffers, before and after each unit's forward (and its
  recomputation under checkpointing), around every all-gather, the backward, the gradient
  all-reduce, the optimizer step and the heap trim.

Prints per rank the resident set before loading (the runtime), after loading, and its peak in
each step, with the events around the step's peak and what they say was live there. ``--json``
writes the samples and events. The figures are MiB (2**20 bytes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import finetune_job
from _malloc import mallinfo

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20

SAMPLER = r"""
import os, sys, time
pid, out = sys.argv[1], sys.argv[2]
page = os.sysconf("SC_PAGE_SIZE")
rows = []
path = f"/proc/{pid}/statm"
while True:
    try:
        with open(path) as f:
            fields = f.read().split()
    except OSError:
        break
    rows.append(f"{time.monotonic():.4f} {int(fields[1]) * page} {int(fields[2]) * page}")
    time.sleep(0.002)
with open(out, "w") as f:
    f.write("\n".join(rows))
"""


# --- the worker: one rank of lora-finetune, instrumented --------------------------------------------
def _rss() -> tuple[int, int]:
    with open("/proc/self/statm") as f:
        fields = f.read().split()
    page = os.sysconf("SC_PAGE_SIZE")
    return int(fields[1]) * page, int(fields[2]) * page


class Recorder:
    def __init__(self) -> None:
        self.events: list[dict] = []
        self.model = None
        self.step = 0
        self.phase = "load"

    def gathered(self) -> dict:
        """Bytes FSDP holds whole: unsharded parameters per unit, and flat all-gather buffers."""
        if self.model is None:
            return {}
        units: dict[str, int] = {}
        flat = 0
        seen: set[int] = set()
        comm = None
        for name, module in self.model.named_modules():
            get = getattr(module, "_get_fsdp_state", None)
            if get is None:
                continue
            state = get()
            comm = getattr(state, "_comm_ctx", comm)
            for group in state._fsdp_param_groups:
                total = 0
                for p in group.fsdp_params:
                    for t in getattr(p, "all_gather_outputs", []):
                        s = t.untyped_storage()
                        if s.data_ptr() not in seen and s.nbytes():
                            seen.add(s.data_ptr())
                            total += s.nbytes()
                if total:
                    units[name or "root"] = total
                result = getattr(group, "_all_gather_result", None)
                if result is not None and result.all_gather_output is not None:
                    flat += result.all_gather_output.untyped_storage().nbytes()
        ag = getattr(comm, "all_gather_state", None)
        if ag is not None:
            flat += ag.all_gather_result.all_gather_output.untyped_storage().nbytes()
        return {"units": units, "flat": flat}

    def event(self, label: str) -> None:
        rss, file = _rss()
        row = {
            "t": time.monotonic(),
            "label": label,
            "step": self.step,
            "phase": self.phase,
            "rss": rss,
            "file": file,
        }
        m = mallinfo(unit=1)
        if m is not None:
            row.update(heap_used=m["heap_used"], heap_free=m["heap_free"], mmapped=m["mmapped"])
        row.update(self.gathered())
        self.events.append(row)


def _unit_names(model) -> dict:
    return {
        module: name or "root"
        for name, module in model.named_modules()
        if hasattr(module, "_get_fsdp_state")
    }


def instrument(rec: Recorder) -> None:
    import torch
    import torch.distributed as dist

    from lora.finetune import distributed, pipeline

    load = pipeline.load_sharded_phi3

    def loaded(*args, **kwargs):
        model = load(*args, **kwargs)
        rec.model = model
        rec.phase = "train"
        rec.event("loaded")
        for module, name in _unit_names(model).items():
            watch = [(name, module)]
            if name.startswith("model.layers."):
                watch += [(f"{name}.self_attn", module.self_attn), (f"{name}.mlp", module.mlp)]
            for label, m in watch:

                def pre(_m, _a, label=label):
                    rec.event(f"{'recompute' if rec.phase == 'backward' else 'forward'} {label} <")

                def post(_m, _a, _o, label=label):
                    rec.event(f"{'recompute' if rec.phase == 'backward' else 'forward'} {label} >")

                m.register_forward_pre_hook(pre, prepend=True)  # before FSDP gathers
                m.register_forward_pre_hook(
                    lambda _m, _a, label=label: rec.event(
                        f"{'recompute' if rec.phase == 'backward' else 'forward'} {label} gathered"
                    )
                )
                m.register_forward_hook(post)  # after FSDP reshards
        return model

    pipeline.load_sharded_phi3 = loaded

    all_gather = dist.all_gather_single

    def gather(output, input, *args, **kwargs):
        rec.event(f"all-gather {output.numel() * output.element_size() // MIB} MiB <")
        work = all_gather(output, input, *args, **kwargs)
        rec.event("all-gather >")
        return work

    dist.all_gather_single = gather

    backward = torch.Tensor.backward

    def traced_backward(self, *args, **kwargs):
        rec.phase = "backward"
        rec.event("backward <")
        try:
            return backward(self, *args, **kwargs)
        finally:
            rec.phase = "train"
            rec.event("backward >")

    torch.Tensor.backward = traced_backward  # type: ignore[method-assign]

    reduce = distributed.DistContext.reduce_gradients

    def traced_reduce(self, params):
        rec.event("all-reduce <")
        reduce(self, params)
        rec.event("all-reduce >")

    distributed.DistContext.reduce_gradients = traced_reduce  # type: ignore[method-assign]

    release = distributed.DistContext.release_freed_memory

    def traced_release(self):
        rec.event("trim <")
        release(self)
        rec.event("trim >")
        rec.step += 1

    distributed.DistContext.release_freed_memory = traced_release  # type: ignore[method-assign]

    from torch.optim.optimizer import (
        register_optimizer_step_post_hook,
        register_optimizer_step_pre_hook,
    )

    register_optimizer_step_pre_hook(lambda *a: rec.event("optimizer <"))
    register_optimizer_step_post_hook(lambda *a: rec.event("optimizer >"))


def worker(out: Path, argv: list[str]) -> None:
    rank = int(os.environ.get("RANK", "0"))
    sampler = subprocess.Popen(
        [sys.executable, "-c", SAMPLER, str(os.getpid()), str(out / f"samples{rank}.txt")]
    )
    rec = Recorder()
    rec.event("start")
    instrument(rec)
    from lora.finetune.__main__ import main

    try:
        main(argv)
    finally:
        rec.event("end")
        (out / f"events{rank}.json").write_text(json.dumps(rec.events))
    del sampler  # it ends when this process does, and writes its file then


# --- the parent: checkpoint, run, report ------------------------------------------------------------
def _mib(b: float) -> str:
    return f"{b / MIB:,.0f}"


def report(out: Path, nproc: int, weights: list[float]) -> None:
    for rank in range(nproc):
        path = out / f"samples{rank}.txt"
        for _ in range(100):
            if path.exists():
                break
            time.sleep(0.1)
        samples = [tuple(map(float, line.split())) for line in path.read_text().splitlines()]
        events = json.loads((out / f"events{rank}.json").read_text())
        loaded = next(e for e in events if e["label"] == "loaded")
        start = events[0]
        load_peak = max((s for s in samples if s[0] <= loaded["t"]), key=lambda s: s[1])
        print(
            f"rank {rank}: {len(samples)} samples; resident before loading {_mib(start['rss'])} "
            f"MiB, at its load peak {_mib(load_peak[1])} (file-backed {_mib(load_peak[2])}), "
            f"after loading {_mib(loaded['rss'])}; weights held {weights[rank]:,.0f}"
        )
        steps = sorted({e["step"] for e in events if e["t"] > loaded["t"]})
        for step in steps:
            evs = [e for e in events if e["step"] == step and e["t"] > loaded["t"]]
            if not evs or evs[-1]["label"] == "end" and len(evs) == 1:
                continue
            t0, t1 = evs[0]["t"], evs[-1]["t"]
            window = [s for s in samples if t0 <= s[0] <= t1]
            if not window:
                continue
            peak = max(window, key=lambda s: s[1])
            before = [e for e in evs if e["t"] <= peak[0]]
            after = [e for e in evs if e["t"] > peak[0]]
            print(
                f"  step {step + 1}: {t1 - t0:6.1f} s, peak resident {_mib(peak[1])} MiB "
                f"(file-backed {_mib(peak[2])}) at +{peak[0] - t0:.1f} s"
            )
            for e in before[-3:] + after[:2]:
                units = ", ".join(f"{k} {_mib(v)}" for k, v in e.get("units", {}).items())
                print(
                    f"    {'>' if e in after[:1] else ' '} {e['label']:<40} rss {_mib(e['rss']):>6}"
                    f"  heap used {_mib(e.get('heap_used', 0)):>5} free "
                    f"{_mib(e.get('heap_free', 0)):>5} mmapped {_mib(e.get('mmapped', 0)):>5}"
                    f"  gathered [{units}] flat {_mib(e.get('flat', 0))}"
                )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--full", action="store_true", help="32 layers: full-size Phi-3-mini")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--per-device", type=int, default=1, help="packed rows of --seq a rank")
    ap.add_argument("--hidden", type=int, default=3072, help="hidden size (heads of 96)")
    ap.add_argument("--intermediate", type=int, default=8192)
    ap.add_argument(
        "--reply-words",
        type=int,
        default=1,
        help="words of each assistant reply (the labelled tokens; 1: ~1 token in 8 labelled)",
    )
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--ckpt", help="a checkpoint directory written by an earlier run")
    ap.add_argument("--json", help="write the samples and events here (a directory)")
    args, rest = ap.parse_known_args()
    if args.worker:
        worker(Path(args.worker), rest[1:] if rest[:1] == ["--"] else rest)
        return
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT))
    import torch
    from tiny import chat_records, write_checkpoint, write_jsonl

    work = Path(tempfile.mkdtemp(prefix="fsdp-memory-"))
    layers = 32 if args.full else args.layers
    if args.ckpt:
        ckpt = Path(args.ckpt)
        layers = json.loads((ckpt / "config.json").read_text())["num_hidden_layers"]
    else:
        ckpt = write_checkpoint(
            work / "ckpt",
            vocab_size=32064,
            hidden_size=args.hidden,
            intermediate_size=args.intermediate,
            num_hidden_layers=layers,
            num_attention_heads=args.hidden // 96,
            num_key_value_heads=args.hidden // 96,
            max_position_embeddings=max(4096, args.seq),
            dtype=torch.bfloat16,
        )
        print(f"checkpoint: {ckpt}")
    rows_needed = args.nproc * args.per_device * args.steps
    records = chat_records(200 + rows_needed * args.seq // max(1, args.reply_words))
    for record in records:  # "say W" -> "W W ... W": longer replies, more labelled tokens
        reply = record["messages"][-1]
        reply["content"] = " ".join([reply["content"]] * args.reply_words)
    data = write_jsonl(work / "chat.jsonl", records)
    config = work / "config.json"
    config.write_text(
        json.dumps(finetune_job(steps=args.steps, seq=args.seq, per_device=args.per_device))
    )
    out = Path(args.json) if args.json else work / "trace"
    out.mkdir(parents=True, exist_ok=True)
    env = dict(
        os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={args.nproc}",
        __file__,
        "--worker",
        str(out),
        "--",
        "--model",
        str(ckpt),
        "--data",
        str(data),
        "--config",
        str(config),
        "--output",
        str(work / "run"),
        "--no-progress",
        "--fsdp",
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rows = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines() if x]
    train = [r for r in rows if "loss" in r]
    print(
        f"{layers} layers, {args.per_device} x {args.seq} tokens a rank, {args.steps} steps, "
        f"{wall:.0f} s; losses "
        + ", ".join(f"{r['loss']:.6f}" for r in train)
        + "; peak per rank (VmHWM) "
        + ", ".join(f"{m:,.0f}" for m in train[-1]["memory_mb"])
        + " MiB; tokens/s (both ranks) "
        + ", ".join(f"{r['tokens_per_second']:.1f}" for r in train)
    )
    report(out, args.nproc, train[-1]["params_mb"])


if __name__ == "__main__":
    main()
