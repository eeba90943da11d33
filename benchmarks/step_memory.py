"""Where a training step's peak resident set falls, and what is in it: a breakdown of one process.

    python benchmarks/step_memory.py [--layers 32] [--dtype bfloat16] [--checkpoint-layers N]
        [--no-checkpointing] [--steps 3] [--from-pretrained DIR] [--save DIR] [--json PATH]
        [--batch 1] [--labels all|chat] [--variant ours|peft]

bench_step.py's end-to-end shape is ``--layers 2 --batch 2 --no-checkpointing``; ``--variant peft``
measures transformers' Phi-3 + PEFT the same way (built as bench_step.py builds it; the same phase
hooks on its decoder layers and final norm).

Builds the model as bench_step.py does (ours: lora.models.Phi3ForCausalLM, deterministic random
weights, r=16 all-linear LoRA, AdamW over the adapters; Phi-3-mini's shapes), or loads it with
``Phi3ForCausalLM.from_pretrained(DIR)`` + ``lora.inject`` as lora-finetune does (``--save DIR``
first writes such a checkpoint of the random weights). It prints the resident set (VmRSS) after
``import torch``, after building, after inject, after each step, and the peak (VmHWM, reset after
building), and for each step where the peak fell: a thread samples the resident set every ~2 ms
and hooks name the phase the step is in (forward of layer i, the loss, the recomputation and
backward of layer i, the optimizer step). At each new high it also reads glibc's mallinfo2: the
bytes malloc has handed out (mmapped blocks and heap in use, i.e. tensors and everything else
that mallocs) and the heap's free bytes (slack that may be resident; pages a trim handed back still count as free,
so after a trim free bytes overstate the resident slack). A layer that is not checkpointed is
marked "bwd L<i>" when the gradient of its output arrives (a tensor hook), where its backward
starts.

Linux + glibc only (``/proc/self``, ``mallinfo2``). Nothing here asserts anything.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import threading
import time

from _malloc import mallinfo

T0 = time.perf_counter()


def status_kib(*keys: str) -> dict[str, int]:
    out = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            k = line.split(":", 1)[0]
            if k in keys:
                out[k] = int(line.split()[1])
    return out


def rss_mib() -> float:
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class Sampler:
    """A thread reading VmRSS every ``interval`` s; remembers the highest sample, the phase it fell
    in and mallinfo2 at that moment, and the highest sample of each phase."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.phase = "idle"
        self.peak = 0.0
        self.at_peak: dict = {}
        self.per_phase: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def reset(self) -> None:
        self.peak, self.at_peak, self.per_phase = 0.0, {}, {}

    def _run(self) -> None:
        while not self._stop.is_set():
            r, phase = rss_mib(), self.phase
            if r > self.per_phase.get(phase, 0.0):
                self.per_phase[phase] = r
            if r > self.peak + 1.0:
                self.peak = r
                self.at_peak = dict(rss=r, phase=phase, malloc=mallinfo())
            time.sleep(self.interval)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=3072)
    ap.add_argument("--intermediate", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=32064)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--labels", choices=("all", "chat"), default="all")
    ap.add_argument(
        "--variant",
        choices=("ours", "peft"),
        default="ours",
        help="peft: transformers' Phi-3 + PEFT, built as bench_step.py builds it",
    )
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    ap.add_argument("--no-checkpointing", action="store_true")
    ap.add_argument("--checkpoint-layers", type=int, default=None)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--from-pretrained", default=None, metavar="DIR")
    ap.add_argument("--save", default=None, metavar="DIR", help="write the random model, and exit")
    ap.add_argument(
        "--trainer-optimizer",
        action="store_true",
        help="AdamW as lora-finetune makes it (make_optimizer: foreach=False, decay groups, clip)",
    )
    ap.add_argument(
        "--trim",
        default="",
        help="comma list of where to call trim_heap (malloc_trim(0)): ready, step (after the "
        "optimizer step), loss (before the loss), backward (before loss.backward), layers (before "
        "each decoder layer, forward and backward), mlp (before each MLP's forward and backward)",
    )
    ap.add_argument(
        "--release-heap-every",
        type=int,
        default=4,
        metavar="K",
        help="model.model.release_heap_every (0: no trim between layers)",
    )
    ap.add_argument(
        "--ab-pairs",
        type=int,
        default=0,
        metavar="P",
        help="then (every layer checkpointed unless --no-checkpointing) P pairs of steps alternating "
        "release_heap_every = K and 0 (ABBA order): seconds and minor faults of each",
    )
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    report: dict = {"rss_mib": {}}

    def mark(name: str) -> None:
        gc.collect()
        r = rss_mib()
        report["rss_mib"][name] = r
        print(
            f"[{time.perf_counter() - T0:7.1f} s] {name:28s} RSS {r:8.0f} MiB  {mallinfo()}"
            f"{'  (torch._dynamo imported)' if 'torch._dynamo' in sys.modules else ''}",
            flush=True,
        )

    mark("start (python)")
    import torch

    mark("import torch")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_step as B

    import lora
    from lora.models.phi3 import Phi3Config, Phi3ForCausalLM

    bargs = B.parse_args(
        [
            f"--layers={args.layers}",
            f"--hidden={args.hidden}",
            f"--intermediate={args.intermediate}",
            f"--vocab={args.vocab}",
            f"--batch={args.batch}",
            f"--seq={args.seq}",
            f"--dtype={args.dtype}",
            f"--labels={args.labels}",
        ]
    )
    dtype = bargs.torch_dtype
    if args.variant == "peft":
        model = B.build_peft(
            bargs, not args.no_checkpointing, built=lambda: mark("built (random, cast)")
        )
        B.fill_lora_A(model)
        mark("inject")
        decoder = model.base_model.model.model
    else:
        if args.from_pretrained:
            model = Phi3ForCausalLM.from_pretrained(args.from_pretrained, dtype=dtype)
            report["load_hwm_mib"] = status_kib("VmHWM")["VmHWM"] / 1024
            mark("from_pretrained")
        else:
            model = Phi3ForCausalLM(Phi3Config(**B.model_dims(bargs)))
            B.fill_base_weights(model)
            model.to(dtype)
            mark("built (random, cast)")
            if args.save:
                model.save_pretrained(args.save)
                print(f"saved {args.save}")
                return
        lora.inject(model, lora.LoRAConfig(**B.LORA))
        B.fill_lora_A(model)
        mark("inject")
        if not args.no_checkpointing:
            model.gradient_checkpointing_enable(layers=args.checkpoint_layers)
        model.model.release_heap_every = args.release_heap_every
        decoder = model.model
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if args.trainer_optimizer:
        from lora.finetune.config import TrainingConfig
        from lora.finetune.trainer import make_optimizer

        opt = make_optimizer(TrainingConfig(output_dir="/tmp/unused"), params)
    else:
        opt = torch.optim.AdamW(params, lr=1e-3)
    mark("optimizer")
    input_ids, labels = B.make_inputs(bargs)
    mark("ready")
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    adapters = sum(p.numel() * p.element_size() for p in params) / 2**20
    print(f"weights {weights:.0f} MiB (of which trainable {adapters:.0f} MiB)")
    report.update(weights_mib=weights, trainable_mib=adapters)

    from lora.finetune.distributed import trim_heap as _trim_heap

    trim_time = [0.0, 0]

    def trim_heap() -> None:
        t = time.perf_counter()
        _trim_heap()
        trim_time[0] += time.perf_counter() - t
        trim_time[1] += 1

    trims = set(filter(None, args.trim.split(",")))
    if "ready" in trims:
        trim_heap()
        mark("ready, trimmed")
    sampler = Sampler().start()
    state = {"backward": False}

    def layer_hook(i):
        def hook(module, inputs):
            sampler.phase = f"{'bwd' if state['backward'] else 'fwd'} L{i:02d}"
            if "layers" in trims:
                trim_heap()

        return hook

    def output_hook(i):
        # A layer that is not checkpointed runs no forward in backward: its backward starts when
        # the gradient of its output is ready.
        def on_grad(grad):
            sampler.phase = f"bwd L{i:02d}"
            if "layers" in trims:
                trim_heap()

        def hook(module, inputs, output):
            out = output[0] if isinstance(output, tuple) else output
            if not state["backward"] and out.requires_grad:
                out.register_hook(on_grad)

        return hook

    def mlp_pre_hook(module, inputs):
        if "mlp" in trims and torch.is_grad_enabled():
            trim_heap()

    def mlp_hook(module, inputs, output):
        if "mlp" in trims and not state["backward"] and output.requires_grad:
            output.register_hook(lambda grad: trim_heap())

    for i, layer in enumerate(decoder.layers):
        layer.register_forward_pre_hook(layer_hook(i))
        layer.register_forward_hook(output_hook(i))
        layer.mlp.register_forward_pre_hook(mlp_pre_hook)
        layer.mlp.register_forward_hook(mlp_hook)

    def norm_hook(module, inputs, output):
        if not state["backward"]:
            sampler.phase = "loss"
            if "loss" in trims:
                trim_heap()

    decoder.norm.register_forward_hook(norm_hook)

    steps = []
    for step in range(args.steps):
        reset_hwm()
        sampler.reset()
        trim_time[:] = [0.0, 0]
        torch.manual_seed(1234 + step)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = time.perf_counter()
        sampler.phase = "zero_grad"
        opt.zero_grad(set_to_none=True)
        sampler.phase = "forward"
        state["backward"] = False
        loss = model(input_ids, labels=labels).loss
        sampler.phase = "backward (head)"
        state["backward"] = True
        if "backward" in trims:
            trim_heap()
        loss.backward()
        if args.trainer_optimizer:
            sampler.phase = "clip"
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        sampler.phase = "optimizer"
        opt.step()
        sampler.phase = "after"
        if "step" in trims:
            trim_heap()
        dt = time.perf_counter() - t
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        time.sleep(0.05)
        hwm = status_kib("VmHWM")["VmHWM"] / 1024
        row = dict(
            step=step + 1,
            seconds=dt,
            loss=float(loss.detach()),
            hwm_mib=hwm,
            rss_after_mib=rss_mib(),
            sampled_peak=sampler.at_peak,
            minor_faults=faults,
            trim_s=trim_time[0],
            trims=trim_time[1],
            per_phase_peak={k: round(v) for k, v in sorted(sampler.per_phase.items())},
        )
        steps.append(row)
        top = sorted(sampler.per_phase.items(), key=lambda kv: -kv[1])[:6]
        print(
            f"step {step + 1}: {dt:6.1f} s loss {float(loss.detach()):.6f}  VmHWM {hwm:.0f} MiB  "
            f"RSS after {row['rss_after_mib']:.0f}  faults {faults}  trims {trim_time[1]} in {trim_time[0]:.3f} s  sampled peak {sampler.at_peak}\n"
            f"   highest phases: {[(k, round(v)) for k, v in top]}",
            flush=True,
        )
    sampler.stop()
    report["steps"] = steps
    if args.ab_pairs:
        if not args.no_checkpointing:
            model.model.checkpoint_layers = None
            if model.model.gradient_checkpointing is False:
                model.gradient_checkpointing_enable()
        ab: dict[int, list] = {args.release_heap_every: [], 0: []}
        order = [args.release_heap_every, 0, 0, args.release_heap_every] * args.ab_pairs
        for k in order[: 2 * args.ab_pairs]:
            model.model.release_heap_every = k
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            model(input_ids, labels=labels).loss.backward()
            opt.step()
            dt = time.perf_counter() - t
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
            ab[k].append((dt, faults))
            print(f"A/B release_heap_every={k}: {dt:6.1f} s  minor faults {faults}", flush=True)
        report["ab"] = {str(k): v for k, v in ab.items()}
        on = sorted(t for t, _ in ab[args.release_heap_every])
        off = sorted(t for t, _ in ab[0])
        print(f"A/B medians: on {on[len(on) // 2]:.2f} s, off {off[len(off) // 2]:.2f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
