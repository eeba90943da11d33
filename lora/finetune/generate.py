"""Chat with a base model plus an adapter, or with a merged model: ``lora-generate``.

lora-generate --model Phi-3-mini-4k-instruct/ --adapter out/adapter --prompt "Hello"
lora-generate --model out/merged                  # interactive: one line a turn, empty line quits
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence

import torch

__all__ = ["generate_replies", "load_chat_model", "main"]


@torch.no_grad()
def generate_replies(
    model,
    tokenizer,
    conversations: Sequence[Sequence[Mapping[str, str]]],
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
) -> list[str]:
    """The assistant's next reply to each conversation, generated in one left-padded batch.

    Each conversation is rendered with the tokenizer's chat template and its generation prompt;
    a reply ends at any of the tokenizer's stop tokens. Greedy when ``temperature`` is 0.
    """
    if not conversations:
        return []
    prompts = [
        tokenizer.apply_chat_template(list(m), add_generation_prompt=True) for m in conversations
    ]
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    stops = tokenizer.stop_token_ids
    out = model.generate(
        input_ids.to(device),
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_token_id=stops,
        attention_mask=mask.to(device),
        generator=generator,
        pad_token_id=pad,
    )
    replies = []
    for row in out[:, width:].tolist():
        cut = next((i for i, t in enumerate(row) if t in stops), len(row))
        replies.append(tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
    return replies


def load_chat_model(
    model_dir: str,
    adapter: str | None = None,
    dtype: torch.dtype | None = None,
    quantize: str | None = None,
):
    """``(model, tokenizer)``: the checkpoint in ``model_dir``, with the adapter directory loaded if given.
    ``quantize="nf4"``: the base in 4 bits, the adapter unmerged on top (docs/qlora.md)."""
    from ..data import Tokenizer
    from ..models import Phi3ForCausalLM

    model = Phi3ForCausalLM.from_pretrained(model_dir, dtype=dtype, quantize=quantize)
    if adapter:
        from ..adapters import load_adapter

        load_adapter(model, adapter)
    model.eval()
    return model, Tokenizer.from_pretrained(model_dir)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="lora-generate",
        description="Chat with a Phi-3 checkpoint directory, optionally with a LoRA adapter on top.",
    )
    ap.add_argument(
        "--model",
        help="checkpoint directory (config.json, safetensors, tokenizer.json); "
        "default: the demo's base model",
    )
    ap.add_argument(
        "--adapter",
        help="adapter directory (adapter_config.json + adapter_model.safetensors) to load",
    )
    ap.add_argument(
        "--prompt",
        action="append",
        help="a user message; repeat for several independent prompts. "
        "Without it: an interactive chat on stdin",
    )
    ap.add_argument("--system", help="a system message to start each conversation with")
    ap.add_argument(
        "--max-new-tokens", type=int, default=128, help="longest reply, in tokens (default 128)"
    )
    ap.add_argument(
        "--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples"
    )
    ap.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    ap.add_argument(
        "--top-p", type=float, default=None, help="nucleus sampling threshold in (0, 1]"
    )
    ap.add_argument("--seed", type=int, default=None, help="seed for sampling")
    ap.add_argument("--bf16", action="store_true", help="load the base weights in bfloat16")
    ap.add_argument(
        "--quantize", choices=["nf4"], help="load the base's Linear weights in 4 bits (QLoRA)"
    )
    args = ap.parse_args(argv)
    try:
        _check_args(args)
        return _run(args)
    except KeyboardInterrupt:
        print("lora-generate: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, FileNotFoundError) as e:  # AdapterError, CheckpointError, ...
        print(f"lora-generate: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"lora-generate: {where}{e.strerror or e}", file=sys.stderr)
        return 2


def _check_args(args) -> None:
    """Every flag checked before anything is loaded; the message names the flag and the value."""
    from pathlib import Path

    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens}: expected an int >= 0")
    if not (args.temperature >= 0 and args.temperature != float("inf")):
        raise ValueError(
            f"--temperature {args.temperature}: expected 0 (greedy) or a finite number > 0"
        )
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top-k {args.top_k}: expected an int >= 1")
    if args.top_p is not None and not 0.0 < args.top_p <= 1.0:
        raise ValueError(f"--top-p {args.top_p}: expected a number in (0, 1]")
    if args.model is not None and not Path(args.model).is_dir():
        raise FileNotFoundError(
            f"--model {args.model}: no such directory; expected a checkpoint "
            "directory (config.json, model.safetensors, tokenizer.json)"
        )
    if args.adapter is not None and not Path(args.adapter).exists():
        raise FileNotFoundError(
            f"--adapter {args.adapter}: no such directory; expected an "
            "adapter directory (adapter_config.json + "
            "adapter_model.safetensors)"
        )


def _run(args) -> int:
    model_dir = args.model
    if model_dir is None:
        from ..demo import base_model_dir, ensure_assets

        ensure_assets()
        model_dir = str(base_model_dir())
    model, tokenizer = load_chat_model(
        model_dir, args.adapter, torch.bfloat16 if args.bf16 else None, quantize=args.quantize
    )
    system = [{"role": "system", "content": args.system}] if args.system else []
    options = dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    if args.prompt:
        convs = [system + [{"role": "user", "content": p}] for p in args.prompt]
        for prompt, reply in zip(args.prompt, generate_replies(model, tokenizer, convs, **options)):
            print(f"user: {prompt}\nassistant: {reply}\n")
        return 0
    history = list(system)
    print("chat (an empty line ends it)", file=sys.stderr)
    for line in sys.stdin:
        text = line.strip()
        if not text:
            break
        history.append({"role": "user", "content": text})
        reply = generate_replies(model, tokenizer, [history], **options)[0]
        history.append({"role": "assistant", "content": reply})
        print(f"assistant: {reply}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
