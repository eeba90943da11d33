"""`make bench`: every benchmark, then one markdown table, one JSON file and a PNG chart.

    python benchmarks/run_all.py [--out benchmarks/results] [--full] [--quick] [--skip layers,step,infer]

Runs, each in its own process (so that one's memory cannot colour another's):
  1-2. bench_layers.py: the layer table (ours, loralib, PEFT over the frozen base layer) and
       MergedLinear against loralib, in fp32 and bf16, dropout 0 and 0.05, with the matmul peak;
  3.   bench_step.py at Phi-3-mini's shapes (2 layers, batch 2 x 512) against transformers + PEFT,
       fp32 and bf16, every token labelled and chat-style labels;
  4.   with --full: full-size Phi-3-mini (32 layers, bf16, batch 1 x 512, checkpointing);
  5.   bench_infer.py: merged and unmerged inference against the plain model;
  6.   the matmul peak, and each end-to-end figure's share of it (MFU).
Writes OUT/<name>.json per benchmark, OUT/results.json (all of them), OUT/results.md and
OUT/ratios.png. --quick: the layer table at 3072→3072 only, and no fp32 chat-label step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _common as C  # noqa: E402


def run(script: str, *argv: str) -> None:
    cmd = [sys.executable, os.path.join(HERE, script), *argv]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True)


def load(path):
    with open(path) as f:
        return json.load(f)


def markdown(res: dict) -> str:
    out = []
    lay = res.get("layers")
    if lay:
        peaks = lay.get("peak", {})
        if peaks:
            out.append("### Matmul peak (measured)\n")
            out.append("| dtype | GFLOP/s | best GEMM (m, k, n) |\n|---|---:|---|")
            for d, p in peaks.items():
                out.append(f"| {d} | {p['flops'] / 1e9:.0f} | {tuple(p['shape'])} |")
            out.append("")
        out.append(
            f"### One layer, forward + backward ({lay['tokens']} tokens, r={lay['r']}): "
            "time over the frozen base layer\n"
        )
        cols = ["lora", "loralib", "peft"]
        out.append(
            "| layer | in→out | dtype | dropout | base ms | base % of peak | "
            + " | ".join(cols)
            + " | saved MiB (base / lora / peft) |"
        )
        out.append("|---|---|---|---:|---:|---:|" + "---:|" * len(cols) + "---|")
        for row in lay["linear"] + lay["merged"]:
            r, sv = row["ratio_to_base"], row["saved_bytes"]
            cells = " | ".join(f"{r[c]:.3f}x" if c in r else "–" for c in cols)
            mib = " / ".join(
                f"{sv[c] / 2**20:.1f}" if c in sv else "–" for c in ("base", "lora", "peft")
            )
            pk = peaks.get(row["dtype"], {}).get("flops")
            share = f"{row['base_flops'] / row['median_s']['base'] / pk:.0%}" if pk else "–"
            out.append(
                f"| {row['kind']} | {row['shape'][0]}→{row['shape'][1]} | {row['dtype']} | "
                f"{row['dropout']} | {row['median_s']['base'] * 1e3:.1f} | {share} | {cells} | {mib} |"
            )
        out.append(
            "\nSaved MiB: bytes kept for backward beyond the parameters and the layer's input "
            "(which the adapter's dA needs and which the previous layer already holds).\n"
        )
    steps = [v for k, v in sorted(res.items()) if k.startswith("step")]
    if steps:
        out.append(
            "### Training step at Phi-3-mini shapes, ours (lora) against transformers + PEFT\n"
        )
        out.append(
            "| model | dtype | labels | ours tokens/s | PEFT tokens/s | speed ratio | ours MFU | "
            "PEFT MFU | ours peak RSS MB | PEFT peak RSS MB | RSS ratio |"
        )
        out.append("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for s in steps:
            o, p = s["variants"]["ours"], s["variants"].get("peft")
            sh = s["shape"]
            model = f"{sh['layers']} layers, {sh['batch']}×{sh['seq']}" + (
                ", ckpt" if s["checkpointing"] else ""
            )
            if p is None:
                out.append(
                    f"| {model} | {s['dtype']} | {s['labels']} | {o['tokens_per_s']:.0f} | – | – | "
                    f"{o['mfu']:.0%} | – | {o['peak_rss_mb']:.0f} | – | – |"
                )
                continue
            rat = s["ours_over_peft"]
            out.append(
                f"| {model} | {s['dtype']} | {s['labels']} | {o['tokens_per_s']:.0f} | "
                f"{p['tokens_per_s']:.0f} | {rat['speed']:.2f}x | {o['mfu']:.0%} | {p['mfu']:.0%} | "
                f"{o['peak_rss_mb']:.0f} | {p['peak_rss_mb']:.0f} | {rat['peak_rss']:.2f}x |"
            )
        out.append(
            "\nMFU: model FLOPs (frozen matmuls' forward and input gradient, attention, the output "
            "head where logits are needed) per second over the measured matmul peak of the dtype.\n"
        )
    inf = res.get("infer")
    if inf:
        out.append("### Inference (no-grad prefill), time over the plain model\n")
        out.append("| dtype | plain ms | merged | unmerged |\n|---|---:|---:|---:|")
        for row in inf["rows"]:
            r = row["ratio_to_plain"]
            out.append(
                f"| {row['dtype']} | {row['median_s']['plain'] * 1e3:.1f} | {r['merged']:.3f}x | "
                f"{r['unmerged']:.3f}x |"
            )
        out.append("")
    m = (lay or {}).get("machine") or next((s["machine"] for s in steps), {})
    if m:
        out.append(
            f"Machine: {m.get('cpu')}, {m.get('threads')} threads, torch {m.get('torch')}; load average "
            f"at the start {m.get('load_average')}."
        )
    return "\n".join(out) + "\n"


def chart(res: dict, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install '.[plot]'): no chart", flush=True)
        return False
    labels, ours, peft = [], [], []
    for row in (res.get("layers") or {}).get("linear", []):
        r = row["ratio_to_base"]
        labels.append(f"{row['shape'][0]}→{row['shape'][1]}\n{row['dtype'][:4]} p={row['dropout']}")
        ours.append(r["lora"])
        peft.append(r.get("peft", float("nan")))
    steps = [
        (k, v) for k, v in sorted(res.items()) if k.startswith("step") and "peft" in v["variants"]
    ]
    fig, axes = plt.subplots(1, 2 if steps else 1, figsize=(14 if steps else 9, 4.5), squeeze=False)
    ax = axes[0][0]
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], ours, 0.4, label="lora (ours)")
    ax.bar([x + 0.2 for x in xs], peft, 0.4, label="PEFT")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set_ylabel("time / frozen base layer (lower is better)")
    ax.set_title("One LoRA layer, forward + backward")
    ax.legend()
    if steps:
        ax = axes[0][1]
        names = [f"{v['dtype'][:4]} {v['labels']}\n{v['shape']['layers']}L" for _, v in steps]
        ax.bar(
            range(len(steps)),
            [v["ours_over_peft"]["speed"] for _, v in steps],
            0.5,
            label="tokens/s",
        )
        ax.bar(
            [x + 0.5 for x in range(len(steps))],
            [1 / v["ours_over_peft"]["peak_rss"] for _, v in steps],
            0.4,
            label="1 / peak RSS",
        )
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks([x + 0.25 for x in range(len(steps))], names, fontsize=8)
        ax.set_ylabel("ours / PEFT (higher is better)")
        ax.set_title("Training step at Phi-3-mini shapes")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument(
        "--full", action="store_true", help="also full-size Phi-3-mini (minutes, ~10 GB each side)"
    )
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip", default="", help="comma-separated: layers, step, infer")
    ap.add_argument(
        "--report-only", action="store_true", help="rebuild results.md/png from the JSON files"
    )
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    os.makedirs(args.out, exist_ok=True)
    j = lambda name: os.path.join(args.out, f"{name}.json")  # noqa: E731
    if not args.report_only:
        # The headline first (bf16, every token labelled, with a profile of each side), so that an
        # interrupted run still has it; then the layers, the other step variants, inference.
        steps = [("bfloat16", "all"), ("float32", "all"), ("bfloat16", "chat"), ("float32", "chat")]
        if args.quick:
            steps = steps[:3]
        todo = []
        if "step" not in skip:
            todo += [("step", dt, lab) for dt, lab in steps[:1]]
        if "layers" not in skip:
            todo.append(("layers",))
        if "step" not in skip:
            todo += [("step", dt, lab) for dt, lab in steps[1:]]
            if args.full:
                todo.append(("full",))
        if "infer" not in skip:
            todo.append(("infer",))
        for item in todo:
            if item[0] == "layers":
                extra = ["--shapes", "3072x3072", "--merged-dim", "3072"] if args.quick else []
                run("bench_layers.py", "--json", j("layers"), *extra)
            elif item[0] == "step":
                _, dt, lab = item
                prof = ["--profile", "15"] if (dt, lab) == ("bfloat16", "all") else []
                run(
                    "bench_step.py",
                    "--dtype",
                    dt,
                    "--labels",
                    lab,
                    "--json",
                    j(f"step_{dt}_{lab}"),
                    *prof,
                )
            elif item[0] == "full":
                run(
                    "bench_step.py",
                    "--full",
                    "--labels",
                    "all",
                    "--json",
                    j("step_full_bfloat16_all"),
                )
            else:
                run("bench_infer.py", "--json", j("infer"))
    res = {}
    for name in sorted(os.listdir(args.out)):
        if name.endswith(".json") and name != "results.json":
            res[name[:-5]] = load(os.path.join(args.out, name))
    C.write_json(os.path.join(args.out, "results.json"), res)
    md = markdown(res)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(md)
    chart(res, os.path.join(args.out, "ratios.png"))
    profiles = [(k, v["profiles"]) for k, v in sorted(res.items()) if v.get("profiles")]
    if profiles:
        with open(os.path.join(args.out, "profile.md"), "w") as f:
            for k, tables in profiles:
                for variant, table in tables.items():
                    f.write(
                        f"### {k}: one step of {variant}, top ops by self CPU time\n\n```\n{table}\n```\n\n"
                    )
    print(md)


if __name__ == "__main__":
    main()
