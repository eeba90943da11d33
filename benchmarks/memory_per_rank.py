"""What DDP and FSDP hold per rank for Phi-3-mini and Phi-3-medium, computed (no weights needed).

    python benchmarks/memory_per_rank.py [--r 16]

Builds each model on the meta device with lora's Phi-3, injects LoRA (all linear layers), counts
the parameters, and prints per rank, in GiB: the bf16 base, the LoRA state (fp32 parameters,
gradients, AdamW's two moments and the flat all-reduce buffer: 20 bytes a parameter), and the total
for DDP (the whole base) and for FSDP over N ranks (base / N + two gathered units: a decoder layer
and the larger of a layer and the embedding). Activations are not included.
"""

from __future__ import annotations

import argparse

import torch

import lora
from lora.models import Phi3Config, Phi3ForCausalLM

SHAPES = {  # the config.json values of the Hugging Face checkpoints that matter here
    "Phi-3-mini-4k": dict(
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
    ),
    "Phi-3-medium-4k": dict(
        hidden_size=5120,
        intermediate_size=17920,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=10,
    ),
}
GIB = 2**30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--r", type=int, default=16)
    args = ap.parse_args()
    for name, shape in SHAPES.items():
        with torch.device("meta"):
            model = Phi3ForCausalLM(
                Phi3Config(vocab_size=32064, max_position_embeddings=4096, **shape)
            )
        lora.inject(model, {"r": args.r, "lora_alpha": 2 * args.r, "target_modules": "all-linear"})
        base = sum(p.numel() for p in model.parameters() if not p.requires_grad)
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        layer = sum(p.numel() for p in model.model.layers[0].parameters() if not p.requires_grad)
        embedding = model.model.embed_tokens.weight.numel()
        state = trained * 20
        gathered = (max(layer, embedding) + layer) * 2
        print(
            f"{name}: base {base / 1e9:.2f} B ({base * 2 / GIB:.2f} GiB bf16), LoRA r={args.r} "
            f"{trained / 1e6:.1f} M (state {state / GIB:.2f} GiB), a layer {layer / 1e6:.0f} M, "
            f"the embedding {embedding / 1e6:.1f} M"
        )
        cells = [f"DDP {(base * 2 + state) / GIB:.2f}"]
        cells += [f"FSDP x{n} {(base * 2 / n + gathered + state) / GIB:.2f}" for n in (1, 2, 4, 8)]
        print("  GiB per rank: " + " | ".join(cells))


if __name__ == "__main__":
    main()
