"""Inference (a no-grad prefill forward) of a Phi-3-shaped model: plain, with LoRA merged, unmerged.

Three models with the same base weights: ``plain`` (no LoRA), ``merged`` (lora.inject, then
lora.merge_and_unload: plain Linears holding W + ΔW) and ``unmerged`` (LoRA layers in eval mode
with merge_weights off: base matmul plus the two thin adapter matmuls). r=16 on all linear layers,
B non-zero. Forward over batch x seq tokens, logits for the last position (as generation's
prefill). Interleaved, warm-up, medians; ratios to plain.

    python benchmarks/bench_infer.py [--dtypes float32,bfloat16] [--layers 2] [--batch 2] [--seq 512]
        [--json benchmarks/results/infer.json]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

import lora  # noqa: E402
from lora.models.phi3 import Phi3Config, Phi3ForCausalLM  # noqa: E402


def build(args, dtype, variant):
    torch.manual_seed(0)
    cfg = Phi3Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    model = Phi3ForCausalLM(cfg).to(dtype)
    if variant != "plain":
        lora.inject(
            model,
            lora.LoRAConfig(r=16, lora_alpha=32, target_modules="all-linear"),
            lora_dtype=dtype,
        )
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for layer in model.modules():
                if isinstance(layer, lora.LoRALayer):
                    layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.01)
                    layer.merge_weights = False
        if variant == "merged":
            lora.merge_and_unload(model)
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--vocab", type=int, default=32064)
    ap.add_argument("--hidden", type=int, default=3072)
    ap.add_argument("--intermediate", type=int, default=8192)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--repeat", type=int, default=C.MIN_REPEAT)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    ids = torch.randint(
        0,
        min(args.vocab, 32000),
        (args.batch, args.seq),
        generator=torch.Generator().manual_seed(0),
    )
    out = {"machine": C.machine(), "shape": vars(args).copy(), "rows": []}
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        models = {v: build(args, dtype, v) for v in ("plain", "merged", "unmerged")}
        with torch.inference_mode():
            ref = models["plain"](ids, logits_to_keep=1).logits
            got = models["merged"](ids, logits_to_keep=1).logits
            same = models["unmerged"](ids, logits_to_keep=1).logits
            diff = (got.float() - same.float()).abs().max().item()
            fns = {v: (lambda m=m: m(ids, logits_to_keep=1)) for v, m in models.items()}
            times = C.interleaved(fns, args.repeat)
        del ref
        med = {v: C.median(t) for v, t in times.items()}
        row = dict(
            dtype=name,
            median_s=med,
            ratio_to_plain={v: med[v] / med["plain"] for v in med},
            spread={v: C.spread(t) for v, t in times.items()},
            tokens_per_s={v: args.batch * args.seq / med[v] for v in med},
            merged_vs_unmerged_max_abs_diff=diff,
        )
        out["rows"].append(row)
        print(
            f"{name:9s} plain {med['plain'] * 1e3:7.1f} ms  merged {row['ratio_to_plain']['merged']:.3f}x  "
            f"unmerged {row['ratio_to_plain']['unmerged']:.3f}x  (merged vs unmerged logits: {diff:.2e})",
            flush=True,
        )
        del models
    if args.json:
        C.write_json(args.json, out)


if __name__ == "__main__":
    main()
