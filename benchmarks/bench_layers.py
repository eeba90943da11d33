"""Forward + backward of one LoRA layer over its frozen base layer, ours beside loralib and PEFT.

For each shape (in → out), dtype and dropout: a frozen ``nn.Linear`` (the floor), ``lora.Linear``,
loralib's ``Linear`` and PEFT's LoRA linear, all r=16, alpha=32, 512 tokens, the input needing a
gradient (as inside a network). Then ``lora.MergedLinear`` (qkv, LoRA on q and v) beside loralib's.
Each variant's bytes saved for backward are counted too (distinct storages, parameters and the
input itself left out). Ours and PEFT keep fp32 adapters on a bf16 base (both libraries'
default); loralib has no separate adapter dtype, so its adapters are bf16.

    python benchmarks/bench_layers.py [--tokens 512] [--repeat 7] [--dtypes float32,bfloat16]
        [--shapes 3072x3072,3072x9216,8192x3072] [--json benchmarks/results/layers.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

import lora  # noqa: E402

warnings.filterwarnings("ignore")
R, ALPHA = 16, 32


def saved_bytes(fn, exclude) -> int:
    seen = {t.untyped_storage().data_ptr() for t in exclude}
    total = [0]

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total[0] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return total[0]


def linear_variants(din, dout, dtype, p) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    base = nn.Linear(din, dout, bias=False, dtype=dtype).requires_grad_(False)
    out = {"base": base}
    ours_base = nn.Linear(din, dout, bias=False, dtype=dtype)
    ours_base.weight.data = base.weight.data
    out["lora"] = lora.Linear.from_base(
        ours_base,
        r=R,
        lora_alpha=ALPHA,
        lora_dropout=p,
        lora_dtype=torch.float32 if dtype != torch.float64 else None,
    )
    try:
        import loralib

        m = loralib.Linear(din, dout, r=R, lora_alpha=ALPHA, lora_dropout=p, bias=False).to(dtype)
        m.weight.data = base.weight.data
        out["loralib"] = m
    except ImportError:
        pass
    try:
        import peft

        seq = nn.Sequential(nn.Linear(din, dout, bias=False, dtype=dtype))
        seq[0].weight.data = base.weight.data
        out["peft"] = peft.get_peft_model(
            seq, peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=p, target_modules=["0"])
        )
    except ImportError:
        pass
    for m in out.values():
        m.train()
        for name, q in m.named_parameters():
            if "lora_B" in name:
                nn.init.normal_(q, std=0.02)  # a trained adapter, not B = 0
    return out


def merged_variants(din, dtype, p) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    base = nn.Linear(din, 3 * din, bias=False, dtype=dtype).requires_grad_(False)
    out = {"base": base}
    ours_base = nn.Linear(din, 3 * din, bias=False, dtype=dtype)
    ours_base.weight.data = base.weight.data
    out["lora"] = lora.MergedLinear.from_base(
        ours_base,
        r=R,
        lora_alpha=ALPHA,
        lora_dropout=p,
        enable_lora=[True, False, True],
        lora_dtype=torch.float32,
    )
    try:
        import loralib

        m = loralib.MergedLinear(
            din,
            3 * din,
            r=R,
            lora_alpha=ALPHA,
            lora_dropout=p,
            bias=False,
            enable_lora=[True, False, True],
        ).to(dtype)
        m.weight.data = base.weight.data
        out["loralib"] = m
    except ImportError:
        pass
    for m in out.values():
        m.train()
        for name, q in m.named_parameters():
            if "lora_B" in name:
                nn.init.normal_(q, std=0.02)
    return out


def measure(
    modules: dict[str, nn.Module], tokens: int, din: int, dout: int, dtype, repeat: int
) -> dict:
    x = torch.randn(tokens, din, dtype=dtype, requires_grad=True)
    gy = torch.randn(tokens, dout, dtype=dtype)

    def step(m):
        params = [q for q in m.parameters() if q.requires_grad]

        def run():
            x.grad = None
            for q in params:
                q.grad = None
            m(x).backward(gy)

        return run

    times = C.interleaved({k: step(m) for k, m in modules.items()}, repeat)
    saved = {
        k: saved_bytes(lambda m=m: m(x), list(m.parameters()) + [x]) for k, m in modules.items()
    }
    med = {k: C.median(t) for k, t in times.items()}
    flops = 2 * 2 * tokens * din * dout  # the base layer's forward and input-gradient matmuls
    return {
        "median_s": med,
        "ratio_to_base": {k: med[k] / med["base"] for k in med},
        "spread": {k: C.spread(t) for k, t in times.items()},
        "saved_bytes": saved,
        "input_bytes": x.numel() * x.element_size(),
        "base_flops": flops,
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=C.MIN_REPEAT)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--dropouts", default="0,0.05")
    ap.add_argument("--shapes", default="3072x3072,3072x9216,8192x3072")
    ap.add_argument("--merged-dim", type=int, default=3072, help="MergedLinear d -> 3d (0: skip)")
    ap.add_argument("--no-peak", action="store_true", help="skip measuring the matmul peak")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    dropouts = [float(p) for p in args.dropouts.split(",")]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",") if s]
    result = {
        "machine": C.machine(),
        "tokens": args.tokens,
        "r": R,
        "lora_alpha": ALPHA,
        "linear": [],
        "merged": [],
        "peak": {},
    }
    if not args.no_peak:
        for dt in dtypes:
            result["peak"][str(dt).removeprefix("torch.")] = C.matmul_peak(dt, args.repeat)
    print(
        f"tokens={args.tokens} r={R} threads={torch.get_num_threads()}; forward+backward, "
        f"median of {max(args.repeat, C.MIN_REPEAT)} interleaved; ratio = variant / frozen base"
    )
    for dt in dtypes:
        dname = str(dt).removeprefix("torch.")
        for din, dout in shapes:
            for p in dropouts:
                row = measure(
                    linear_variants(din, dout, dt, p), args.tokens, din, dout, dt, args.repeat
                )
                row.update(kind="Linear", shape=[din, dout], dtype=dname, dropout=p)
                result["linear"].append(row)
                print_row(row)
        if args.merged_dim:
            d = args.merged_dim
            for p in dropouts:
                row = measure(merged_variants(d, dt, p), args.tokens, d, 3 * d, dt, args.repeat)
                row.update(kind="MergedLinear[q,v]", shape=[d, 3 * d], dtype=dname, dropout=p)
                result["merged"].append(row)
                print_row(row)
    if args.json:
        C.write_json(args.json, result)


def print_row(row) -> None:
    r = row["ratio_to_base"]
    saved = row["saved_bytes"]
    cells = "  ".join(
        f"{k} {v:.3f}x ({saved[k] / 2**20:.1f} MiB saved)" for k, v in r.items() if k != "base"
    )
    print(
        f"{row['kind']:18s} {row['shape'][0]}->{row['shape'][1]:<5d} {row['dtype']:8s} p={row['dropout']:<4} "
        f"base {row['median_s']['base'] * 1e3:7.1f} ms  {cells}",
        flush=True,
    )


if __name__ == "__main__":
    main()
