"""``lora-eval``: loss, perplexity and exact match of a base model and of base + adapter.

    lora-eval --model Phi-3-mini-4k-instruct --adapter out/adapter --data test.jsonl --generate 100

- **loss / perplexity** on the assistant tokens only (the tokens the fine-tuning trains on), summed
  over every conversation of ``--data`` and divided by their number: the same figure as the
  trainer's eval loss (:meth:`Trainer.evaluate`) on the same data;
- **exact match** (``--generate N``): for the first N conversations, the reply generated greedily to
  the messages before the last assistant turn, against that turn's content, equal up to case,
  spacing and a final full stop (the demo's measure, :func:`score`).

Writes ``eval_report.json`` and ``eval_report.md`` into ``--output`` (default: the current
directory) and prints the markdown table. Bad input exits with status 2 and a one-line error.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

__all__ = [
    "EvalRow",
    "assistant_loss",
    "exact_match",
    "normalise_reply",
    "score",
    "markdown_table",
    "evaluate",
    "main",
]


@dataclass
class EvalRow:
    """One model's figures: ``loss`` (mean over assistant tokens), ``perplexity`` = exp(loss), and
    ``exact_match`` in [0, 1] (None when not measured)."""

    name: str
    loss: float | None
    perplexity: float | None = None
    exact_match: float | None = None
    generated: int = 0

    def __post_init__(self):
        if self.perplexity is None and self.loss is not None:
            self.perplexity = math.exp(min(self.loss, 50.0))


def normalise_reply(text: str) -> str:
    """A reply as exact match compares it: lower case, runs of whitespace as one space, no final
    full stop."""
    text = " ".join(text.strip().lower().split())
    return text[:-1].rstrip() if text.endswith(".") else text


def score(prediction: str, reference: str) -> float:
    """Exact match, lora-eval's and the demo's measure: 1.0 if ``prediction`` equals ``reference``
    up to case, spacing and a final full stop ("it is  forty-three" matches "It is forty-three."),
    else 0.0."""
    return 1.0 if normalise_reply(prediction) == normalise_reply(reference) else 0.0


@torch.no_grad()
def assistant_loss(
    model, examples: Sequence, collate: Callable, batch_size: int = 8
) -> tuple[float | None, int]:
    """``(loss, tokens)``: the cross-entropy summed over the labelled (assistant) tokens of
    ``examples`` and divided by their count, batch by batch as the trainer's evaluation does.

    Args:
        model: a causal LM taking ``input_ids, attention_mask, position_ids, labels,
            num_items_in_batch`` (``num_items_in_batch=1`` returns the summed loss).
        examples: :class:`lora.data.Example` s; ``collate`` batches them (``ChatData.collate_fn``).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = collate(list(examples[i : i + batch_size]))
        n = int((batch["labels"][:, 1:] != -100).sum())
        if n == 0:
            continue
        out = model(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            position_ids=batch["position_ids"].to(device),
            labels=batch["labels"].to(device),
            num_items_in_batch=1,
        )
        total += float(out.loss)
        count += n
    model.train(was_training)
    return (total / count if count else None), count


def exact_match(
    model,
    tokenizer,
    pairs: Sequence[tuple[list[dict], str]],
    batch_size: int = 16,
    max_new_tokens: int = 256,
) -> tuple[float, list[str]]:
    """``(score, replies)``: greedy replies to each prompt and the fraction equal to its reference
    (:func:`score`). Each batch generates at most the longest reference's token
    count + 8 (a longer reply cannot match), capped by ``max_new_tokens``."""
    from .generate import generate_replies

    replies: list[str] = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        budget = min(max_new_tokens, max(len(tokenizer.encode(ref)) for _, ref in chunk) + 8)
        replies += generate_replies(model, tokenizer, [m for m, _ in chunk], max_new_tokens=budget)
    return sum(score(r, ref) for r, (_, ref) in zip(replies, pairs)) / max(len(pairs), 1), replies


def markdown_table(rows: Sequence[EvalRow], measured_on: str = "") -> str:
    """A short markdown table: model, loss, perplexity, exact match (a column only if measured)."""
    with_em = any(r.exact_match is not None for r in rows)
    head = "| model | loss | perplexity |" + (" exact match |" if with_em else "")
    rule = "|---|---:|---:|" + ("---:|" if with_em else "")
    lines = ([measured_on, ""] if measured_on else []) + [head, rule]
    for r in rows:
        loss = "n/a" if r.loss is None else f"{r.loss:.4f}"
        ppl = "n/a" if r.perplexity is None else f"{r.perplexity:.2f}"
        line = f"| {r.name} | {loss} | {ppl} |"
        if with_em:
            line += " n/a |" if r.exact_match is None else f" {100 * r.exact_match:.1f}% |"
        lines.append(line)
    return "\n".join(lines)


def _pairs(conversations, n: int) -> list[tuple[list[dict], str]]:
    pairs = []
    for conv in conversations:
        last = max(i for i, m in enumerate(conv.messages) if m["role"] == "assistant")
        pairs.append((conv.messages[:last], conv.messages[last]["content"]))
        if len(pairs) == n:
            break
    return pairs


def evaluate(
    model_dir: str,
    data,
    adapter: str | None = None,
    generate: int = 0,
    max_seq_length: int = 2048,
    batch_size: int = 8,
    dtype: torch.dtype | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """The report of ``lora-eval`` as a dict (see :func:`main`); ``data`` is a data spec.

    Raises:
        ValueError, FileNotFoundError, DataError, AdapterError: bad input.
    """
    from ..adapters import load_adapter
    from ..data import Tokenizer, load_conversations, prepare_chat_data
    from ..models import Phi3ForCausalLM

    if not (Path(model_dir) / "config.json").is_file():
        raise FileNotFoundError(
            f"--model {model_dir!r}: no config.json; expected a checkpoint directory"
        )
    if adapter is not None and not Path(adapter).exists():
        raise FileNotFoundError(f"--adapter {adapter!r} does not exist")
    if not isinstance(generate, int) or generate < 0:
        raise ValueError(f"--generate {generate!r}; expected a count >= 0")
    tokenizer = Tokenizer.from_pretrained(model_dir)
    prepared = prepare_chat_data(data, tokenizer, max_seq_length)
    examples, collate = prepared.train, prepared.collate_fn()
    pairs = _pairs(load_conversations(data)[0], generate) if generate else []
    model = Phi3ForCausalLM.from_pretrained(model_dir, dtype=dtype)
    rows = []
    names = ["base"] + ([f"base+adapter ({Path(adapter).name})"] if adapter else [])
    for name in names:
        if name != "base":
            load_adapter(model, adapter)
        loss, tokens = assistant_loss(model, examples, collate, batch_size)
        row = EvalRow(name, loss)
        if pairs:
            row.exact_match, _ = exact_match(model, tokenizer, pairs)
            row.generated = len(pairs)
        rows.append(row)
        log(
            f"{name}: loss {loss:.4f} over {tokens} assistant tokens"
            if loss is not None
            else f"{name}: no tokens"
        )
    data_name = data if isinstance(data, str) else ", ".join(map(str, data))
    measured = (
        f"{prepared.train_stats.conversations} conversations of {data_name}, "
        f"{prepared.train_stats.labelled_tokens} assistant tokens"
        + (f"; exact match on the first {len(pairs)}" if pairs else "")
    )
    return {
        "model": str(model_dir),
        "adapter": adapter,
        "data": data if isinstance(data, str) else list(map(str, data)),
        "conversations": prepared.train_stats.conversations,
        "truncated": prepared.train_stats.truncated,
        "assistant_tokens": prepared.train_stats.labelled_tokens,
        "max_seq_length": max_seq_length,
        "rows": [asdict(r) for r in rows],
        "markdown": markdown_table(rows, measured),
    }


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="lora-eval",
        description="Loss, perplexity and exact match of a Phi-3 "
        "checkpoint and of checkpoint + adapter, on chat data, side by side.",
    )
    ap.add_argument("--model", required=True, metavar="DIR", help="the base checkpoint directory")
    ap.add_argument(
        "--adapter",
        metavar="DIR",
        help="an adapter directory (PEFT format) to compare with the base",
    )
    ap.add_argument(
        "--data",
        required=True,
        nargs="+",
        metavar="FILE",
        help="held-out chat data: files, "
        "directories, globs or DIR:SPLIT; JSONL/JSON/parquet; messages, ShareGPT or alpaca records",
    )
    ap.add_argument(
        "--generate",
        type=int,
        default=0,
        metavar="N",
        help="also score greedy replies to the "
        "first N conversations by exact match with their last assistant turn",
    )
    ap.add_argument(
        "--max-seq-length",
        type=int,
        default=2048,
        help="longer conversations are cut (default 2048)",
    )
    ap.add_argument(
        "--batch-size", type=int, default=8, help="sequences per forward pass (default 8)"
    )
    ap.add_argument("--bf16", action="store_true", help="load the base weights in bfloat16")
    ap.add_argument(
        "--output",
        default=".",
        metavar="DIR",
        help="where eval_report.json and eval_report.md go (default: the current directory)",
    )
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    from .._io import atomic_write_bytes, atomic_write_json
    from ..adapters import AdapterError
    from ..data import DataError

    args = build_parser().parse_args(argv)
    try:
        if args.batch_size < 1:
            raise ValueError(f"--batch-size {args.batch_size}; expected >= 1")
        data = args.data[0] if len(args.data) == 1 else args.data
        report = evaluate(
            args.model,
            data,
            args.adapter,
            args.generate,
            args.max_seq_length,
            args.batch_size,
            torch.bfloat16 if args.bf16 else None,
            log=lambda line: print(line, file=sys.stderr),
        )
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "eval_report.json", report)
        atomic_write_bytes(out / "eval_report.md", (report["markdown"] + "\n").encode("utf-8"))
    except (
        DataError,
        AdapterError,
        ValueError,
        TypeError,
        FileNotFoundError,
        ImportError,
        OSError,
    ) as e:
        first = str(e).strip().splitlines()[0].rstrip(":") if str(e).strip() else type(e).__name__
        if isinstance(e, DataError) and e.errors:
            first += f"; first: {e.errors[0]}"
            if len(e.errors) > 1:
                first += f" (and {len(e.errors) - 1} more)"
        print(f"lora-eval: {first}", file=sys.stderr)
        return 2
    print(report["markdown"])
    print(f"report: {out / 'eval_report.json'}, {out / 'eval_report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
