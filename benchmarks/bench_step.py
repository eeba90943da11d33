"""One LoRA fine-tuning step (forward + backward + AdamW step) of a Phi-3-shaped model, ours beside PEFT.

Ours: lora.models.Phi3ForCausalLM + lora.inject. Theirs: transformers.Phi3ForCausalLM (sdpa) +
peft.get_peft_model. Both: r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", the
same base weights and LoRA A matrices, the same inputs, and a chat-like label mask (the first 75% of
each sequence is prompt, labelled -100; the loss covers the rest). The losses of the first two steps
are compared before anything is timed.

Time: 2 warm-up steps each, then --repeat steps of each variant, interleaved (ours, peft, peft,
ours, ...) so that both see the same machine noise; medians are reported. Memory: each variant runs
again in its own subprocess (--variant ours|peft), which reports (a) peak RSS during the steps minus
the RSS right after building the model and inputs, and (b) the peak of the torch CPU allocator's
live bytes during one step, from torch.profiler(profile_memory=True). Machines are shared and noisy:
trust the ratios, not the absolutes. Nothing here asserts on timings.

    python benchmarks/bench_step.py [--vocab 32064] [--hidden 512] [--intermediate 1376] [--layers 4]
        [--heads 8] [--kv-heads 8] [--batch 4] [--seq 256] [--repeat 10] [--variant both|ours|peft]
        [--profile N]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
import zlib

import torch

warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")

PROMPT_FRACTION = 0.75  # the first 75% of each sequence is prompt (label -100)
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear")
VARIANTS = ("ours", "peft")


# --- building --------------------------------------------------------------------------------------------
def model_dims(args) -> dict:
    """The config keys both Phi3Config classes take, identical for ours and transformers'."""
    return dict(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(4096, args.seq),
        # Phi-3's pad id (32000) is a row of its 32064-token vocabulary; a smaller --vocab has none.
        pad_token_id=32000 if args.vocab > 32000 else None,
        eos_token_id=32000 if args.vocab > 32000 else None,
        tie_word_embeddings=False,
    )


@torch.no_grad()
def fill_base_weights(model: torch.nn.Module) -> None:
    """Deterministic base weights, the same for any model with these parameter names and shapes, written in
    place (no second copy of the model is ever held): N(0, 0.02) per tensor, seeded by its name; norms = 1."""
    for name, p in model.named_parameters():
        if "lora_" in name:
            continue
        if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            p.normal_(0.0, 0.02, generator=gen)


@torch.no_grad()
def fill_lora_A(model: torch.nn.Module) -> None:
    """Deterministic LoRA A matrices (Kaiming-uniform-sized), seeded by the adapted module's base name, so
    that ours and PEFT start from the same adapter. B stays zero (both libraries' default)."""
    for name, p in model.named_parameters():
        if "lora_A" not in name:
            continue
        # ours: model.layers.0.mlp.down_proj.lora_A; PEFT: base_model.model.model.layers.0.mlp.down_proj.lora_A.default.weight
        key = name.removeprefix("base_model.model.").split(".lora_A")[0]
        gen = torch.Generator().manual_seed(zlib.crc32(key.encode()))
        bound = 1.0 / p.shape[1] ** 0.5
        p.uniform_(-bound, bound, generator=gen)


def build(variant: str, args):
    """(model in train mode, AdamW over its trainable parameters)."""
    dims = model_dims(args)
    if variant == "ours":
        import lora
        from lora.models.phi3 import Phi3Config, Phi3ForCausalLM

        model = Phi3ForCausalLM(Phi3Config(**dims))
        fill_base_weights(model)
        lora.inject(model, lora.LoRAConfig(**LORA))
    elif variant == "peft":
        import peft
        import transformers

        config = transformers.Phi3Config(**dims, attn_implementation="sdpa")
        model = transformers.Phi3ForCausalLM(config)
        if model.config._attn_implementation != "sdpa":
            raise SystemExit(f"transformers picked attention {model.config._attn_implementation!r}, not sdpa")
        fill_base_weights(model)
        model = peft.get_peft_model(model, peft.LoraConfig(**LORA, task_type="CAUSAL_LM"))
    else:
        raise ValueError(variant)
    fill_lora_A(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params or any("lora_" not in n for n, p in model.named_parameters() if p.requires_grad):
        raise SystemExit(f"{variant}: expected only LoRA parameters to be trainable")
    opt = torch.optim.AdamW(params, lr=1e-3)
    return model, opt


def make_inputs(args) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, min(args.vocab, 32000), (args.batch, args.seq), generator=gen)
    labels = input_ids.clone()
    labels[:, : int(PROMPT_FRACTION * args.seq)] = -100  # prompt tokens: no loss
    return input_ids, labels


def train_step(model, opt, input_ids, labels) -> torch.Tensor:
    opt.zero_grad(set_to_none=True)
    loss = model(input_ids, labels=labels).loss
    loss.backward()
    opt.step()
    return loss.detach()


def trainable_count(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --- memory (in a subprocess per variant) ----------------------------------------------------------------
def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def reset_peak_rss() -> bool:
    """Reset the high-water mark (ru_maxrss / VmHWM) to the current RSS (Linux >= 4.0), so that the peak
    read later is the steps' own and not the model construction's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def allocator_peak_mb(fn) -> float | None:
    """Peak of the torch CPU allocator's live bytes while fn() runs, above what was live when it started.

    torch.profiler(profile_memory=True) records every allocation and free that goes through c10's CPU
    allocator (tensors), in order; the running sum of their sizes is the live-bytes curve. Blocks
    allocated before the profiler started and freed inside are not seen (they only lower the curve),
    nor is memory that libraries take outside the allocator (oneDNN/MKL scratch, Python objects).
    Returns None if this torch build does not expose the events.
    """
    try:
        from torch._C._profiler import _EventType
        from torch.profiler import ProfilerActivity, profile
    except ImportError:
        return None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    allocs = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            allocs.append((node.start_time_ns, node.typed[1].alloc_size))
        stack.extend(node.children)
    if not allocs:
        return None
    allocs.sort()
    live = peak = 0
    for _, size in allocs:
        live += size
        peak = max(peak, live)
    return peak / 2**20


def measure_memory(variant: str, args) -> dict:
    """Run in a fresh process: build, then steps; report the steps' working set."""
    model, opt = build(variant, args)
    input_ids, labels = make_inputs(args)
    gc.collect()
    base_rss = rss_mb()
    reset = reset_peak_rss()
    build_peak = maxrss_mb()
    steps = 2 + min(args.repeat, 3)
    for _ in range(steps):
        train_step(model, opt, input_ids, labels)
    peak_rss = maxrss_mb()
    alloc = allocator_peak_mb(lambda: train_step(model, opt, input_ids, labels))
    return dict(
        variant=variant,
        base_rss_mb=base_rss,
        peak_rss_mb=peak_rss,
        working_set_mb=peak_rss - base_rss,
        hiwater_reset=reset,
        # Without the reset, a construction peak above the steps' peak would hide the latter.
        build_peak_mb=build_peak,
        alloc_peak_mb=alloc,
        steps=steps,
    )


def memory_in_subprocess(variant: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--variant", variant, "--memory-only"]
    for key in ("vocab", "hidden", "intermediate", "layers", "heads", "kv_heads", "batch", "seq", "repeat"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"memory subprocess for {variant} failed:\n{out.stderr[-3000:]}")
    for line in reversed(out.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise SystemExit(f"memory subprocess for {variant} printed no result:\n{out.stdout[-2000:]}")


# --- timing --------------------------------------------------------------------------------------------
def check_losses(models, input_ids, labels) -> list[dict]:
    """The first two steps' losses of each variant (same seed for the dropout masks before each)."""
    losses = {}
    for name, (model, opt) in models.items():
        torch.manual_seed(1234)
        losses[name] = [train_step(model, opt, input_ids, labels).item() for _ in range(2)]
    return losses


def profile_top(name, model, opt, input_ids, labels, top: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train_step(model, opt, input_ids, labels)
    print(f"\n--- torch.profiler, one step of {name}: top {top} ops by self CPU time ---")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=45))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=32064)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1376)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--variant", choices=("both",) + VARIANTS, default="both")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="after timing, print torch.profiler's top N ops of one step of each variant")
    ap.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)  # the subprocess mode
    args = ap.parse_args()

    if args.memory_only:
        print(json.dumps(measure_memory(args.variant, args)))
        return

    variants = VARIANTS if args.variant == "both" else (args.variant,)
    # Memory first, while this process is still small.
    mem = {v: memory_in_subprocess(v, args) for v in variants}

    input_ids, labels = make_inputs(args)
    models = {v: build(v, args) for v in variants}
    n_labelled = int((labels[:, 1:] != -100).sum())
    print(
        f"Phi-3-shaped: vocab={args.vocab} hidden={args.hidden} intermediate={args.intermediate} "
        f"layers={args.layers} heads={args.heads}/{args.kv_heads}; batch={args.batch} seq={args.seq} "
        f"({n_labelled} of {args.batch * (args.seq - 1)} targets labelled); "
        f"LoRA r={LORA['r']} alpha={LORA['lora_alpha']} dropout={LORA['lora_dropout']} all-linear; fp32; "
        f"torch {torch.__version__}, threads={torch.get_num_threads()}"
    )
    print("trainable params: " + ", ".join(f"{v} {trainable_count(m):,}" for v, (m, _) in models.items()))

    losses = check_losses(models, input_ids, labels)
    ok = True
    for step in range(2):
        line = "  ".join(f"{v} {losses[v][step]:.6f}" for v in variants)
        if len(variants) == 2:
            a, b = (losses[v][step] for v in variants)
            rel = abs(a - b) / max(abs(a), 1e-12)
            line += f"   rel diff {rel:.2e}"
            # Step 1 must match (B = 0: the base model's loss). Step 2 matches too when both draw the same
            # dropout masks, which is an implementation detail: reported, not required.
            if step == 0 and rel > 1e-4:
                ok = False
        print(f"loss, step {step + 1}: {line}")
    if not ok:
        raise SystemExit("the two variants compute different losses on the first step: timing them is meaningless")

    # Warm-up (2 steps each; the loss check above already ran 2), then interleaved timing.
    for model, opt in models.values():
        for _ in range(2):
            train_step(model, opt, input_ids, labels)
    times = {v: [] for v in variants}
    for i in range(args.repeat):
        order = variants if i % 2 == 0 else variants[::-1]
        for v in order:
            model, opt = models[v]
            t0 = time.perf_counter()
            train_step(model, opt, input_ids, labels)
            times[v].append(time.perf_counter() - t0)
    med = {v: statistics.median(t) * 1e3 for v, t in times.items()}

    print(f"\nmedian of {args.repeat} steps (forward + backward + AdamW) after 2 warm-up steps; variants interleaved")
    print(f"{'variant':8s} {'step ms':>9s} {'min..max ms':>17s} {'RSS work MB':>12s} {'alloc peak MB':>14s}")
    for v in variants:
        m = mem[v]
        alloc = "n/a" if m["alloc_peak_mb"] is None else f"{m['alloc_peak_mb']:.0f}"
        spread = f"{min(times[v]) * 1e3:.0f}..{max(times[v]) * 1e3:.0f}"
        print(f"{v:8s} {med[v]:9.1f} {spread:>17s} {m['working_set_mb']:12.0f} {alloc:>14s}")
    if len(variants) == 2:
        o, p = mem["ours"], mem["peft"]
        ratio_alloc = (
            f"{p['alloc_peak_mb'] / o['alloc_peak_mb']:.2f}x"
            if o["alloc_peak_mb"] and p["alloc_peak_mb"] is not None else "n/a"
        )
        print(f"{'peft/ours':8s} {med['peft'] / med['ours']:8.2f}x {'':>17s} "
              f"{p['working_set_mb'] / max(o['working_set_mb'], 1e-9):11.2f}x {ratio_alloc:>14s}")
    print(
        "RSS work = peak RSS over the steps minus RSS right after building the model and inputs, one subprocess "
        "per variant" + ("" if all(m["hiwater_reset"] for m in mem.values()) else
                         " (WARNING: could not reset the RSS high-water mark; a construction peak may hide it)")
        + "; base RSS " + ", ".join(f"{v} {mem[v]['base_rss_mb']:.0f} MB" for v in variants) + "."
    )
    print("alloc peak = the torch CPU allocator's live-bytes peak during one step above the step's start "
          "(torch.profiler profile_memory); memory taken outside the allocator is not in it.")

    if args.profile:
        for v in variants:
            profile_top(v, *models[v], input_ids, labels, args.profile)


if __name__ == "__main__":
    main()
