"""QLoRA benchmarks: NF4 storage, a full-size Phi-3 LoRA step on a 4-bit base, and demo quality.

    python benchmarks/bench_qlora.py storage     # bytes of the base Linears, NF4 vs bf16 (fast)
    python benchmarks/bench_qlora.py memory      # Phi-3-mini / -medium weight memory, computed
    # peak RSS + tokens/s of one full-size step:
    flock /tmp/lora-heavy.lock python benchmarks/bench_qlora.py step --layers 32 --base nf4
    # tokens/s, nf4 vs bf16 base, same shapes:
    flock /tmp/lora-heavy.lock python benchmarks/bench_qlora.py speed --layers 2
    # step time on one 4-bit model, the recomputation keeping its decoded weights or not, alternating:
    flock /tmp/lora-heavy.lock python benchmarks/bench_qlora.py keep --layers 2 --rounds 4
    # demo held-out loss, nf4 vs bf16 base:
    flock /tmp/lora-heavy.lock python benchmarks/bench_qlora.py quality [--max-steps 400]
    # ours beside transformers + bitsandbytes + PEFT, interleaved steps in one process:
    flock /tmp/lora-heavy.lock python benchmarks/bench_qlora.py peft --layers 2 [--json FILE]

``step``: Phi-3-mini's shapes (vocab 32064, hidden 3072, intermediate 8192, 32 heads; --layers
of them) with random weights, built on the meta device and materialised tensor by tensor, each
base Linear quantised as soon as it exists (--base nf4), so the whole model is never in 16 bits.
LoRA r=16, alpha=32, all-linear, fp32 adapters, AdamW; one step at batch 1 × --seq 512 tokens with
activation checkpointing, compute in bf16. It prints peak RSS (ru_maxrss of its own process) and
tokens/s. ``speed`` runs ``step`` once per base in separate processes and prints the ratio.
``keep``: the same step on one 4-bit model, alternating rounds with and without
``lora.quant.keep_decoded_on_recompute`` (without it, backward decodes each weight a third time);
the fastest step of each counts, so load from elsewhere hurts both alike.
``peft``: the QLoRA step side by side with the peer: ours (``lora.quantize(model, "nf4")`` then
``lora.inject``) beside transformers' Phi-3 whose decoder Linears are bitsandbytes'
``Linear4bit`` (NF4, double quantisation, bf16 compute) under PEFT's LoRA, the same bf16 weights,
the same LoRA A matrices (B zero), r=16, alpha=32, dropout 0.05, every decoder Linear, the
embedding and head in bf16 on both sides, non-reentrant activation checkpointing in both; batch
1 × --seq, every token labelled. (PEFT's ``prepare_model_for_kbit_training`` is not applied: it
would cast the embedding, head and norms to fp32, a slower and larger model than ours.) The losses
of the first step are compared, then --repeat interleaved steps each (medians); then each side's
peak RSS over two steps in a process of its own (``--variant``, run first; the high-water mark
reset once the model is built, so the peak is the steps' with the model resident). Both reuse the heap's freed
pages (what ours sets itself in 16-bit training).
Nothing here asserts: these are measurements.
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lora  # noqa: E402
from lora.models import Phi3Config, Phi3ForCausalLM  # noqa: E402
from lora.quant import NF4Weight, quantizing_assign  # noqa: E402

MINI = dict(
    vocab_size=32064,
    hidden_size=3072,
    intermediate_size=8192,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=4096,
)
MEDIUM = dict(
    vocab_size=32064,
    hidden_size=5120,
    intermediate_size=17920,
    num_hidden_layers=40,
    num_attention_heads=40,
    num_key_value_heads=10,
    max_position_embeddings=4096,
)
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear")
NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


# --- storage --------------------------------------------------------------------------------------
def cmd_storage(args) -> dict:
    shapes = {
        "qkv_proj": (9216, 3072),
        "o_proj": (3072, 3072),
        "gate_up_proj": (16384, 3072),
        "down_proj": (3072, 8192),
    }
    rows = {}
    for name, shape in shapes.items():
        w = NF4Weight.from_float(torch.randn(shape, dtype=torch.bfloat16) * 0.02)
        bf16 = shape[0] * shape[1] * 2
        rows[name] = {
            "shape": shape,
            "nf4_bytes": w.nbytes(),
            "bf16_bytes": bf16,
            "ratio": w.nbytes() / bf16,
            "bits_per_param": w.nbytes() * 8 / (shape[0] * shape[1]),
        }
        print(
            f"{name:13s} {str(shape):14s} nf4 {w.nbytes():>11,d} B  bf16 {bf16:>11,d} B  "
            f"ratio {w.nbytes() / bf16:.4f}  ({rows[name]['bits_per_param']:.3f} bits/param)"
        )
    return rows


# --- memory, computed -----------------------------------------------------------------------------
def counts(dims: dict) -> dict:
    with torch.device("meta"):
        m = Phi3ForCausalLM(Phi3Config(**dims))
    linear = sum(
        mod.weight.numel()
        for n, mod in m.named_modules()
        if isinstance(mod, nn.Linear) and not n.endswith("lm_head")
    )
    total = sum(p.numel() for p in m.parameters())
    return {"total": total, "linear": linear, "rest": total - linear}


def cmd_memory(args) -> dict:
    out = {}
    for name, dims in (("Phi-3-mini", MINI), ("Phi-3-medium", MEDIUM)):
        c = counts(dims)
        bf16 = 2 * c["total"]
        nf4 = c["linear"] * NF4_BITS / 8 + 2 * c["rest"]
        out[name] = {**c, "bf16_weights": bf16, "nf4_weights": nf4}
        print(
            f"{name}: {c['total'] / 1e9:.2f}B parameters "
            f"({c['linear'] / 1e9:.2f}B in base Linears): "
            f"weights bf16 {gib(bf16)}, NF4 base + bf16 embedding/head {gib(nf4)}"
        )
    return out


# --- one full-size step ---------------------------------------------------------------------------
def build(dims: dict, base: str, dtype: torch.dtype) -> Phi3ForCausalLM:
    """Random weights, materialised tensor by tensor on CPU; NF4 Linears quantised as they come."""
    with torch.device("meta"):
        model = Phi3ForCausalLM(Phi3Config(**dims))
    assign = quantizing_assign(model, "nf4") if base == "nf4" else None
    g = torch.Generator().manual_seed(0)
    for name, t in list(model.state_dict(keep_vars=True).items()):
        value = torch.empty(t.shape, dtype=dtype)
        if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
            value.fill_(1.0)
        else:
            value.normal_(0.0, 0.02, generator=g)
        if assign is not None and assign(model, name, value):
            continue
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        setattr(owner, leaf, nn.Parameter(value, requires_grad=True))
        del value
    model.model.rotary_emb.reset_buffers("cpu")
    return model


def cmd_step(args) -> dict:
    torch.manual_seed(0)
    dims = {**MINI, "num_hidden_layers": args.layers}
    t0 = time.perf_counter()
    model = build(dims, args.base, torch.bfloat16)
    lora.inject(model, LORA)  # fp32 adapters over the bf16 / NF4 base
    model.gradient_checkpointing_enable()
    if args.release_heap_every is not None:
        model.model.release_heap_every = args.release_heap_every
    model.train()
    built_s = time.perf_counter() - t0
    rss_built = peak_rss_bytes()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=False)
    ids = torch.randint(0, dims["vocab_size"] - 100, (1, args.seq))
    times, losses = [], []
    for _ in range(args.steps):
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        losses.append(float(loss))
    step_s = min(times[1:]) if len(times) > 1 else times[0]
    result = {
        "base": args.base,
        "release_heap_every": model.model.release_heap_every,
        "layers": args.layers,
        "seq": args.seq,
        "steps": args.steps,
        "build_s": built_s,
        "step_s": step_s,
        "step_times": times,
        "tokens_per_s": args.seq / step_s,
        "peak_rss_bytes": peak_rss_bytes(),
        "rss_after_build_bytes": rss_built,
        "losses": losses,
        "threads": torch.get_num_threads(),
    }
    print(
        f"base={args.base} layers={args.layers} 1x{args.seq}: built in {built_s:.1f}s, "
        f"step {step_s:.1f}s ({args.seq / step_s:.1f} tokens/s), "
        f"peak RSS {gib(result['peak_rss_bytes'])} "
        f"(after build {gib(rss_built)}), loss {losses[-1]:.4f}"
    )
    if args.json:
        print("JSON " + json.dumps(result))
    return result


def cmd_keep(args) -> dict:
    from lora.models import phi3

    torch.manual_seed(0)
    dims = {**MINI, "num_hidden_layers": args.layers}
    model = build(dims, "nf4", torch.bfloat16)
    lora.inject(model, LORA)
    model.gradient_checkpointing_enable()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=False)
    ids = torch.randint(0, dims["vocab_size"] - 100, (1, args.seq))
    keep = phi3.keep_decoded_on_recompute

    def step(kept: bool) -> float:
        phi3.keep_decoded_on_recompute = keep if kept else (lambda fn: fn)  # type: ignore[assignment]
        try:
            t = time.perf_counter()
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return time.perf_counter() - t
        finally:
            phi3.keep_decoded_on_recompute = keep

    step(True)  # warm-up
    times: dict[str, list[float]] = {"kept": [], "decoded in backward": []}
    for _ in range(args.rounds):
        times["kept"].append(step(True))
        times["decoded in backward"].append(step(False))
    for name, ts in times.items():
        print(f"{name:20s} best {min(ts):.2f}s  all " + " ".join(f"{t:.2f}" for t in ts))
    ratio = min(times["decoded in backward"]) / min(times["kept"])
    print(f"layers={args.layers} 1x{args.seq}: decoding in backward takes {ratio:.3f}x the step")
    return times


def cmd_speed(args) -> dict:
    res = {}
    for base in ("bf16", "nf4"):
        cmd = [
            sys.executable,
            __file__,
            "step",
            "--base",
            base,
            "--layers",
            str(args.layers),
            "--seq",
            str(args.seq),
            "--steps",
            str(args.steps),
            "--json",
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        line = next(row for row in out.splitlines() if row.startswith("JSON "))
        res[base] = json.loads(line[5:])
        print(out.splitlines()[0])
    ratio = res["nf4"]["step_s"] / res["bf16"]["step_s"]
    print(
        f"nf4 / bf16 step time: {ratio:.2f}x  (tokens/s nf4 {res['nf4']['tokens_per_s']:.1f}, "
        f"bf16 {res['bf16']['tokens_per_s']:.1f})"
    )
    return res


# --- ours beside transformers + bitsandbytes + PEFT ----------------------------------------------
PEER_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]  # all-linear but the head


def _peer_shape(args) -> argparse.Namespace:
    """bench_step's shape arguments (its builders and model_dims read them): Phi-3-mini's widths."""
    return argparse.Namespace(
        vocab=MINI["vocab_size"],
        hidden=MINI["hidden_size"],
        intermediate=MINI["intermediate_size"],
        layers=args.layers,
        heads=MINI["num_attention_heads"],
        kv_heads=MINI["num_key_value_heads"],
        batch=1,
        seq=args.seq,
    )


def build_ours_nf4(args):
    import bench_step as BS

    from lora.models.phi3 import Phi3Config as Config

    model = Phi3ForCausalLM(Config(**BS.model_dims(_peer_shape(args))))
    BS.fill_base_weights(model)
    model.to(torch.bfloat16)
    lora.quantize(model, "nf4")
    lora.inject(model, lora.LoRAConfig(**LORA))  # fp32 adapters over the NF4 base
    model.gradient_checkpointing_enable()
    BS.fill_lora_A(model)
    return model.train()


def build_peft_nf4(args):
    import bench_step as BS
    import bitsandbytes as bnb
    import peft
    import transformers

    dims = BS.model_dims(_peer_shape(args))
    model = transformers.Phi3ForCausalLM(
        transformers.Phi3Config(**dims, attn_implementation="sdpa")
    )
    BS.fill_base_weights(model)
    model.to(torch.bfloat16)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if type(child) is not nn.Linear:
                    continue
                q = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    compute_dtype=torch.bfloat16,
                    compress_statistics=True,  # double quantisation, as ours
                    quant_type="nf4",
                )
                q.weight = bnb.nn.Params4bit(
                    child.weight.data,
                    requires_grad=False,
                    compress_statistics=True,
                    quant_type="nf4",
                )
                setattr(parent, name, q.to("cpu"))  # .to() quantises
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    config = peft.LoraConfig(**{**LORA, "target_modules": PEER_TARGETS}, task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, config)
    BS.fill_lora_A(model)
    return model.train()


def _peer_step(model, opt, ids) -> float:
    opt.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    return float(loss.detach())


def cmd_peft(args) -> dict:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import _common as C

    import lora._heap

    builders = {"ours": build_ours_nf4, "peft": build_peft_nf4}
    ids = torch.randint(0, 32000, (1, args.seq), generator=torch.Generator().manual_seed(0))
    if args.variant != "both":  # one side alone: its peak RSS over two steps
        import bench_step as BS

        torch.manual_seed(0)
        model = builders[args.variant](args)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        lora._heap.reuse_freed_pages()
        built = BS.rss_mb() * 2**20
        if not BS.reset_peak_rss():  # the high-water mark from here: the build's own left out
            raise SystemExit("cannot reset the peak RSS (/proc/self/clear_refs)")
        for _ in range(2):
            _peer_step(model, opt, ids)
        peak = C.peak_rss_bytes()  # VmHWM: ru_maxrss would keep the forking parent's peak too
        print("JSON " + json.dumps({"peak_rss_bytes": peak, "built_rss_bytes": built}))
        return {}
    memory = {}  # first, while this process is small
    for name in builders:
        cmd = [sys.executable, __file__, "peft", "--variant", name, "--layers", str(args.layers)]
        cmd += ["--seq", str(args.seq)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        memory[name] = json.loads(next(r for r in out.splitlines() if r.startswith("JSON "))[5:])
    models, opts = {}, {}
    for name, build in builders.items():
        torch.manual_seed(0)
        models[name] = build(args)
        opts[name] = torch.optim.AdamW(
            [p for p in models[name].parameters() if p.requires_grad], lr=1e-4
        )
    lora._heap.reuse_freed_pages()  # the 16-bit setting ours makes itself, for both
    first = {}
    for name in models:
        torch.manual_seed(1)
        first[name] = _peer_step(models[name], opts[name], ids)
    rel = abs(first["ours"] - first["peft"]) / abs(first["peft"])
    print(f"loss, step 1: ours {first['ours']:.6f}  peft {first['peft']:.6f}  rel diff {rel:.2e}")
    fns = {n: functools.partial(_peer_step, models[n], opts[n], ids) for n in models}
    times = C.interleaved(fns, repeat=args.repeat, warmup=1)
    med = {n: C.median(t) for n, t in times.items()}
    print(
        f"\nPhi-3-mini width, {args.layers} layers, 1 x {args.seq}, NF4 base (bf16 compute), r=16 "
        f"all decoder Linears, checkpointing; medians of {len(times['ours'])} interleaved steps"
    )
    print(
        f"{'variant':8s} {'step s':>7s} {'tokens/s':>9s} {'spread':>7s} {'peak RSS GiB':>13s} "
        f"{'built GiB':>10s}"
    )
    for name in builders:
        mem = memory[name]
        print(
            f"{name:8s} {med[name]:7.2f} {args.seq / med[name]:9.1f} "
            f"{100 * C.spread(times[name]):6.1f}% {mem['peak_rss_bytes'] / 2**30:13.2f} "
            f"{mem['built_rss_bytes'] / 2**30:10.2f}"
        )
    ratio = med["peft"] / med["ours"]
    mem = memory["ours"]["peak_rss_bytes"] / memory["peft"]["peak_rss_bytes"]
    print(f"ours/peft: {ratio:.2f}x tokens/s, {mem:.2f}x peak RSS")
    result = {
        "layers": args.layers,
        "seq": args.seq,
        "first_losses": first,
        "step_times": times,
        "median_step_s": med,
        "tokens_per_s_ratio": ratio,
        "memory": memory,
        "machine": C.machine(),
    }
    if args.json:
        C.write_json(args.json, result)
    return result


# --- quality on the demo data ---------------------------------------------------------------------
def cmd_quality(args) -> dict:
    from lora.demo.run import run_demo

    out = {}
    for base in ("bf16", "nf4"):
        # The demo checkpoint is stored in bf16: "bf16" is those weights as stored, "nf4" their
        # 4-bit quantisation; both compute in fp32 (bf16 matmuls are slow on CPUs without AMX).
        training = {
            "bf16": False,
            "max_steps": args.max_steps,
            "output_dir": f"/tmp/bench_qlora_{base}",
            "quantize": "nf4" if base == "nf4" else None,
        }
        t = time.perf_counter()
        r = run_demo(training, progress=False, log=lambda s: None)
        out[base] = {"eval_loss": r.eval_loss, "seconds": time.perf_counter() - t}
        print(
            f"{base} base: held-out loss {r.eval_loss:.4f} after {r.steps} steps "
            f"({out[base]['seconds']:.0f}s)"
        )
    rel = out["nf4"]["eval_loss"] / out["bf16"]["eval_loss"] - 1
    print(f"nf4 vs bf16 base held-out loss: {100 * rel:+.2f}%")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("storage")
    sub.add_parser("memory")
    for name in ("step", "speed"):
        p = sub.add_parser(name)
        p.add_argument("--layers", type=int, default=32 if name == "step" else 2)
        p.add_argument("--seq", type=int, default=512)
        p.add_argument("--steps", type=int, default=1 if name == "step" else 2)
        if name == "step":
            p.add_argument("--base", choices=["nf4", "bf16"], default="nf4")
            p.add_argument("--json", action="store_true")
            p.add_argument(
                "--release-heap-every",
                type=int,
                default=None,
                help="model.model.release_heap_every (default: the model's own)",
            )
    k = sub.add_parser("keep")
    k.add_argument("--layers", type=int, default=2)
    k.add_argument("--seq", type=int, default=512)
    k.add_argument("--rounds", type=int, default=4)
    pp = sub.add_parser("peft")
    pp.add_argument("--layers", type=int, default=2)
    pp.add_argument("--seq", type=int, default=512)
    pp.add_argument("--repeat", type=int, default=7)
    pp.add_argument("--variant", choices=["both", "ours", "peft"], default="both")
    pp.add_argument("--json", default=None, help="write the figures here")
    q = sub.add_parser("quality")
    q.add_argument("--max-steps", type=int, default=400)
    args = ap.parse_args(argv)
    {
        "storage": cmd_storage,
        "memory": cmd_memory,
        "step": cmd_step,
        "speed": cmd_speed,
        "keep": cmd_keep,
        "quality": cmd_quality,
        "peft": cmd_peft,
    }[args.cmd](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
