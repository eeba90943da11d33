"""One LoRA fine-tuning step (forward + backward + AdamW step) of a Phi-3-shaped model, ours beside PEFT.

Defaults: Phi-3-mini's layer shapes (hidden 3072, intermediate 8192, 32 heads, vocab 32064) with 2
layers, batch 2 x 512, in fp32; --dtype bfloat16 for the recipe's dtype; --labels all|chat (every
token labelled, or the last quarter); --full for the whole 32-layer Phi-3-mini (batch 1 x 512, bf16,
activation checkpointing, each variant in its own process: it takes minutes and ~10 GB each);
--small for the earlier small model (hidden 512, 4 layers, batch 4 x 256). --json writes the figures.

Ours: lora.models.Phi3ForCausalLM + lora.inject. Theirs: transformers.Phi3ForCausalLM (sdpa) +
peft.get_peft_model. Both: r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", the
same base weights and LoRA A matrices, the same inputs, and a chat-like label mask (the first 75% of
each sequence is prompt, labelled -100; the loss covers the rest). The losses of the first two steps
are compared before anything is timed.

Time: 2 warm-up steps each, then --repeat steps of each variant, interleaved (ours, peft, peft,
ours, ...) so that both see the same machine noise; medians are reported. Memory: each variant runs
again in its own subprocess (--variant ours|peft), which reports (a) peak RSS during the steps minus
the RSS right after building the model and inputs, and (b) the peak of the torch CPU allocator's
live bytes during one step, from torch.profiler(profile_memory=True). The C heap's setting is the
same for both (--heap): by default what ours sets itself (in 16-bit, freed pages reused, set once
the models are built), glibc's own with --heap glibc, or reused in any dtype with --heap reuse.
Machines are shared and noisy:
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
import subprocess
import sys
import warnings
import zlib

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")

PROMPT_FRACTION = 0.75  # the first 75% of each sequence is prompt (label -100)
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear")
VARIANTS = ("ours", "peft")


# --- building --------------------------------------------------------------------------------------------
def shape_of(args) -> dict:
    """The model and batch shape, as the JSON reports record it."""
    keys = ("vocab", "hidden", "intermediate", "layers", "heads", "kv_heads", "batch", "seq")
    return {k: getattr(args, k) for k in keys}


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
    place (no second copy of the model is ever held): N(0, 0.02) per tensor, seeded by its name; norms = 1.
    Drawn by a generator on the tensor's device: CPU and CUDA builds differ, two builds on one device agree."""
    for name, p in model.named_parameters():
        if "lora_" in name:
            continue
        if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            gen = torch.Generator(p.device).manual_seed(zlib.crc32(name.encode()))
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
        gen = torch.Generator(p.device).manual_seed(zlib.crc32(key.encode()))
        bound = 1.0 / p.shape[1] ** 0.5
        p.uniform_(-bound, bound, generator=gen)


class UnderAutocast:
    """A model whose calls run under ``torch.autocast(device, bf16)`` (``--autocast``: fp32
    weights, bf16 compute, as transformers' Trainer runs ``bf16=True`` on a model loaded in
    fp32); everything else is the model's."""

    def __init__(self, model, device: str):
        self.model, self.device = model, device

    def __call__(self, *args, **kwargs):
        with torch.autocast(self.device, dtype=torch.bfloat16):
            return self.model(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.model, name)


def build(variant: str, args, device: str | torch.device = "cpu"):
    """(model in train mode, AdamW over its trainable parameters), built on ``device``: the same
    weights for both variants on one device type (each tensor's generator is on its device).
    With ``args.autocast`` the model is called under bf16 autocast (:class:`UnderAutocast`)."""
    with torch.device(device):
        model, opt = _build(variant, args)
    if getattr(args, "autocast", False):
        model = UnderAutocast(model, torch.device(device).type)
    return model, opt


def _build(variant: str, args):
    dims = model_dims(args)
    if variant == "ours":
        import lora
        from lora.models.phi3 import Phi3Config, Phi3ForCausalLM

        model = Phi3ForCausalLM(Phi3Config(**dims))
        fill_base_weights(model)
        model.to(args.torch_dtype)
        lora.inject(model, lora.LoRAConfig(**LORA))  # lora_dtype="auto": fp32 adapters on bf16
        if args.checkpointing:
            model.gradient_checkpointing_enable(layers=args.checkpoint_layers)
        model.model.release_heap_every = args.release_heap_every
        model.model.reuse_heap = args.heap != "glibc"
    elif variant == "peft":
        model = build_peft(args, args.checkpointing)
    else:
        raise ValueError(variant)
    fill_lora_A(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params or any("lora_" not in n for n, p in model.named_parameters() if p.requires_grad):
        raise SystemExit(f"{variant}: expected only LoRA parameters to be trainable")
    opt = torch.optim.AdamW(params, lr=1e-3)
    return model, opt


def build_peft(args, checkpointing: bool, built=lambda: None):
    """transformers' Phi3ForCausalLM (sdpa) with the deterministic base weights in
    ``args.torch_dtype``, then ``peft.get_peft_model`` (LoRA A not yet filled); ``built()`` is
    called between the two (step_memory.py marks the resident set there)."""
    import peft
    import transformers

    config = transformers.Phi3Config(**model_dims(args), attn_implementation="sdpa")
    model = transformers.Phi3ForCausalLM(config)
    if model.config._attn_implementation != "sdpa":
        raise SystemExit(
            f"transformers picked attention {model.config._attn_implementation!r}, not sdpa"
        )
    fill_base_weights(model)
    model.to(args.torch_dtype)
    built()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # autocast_adapter_dtype (PEFT's default) keeps fp32 adapters on a bf16 base, as ours.
    return peft.get_peft_model(model, peft.LoraConfig(**LORA, task_type="CAUSAL_LM"))


def set_heap(args) -> bool:
    """Under ``--heap shipped`` in 16-bit (``reuse``: in any dtype): the freed pages reused from
    now on, for every model in the process (what ours' model sets itself in its first 16-bit
    training forward). Called once the models are built, so their construction's freed
    temporaries are not kept. Returns whether the setting is in effect."""
    import lora._heap

    sixteen = args.compute_dtype in (torch.bfloat16, torch.float16)
    if args.heap == "reuse" or (args.heap == "shipped" and sixteen):
        return lora._heap.reuse_freed_pages()
    return lora._heap.reusing_freed_pages()


def make_inputs(args) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, min(args.vocab, 32000), (args.batch, args.seq), generator=gen)
    labels = input_ids.clone()
    if args.labels == "chat":
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
    reusing = set_heap(args)
    base_rss = rss_mb()
    reset = reset_peak_rss()
    build_peak = maxrss_mb()
    steps = 2 + min(args.repeat, 3)
    for _ in range(steps):
        train_step(model, opt, input_ids, labels)
    peak_rss = maxrss_mb()
    step_times = []
    if args.time_in_subprocess:  # --full: two full-size models do not fit side by side
        step_times = C.interleaved(
            {"step": lambda: train_step(model, opt, input_ids, labels)}, args.repeat, warmup=0
        )["step"]
    alloc = (
        None
        if args.time_in_subprocess
        else allocator_peak_mb(lambda: train_step(model, opt, input_ids, labels))
    )
    return dict(
        variant=variant,
        base_rss_mb=base_rss,
        peak_rss_mb=peak_rss,
        working_set_mb=peak_rss - base_rss,
        hiwater_reset=reset,
        freed_pages_reused=reusing,
        # Without the reset, a construction peak above the steps' peak would hide the latter.
        build_peak_mb=build_peak,
        alloc_peak_mb=alloc,
        steps=steps,
        step_times=step_times,
    )


def memory_in_subprocess(variant: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--variant", variant, "--memory-only"]
    for key in (
        "vocab",
        "hidden",
        "intermediate",
        "layers",
        "heads",
        "kv_heads",
        "batch",
        "seq",
        "repeat",
        "dtype",
        "labels",
    ):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    if args.checkpointing:
        cmd.append("--checkpointing")
    if args.autocast:
        cmd.append("--autocast")
    if args.checkpoint_layers is not None:
        cmd += ["--checkpoint-layers", str(args.checkpoint_layers)]
    cmd += ["--release-heap-every", str(args.release_heap_every), "--heap", args.heap]
    if args.time_in_subprocess:
        cmd.append("--time-in-subprocess")
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
    table = prof.key_averages().table(
        sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=45
    )
    print(f"\n--- torch.profiler, one step of {name}: top {top} ops by self CPU time ---")
    print(table)
    return table


def model_flops(args, n_logits: int) -> float:
    """FLOPs one LoRA step must do at least: forward and input-gradient of every frozen matmul
    (2 x 2 x params x tokens; a frozen weight needs no weight gradient), causal attention (forward
    2·b·s²·h a layer, backward twice that), and the output head at the n_logits positions where
    logits are needed. The adapters' own matmuls (r = 16: under 2%) and elementwise work are left out."""
    h, inter, kv = args.hidden, args.intermediate, args.kv_heads * (args.hidden // args.heads)
    per_layer = h * (h + 2 * kv) + h * h + h * 2 * inter + inter * h
    tokens = args.batch * args.seq
    linear = 2 * 2 * per_layer * args.layers * tokens
    attention = 3 * args.layers * 2 * args.batch * args.seq**2 * h
    head = 2 * 2 * h * args.vocab * n_logits
    return float(linear + attention + head)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--vocab", type=int, default=32064)
    ap.add_argument("--hidden", type=int, default=3072)
    ap.add_argument("--intermediate", type=int, default=8192)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=32)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument(
        "--autocast",
        action="store_true",
        help="fp32 weights, each step under torch.autocast(bf16) for both (transformers' "
        "Trainer's bf16=True on a model loaded in fp32); MFU over the bf16 matmul peak",
    )
    ap.add_argument(
        "--labels",
        choices=("all", "chat"),
        default="all",
        help="all: every token labelled; chat: only the last quarter of each sequence",
    )
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing in both")
    ap.add_argument(
        "--checkpoint-layers",
        type=int,
        default=None,
        metavar="N",
        help="with --checkpointing: ours checkpoints only the first N decoder layers (PEFT: all)",
    )
    ap.add_argument(
        "--release-heap-every",
        type=int,
        default=4,
        metavar="K",
        help="ours: under --checkpointing trim the C heap every K layers, without it around "
        "every layer (0: never; model.model.release_heap_every)",
    )
    ap.add_argument(
        "--heap",
        choices=("shipped", "glibc", "reuse"),
        default="shipped",
        help="the C heap's setting, the same for both variants: shipped (default) = what ours "
        "sets itself, in 16-bit the freed pages reused (lora._heap.reuse_freed_pages, set after "
        "the models are built), in fp32 glibc's own; glibc = glibc's own setting for both "
        "(ours' model.model.reuse_heap off); reuse = freed pages reused for both in any dtype",
    )
    ap.add_argument(
        "--small",
        action="store_true",
        help="the earlier small model: hidden 512, intermediate 1376, 4 layers, 8 heads, 4 x 256",
    )
    ap.add_argument(
        "--full",
        action="store_true",
        help="full-size Phi-3-mini: 32 layers, batch 1 x 512, bf16, checkpointing, one process each",
    )
    ap.add_argument("--repeat", type=int, default=C.MIN_REPEAT)
    ap.add_argument(
        "--peak-flops",
        type=float,
        default=None,
        help="the machine's matmul peak in this dtype (FLOP/s); measured when not given",
    )
    ap.add_argument("--variant", choices=("both",) + VARIANTS, default="both")
    ap.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="after timing, print torch.profiler's top N ops of one step of each variant",
    )
    ap.add_argument("--json", default=None, help="write the figures here")
    ap.add_argument(
        "--memory-only", action="store_true", help=argparse.SUPPRESS
    )  # the subprocess mode
    ap.add_argument("--time-in-subprocess", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.small:
        args.hidden, args.intermediate, args.layers, args.heads, args.kv_heads = 512, 1376, 4, 8, 8
        args.batch, args.seq = 4, 256
    if args.full:
        args.layers, args.batch, args.seq, args.dtype, args.checkpointing = (
            32,
            1,
            512,
            "bfloat16",
            True,
        )
        args.time_in_subprocess = True
    args.torch_dtype = getattr(torch, args.dtype)
    if args.autocast and args.torch_dtype != torch.float32:
        ap.error(f"--autocast runs an fp32 model under bf16 autocast; got --dtype {args.dtype}")
    # the dtype the matmuls run in: the MFU's peak
    args.compute_dtype = torch.bfloat16 if args.autocast else args.torch_dtype
    return args


def main() -> None:
    args = parse_args()
    if args.memory_only:
        print(json.dumps(measure_memory(args.variant, args)))
        return

    variants = VARIANTS if args.variant == "both" else (args.variant,)
    # Memory first, while this process is still small (and, with --full, the timing too).
    mem = {v: memory_in_subprocess(v, args) for v in variants}
    input_ids, labels = make_inputs(args)
    n_labelled = int((labels[:, 1:] != -100).sum())
    print(
        f"Phi-3-shaped: vocab={args.vocab} hidden={args.hidden} intermediate={args.intermediate} "
        f"layers={args.layers} heads={args.heads}/{args.kv_heads}; batch={args.batch} seq={args.seq} "
        f"({n_labelled} of {args.batch * (args.seq - 1)} targets labelled); "
        f"LoRA r={LORA['r']} alpha={LORA['lora_alpha']} dropout={LORA['lora_dropout']} all-linear; "
        f"{args.dtype}{' under bf16 autocast' if args.autocast else ''}"
        f"{'; checkpointing' if args.checkpointing else ''}; heap {args.heap}"
        f"{f' (ours: the first {args.checkpoint_layers} layers)' if args.checkpoint_layers is not None else ''}; "
        f"torch {torch.__version__}, threads={torch.get_num_threads()}",
        flush=True,
    )
    losses = {}
    if args.time_in_subprocess:
        times = {v: mem[v]["step_times"] for v in variants}
    else:
        models = {v: build(v, args) for v in variants}
        set_heap(args)
        losses = check_losses(models, input_ids, labels)
        tol = 1e-4 if args.compute_dtype == torch.float32 else 3e-2
        for step in range(2):
            line = "  ".join(f"{v} {losses[v][step]:.6f}" for v in variants)
            if len(variants) == 2:
                a, b = (losses[v][step] for v in variants)
                rel = abs(a - b) / max(abs(a), 1e-12)
                line += f"   rel diff {rel:.2e}"
                # Step 1 must match (B = 0: the base model's loss). Step 2 matches too when both draw the
                # same dropout masks, an implementation detail: reported, not required.
                if step == 0 and rel > tol:
                    raise SystemExit(
                        "the two variants compute different losses on the first step: "
                        "timing them is meaningless"
                    )
            print(f"loss, step {step + 1}: {line}")
        # check_losses was the warm-up (2 steps each); the variants are timed interleaved.
        times = C.interleaved(
            {
                v: (lambda m=m, o=o: train_step(m, o, input_ids, labels))
                for v, (m, o) in models.items()
            },
            args.repeat,
            warmup=1,
        )
    med = {v: C.median(t) for v, t in times.items()}
    peak = args.peak_flops or C.matmul_peak(args.compute_dtype)["flops"]
    # Ours computes logits only at labelled positions; transformers at every position.
    n_logits = {"ours": n_labelled, "peft": args.batch * args.seq}
    flops = model_flops(args, n_labelled)
    tokens = args.batch * args.seq
    rows = {}
    for v in variants:
        rows[v] = dict(
            step_s=med[v],
            tokens_per_s=tokens / med[v],
            spread=C.spread(times[v]),
            mfu=flops / med[v] / peak,
            peak_rss_mb=mem[v]["peak_rss_mb"],
            working_set_mb=mem[v]["working_set_mb"],
            alloc_peak_mb=mem[v]["alloc_peak_mb"],
            n_logits=n_logits[v],
            losses=losses.get(v),
        )
    print(
        f"\nmedian of {len(times[variants[0]])} steps (forward + backward + AdamW); variants interleaved; "
        f"model FLOPs {flops / 1e9:.0f} G a step; matmul peak {peak / 1e9:.0f} GFLOP/s"
    )
    print(
        f"{'variant':8s} {'step ms':>9s} {'tokens/s':>9s} {'MFU':>6s} {'spread':>7s} {'peak RSS MB':>12s} "
        f"{'RSS work MB':>12s} {'alloc MB':>9s}"
    )
    for v, r in rows.items():
        alloc = "n/a" if r["alloc_peak_mb"] is None else f"{r['alloc_peak_mb']:.0f}"
        print(
            f"{v:8s} {r['step_s'] * 1e3:9.1f} {r['tokens_per_s']:9.1f} {r['mfu']:6.1%} {r['spread']:7.1%} "
            f"{r['peak_rss_mb']:12.0f} {r['working_set_mb']:12.0f} {alloc:>9s}"
        )
    ratios = {}
    if len(variants) == 2:
        o, p = rows["ours"], rows["peft"]
        ratios = dict(
            speed=o["tokens_per_s"] / p["tokens_per_s"],
            peak_rss=o["peak_rss_mb"] / p["peak_rss_mb"],
            working_set=o["working_set_mb"] / max(p["working_set_mb"], 1e-9),
        )
        print(
            f"ours/peft: {ratios['speed']:.2f}x tokens/s, {ratios['peak_rss']:.2f}x peak RSS, "
            f"{ratios['working_set']:.2f}x RSS work"
        )
    print(
        "peak RSS = ru_maxrss of the variant's own process over its steps (model included); RSS work = that "
        "minus the RSS right after building the model and inputs."
    )
    profiles = {}
    if args.profile and not args.time_in_subprocess:
        for v in variants:
            profiles[v] = profile_top(v, *models[v], input_ids, labels, args.profile)
    if args.json:
        C.write_json(
            args.json,
            dict(
                profiles=profiles,
                machine=C.machine(),
                dtype=args.dtype,
                autocast=args.autocast,
                labels=args.labels,
                checkpointing=args.checkpointing,
                heap=args.heap,
                shape=shape_of(args),
                lora=LORA,
                model_flops=flops,
                peak_flops=peak,
                variants=rows,
                ours_over_peft=ratios,
            ),
        )


if __name__ == "__main__":
    main()
