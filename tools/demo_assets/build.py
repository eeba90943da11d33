"""Build the demo's assets: ``python -m tools.demo_assets.build [--force] [--only PART ...]``
(from the repository root, with the project importable: ``pip install -e .`` or ``PYTHONPATH=.``).

Everything is made here, from seeds, with the project's own code; nothing is downloaded.

1. ``corpus``: ``assets/corpus.txt``, plain English stories (:mod:`tools.demo_assets.corpus`), one per line.
2. ``tokenizer``: a byte-level BPE trained on the corpus with the ``tokenizers`` library, digits
   split one by one (as Phi-3's tokenizer does), plus Phi-3's special tokens (``<unk> <s> </s>`` first,
   then ``<|endoftext|> <|assistant|> <|system|> <|end|> <|user|>`` after the learned vocabulary, in
   Phi-3's order, without the placeholders) -> ``assets/base/tokenizer.json`` and a
   ``tokenizer_config.json`` carrying the real Phi-3-mini-4k-instruct chat template.
3. ``chat``: ``assets/chat_train.jsonl`` and ``assets/chat_eval.jsonl``, conversations teaching
   :mod:`lora.demo.skill` (what number comes after X); the held-out conversations ask about numbers
   that no training conversation asks about.
4. ``model``: a small Phi-3 (``model_type: phi3``) pretrained on the corpus with plain AdamW, saved
   with ``Phi3ForCausalLM.save_pretrained`` (config.json, model.safetensors in bfloat16 like the real
   checkpoints) plus ``generation_config.json``.

The built assets are committed, so ``make demo`` on a fresh clone never pretrains. Without
``--force`` only missing parts are built; ``--force`` rebuilds everything (or the ``--only`` parts);
a part is also rebuilt when one it depends on was (corpus -> tokenizer -> model). Pretraining takes
5 to 8 minutes on 2 CPU cores (600 steps: with 240 the base learned the demo's skill three times
slower under LoRA).
"""

from __future__ import annotations

import argparse
import math
import platform
import random
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from lora._io import atomic_open, atomic_write_json
from lora.demo import PARTS, assets_dir, part_present, skill

from .corpus import make_corpus

__all__ = [
    "SEED",
    "PARTS",
    "MODEL_CONFIG",
    "PRETRAIN",
    "PHI3_SPECIAL_TOKENS",
    "build_corpus",
    "build_tokenizer",
    "build_chat_data",
    "chat_records",
    "pretrain",
    "build",
    "main",
]

SEED = 20240601

NUM_STORIES = 8000
VOCAB_SIZE = 2048  # learned tokens + Phi-3's 8 special tokens
NUM_TRAIN_CONVERSATIONS = 2400
NUM_EVAL_CONVERSATIONS = 200  # one per held-out number

# Phi-3-mini-4k-instruct's special tokens, without <|placeholderN|>. The first three open the
# vocabulary (ids 0, 1, 2, as in Phi-3); the rest follow the learned tokens in Phi-3's order.
PHI3_BASE_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
PHI3_CHAT_SPECIAL_TOKENS = ("<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>")
PHI3_SPECIAL_TOKENS = PHI3_BASE_SPECIAL_TOKENS + PHI3_CHAT_SPECIAL_TOKENS

# A Phi-3 of ~3.9M parameters (tied embeddings), Phi-3-mini's shape scaled down.
MODEL_CONFIG = {
    "architectures": ["Phi3ForCausalLM"],
    "model_type": "phi3",
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "hidden_act": "silu",
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "sliding_window": None,
    "attention_dropout": 0.0,
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "initializer_range": 0.02,
    "tie_word_embeddings": True,
    "use_cache": True,
}

PRETRAIN = {
    "steps": 600,
    "batch_size": 16,
    "seq_len": 256,
    "lr": 3e-3,
    "min_lr_ratio": 0.1,
    "warmup_steps": 20,
    "weight_decay": 0.1,
    "betas": (0.9, 0.95),
    "grad_clip": 1.0,
    "save_dtype": "bfloat16",
}


def _log_default(message: str) -> None:
    print(message, flush=True)


# --------------------------------------------------------------------------------------------------
# 1. Corpus
# --------------------------------------------------------------------------------------------------


def build_corpus(path: Path, num_stories: int = NUM_STORIES, seed: int = SEED) -> None:
    """Write ``num_stories`` generated stories to ``path``, one per line."""
    with atomic_open(path, "w") as f:
        for story in make_corpus(num_stories, seed):
            f.write(story + "\n")


def read_corpus(path: Path) -> list[str]:
    """The stories of a corpus file (one per non-blank line)."""
    return [line for line in Path(path).read_text(encoding="utf-8").split("\n") if line.strip()]


# --------------------------------------------------------------------------------------------------
# 2. Tokenizer
# --------------------------------------------------------------------------------------------------


def build_tokenizer(corpus_path: Path, out_dir: Path, vocab_size: int = VOCAB_SIZE):
    """Train a byte-level BPE on the corpus and write a Phi-3-style tokenizer into ``out_dir``.

    Returns:
        the :class:`lora.data.Tokenizer` written.

    Raises:
        ValueError: ``vocab_size`` leaves no room for learned tokens.
    """
    from tokenizers import Tokenizer as BackendTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from lora.data import PHI3_CHAT_TEMPLATE, Tokenizer

    n_chat = len(PHI3_CHAT_SPECIAL_TOKENS)
    if vocab_size <= 256 + len(PHI3_SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size={vocab_size}; expected more than 256 bytes + {len(PHI3_SPECIAL_TOKENS)} special tokens"
        )
    backend = BackendTokenizer(models.BPE())
    # Digits one by one, as Phi-3's (Llama's) tokenizer does; then GPT-2's byte-level split.
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - n_chat,
        special_tokens=list(PHI3_BASE_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(read_corpus(corpus_path), trainer)
    backend.add_special_tokens(list(PHI3_CHAT_SPECIAL_TOKENS))
    ids = {t: backend.token_to_id(t) for t in PHI3_SPECIAL_TOKENS}
    added_tokens_decoder = {
        str(ids[t]): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in PHI3_SPECIAL_TOKENS
    }
    config = {
        "add_bos_token": False,
        "add_eos_token": False,
        "added_tokens_decoder": added_tokens_decoder,
        "bos_token": "<s>",
        "chat_template": PHI3_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>",
        "model_max_length": MODEL_CONFIG["max_position_embeddings"],
        "pad_token": "<|endoftext|>",
        "padding_side": "right",
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "<unk>",
    }
    generation_config = {
        "bos_token_id": ids["<s>"],
        # As Phi-3-mini-4k-instruct: <|endoftext|>, <|assistant|>, <|end|>.
        "eos_token_id": [ids["<|endoftext|>"], ids["<|assistant|>"], ids["<|end|>"]],
        "pad_token_id": ids["<|endoftext|>"],
    }
    tokenizer = Tokenizer(backend, config, generation_config)
    tokenizer.save_pretrained(out_dir)
    return tokenizer


# --------------------------------------------------------------------------------------------------
# 3. Chat data
# --------------------------------------------------------------------------------------------------


def chat_records(seed: int = SEED) -> tuple[list[dict], list[dict]]:
    """The demo's (train, eval) conversations: eval numbers are never asked about in training.

    Train: :data:`NUM_TRAIN_CONVERSATIONS` conversations over the training numbers, some with a
    system message, some with a follow-up question. Eval: one single-question conversation per
    held-out number (:data:`NUM_EVAL_CONVERSATIONS`), in shuffled order.
    """
    train_numbers, eval_numbers = skill.split_numbers(NUM_EVAL_CONVERSATIONS, seed)
    train = skill.make_conversations(train_numbers, NUM_TRAIN_CONVERSATIONS, seed + 1)
    rng = random.Random(seed + 2)
    evals = [skill.make_conversation([n], rng, follow_up=0.0) for n in eval_numbers]
    random.Random(seed + 3).shuffle(evals)
    return train, evals


def build_chat_data(train_path: Path, eval_path: Path, seed: int = SEED) -> None:
    """Write :func:`chat_records` as JSONL."""
    train, evals = chat_records(seed)
    skill.write_jsonl(train, train_path)
    skill.write_jsonl(evals, eval_path)


# --------------------------------------------------------------------------------------------------
# 4. Pretraining
# --------------------------------------------------------------------------------------------------


def _lr_at(step: int, steps: int, lr: float, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def token_stream(stories: Sequence[str], tokenizer) -> list[int]:
    """All stories tokenized and joined, each followed by ``<|endoftext|>`` (the document separator)."""
    separator = tokenizer.token_to_id("<|endoftext|>")
    encodings = tokenizer.backend.encode_batch(list(stories), add_special_tokens=False)
    stream: list[int] = []
    for encoding in encodings:
        stream += encoding.ids
        stream.append(separator)
    return stream


def pretrain(
    base_dir: Path,
    corpus_path: Path,
    seed: int = SEED,
    settings: dict | None = None,
    log: Callable[[str], None] = _log_default,
) -> dict:
    """Pretrain the demo's Phi-3 on the corpus (next-token loss everywhere) and save it in ``base_dir``.

    ``base_dir`` must already hold the tokenizer. Batches are windows of ``seq_len`` tokens at random
    offsets of the token stream, drawn from a generator seeded with ``seed``.

    Returns:
        A summary: parameters, steps, tokens seen, first and last loss, held-out loss, seconds.
    """
    import torch

    from lora.data import Tokenizer
    from lora.models import Phi3Config, Phi3ForCausalLM

    cfg = {**PRETRAIN, **(settings or {})}
    tokenizer = Tokenizer.from_pretrained(base_dir)
    stream = torch.tensor(token_stream(read_corpus(corpus_path), tokenizer), dtype=torch.long)
    # The last 2% of the stream is held out to report a validation loss.
    split = int(len(stream) * 0.98)
    train_stream, val_stream = stream[:split], stream[split:]

    special = {t: tokenizer.token_to_id(t) for t in PHI3_SPECIAL_TOKENS}
    config = Phi3Config(
        **MODEL_CONFIG,
        vocab_size=-(-tokenizer.vocab_size // 64)
        * 64,  # padded to a multiple of 64, as Phi-3's 32064
        bos_token_id=special["<s>"],
        eos_token_id=special["<|endoftext|>"],
        pad_token_id=special["<|endoftext|>"],
    )
    torch.manual_seed(seed)
    model = Phi3ForCausalLM(config)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg["weight_decay"]},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg["lr"],
        betas=tuple(cfg["betas"]),
    )
    generator = torch.Generator().manual_seed(seed)
    B, T, steps = cfg["batch_size"], cfg["seq_len"], cfg["steps"]
    log(
        f"pretraining a {model.num_parameters() / 1e6:.2f}M-parameter Phi-3 on {len(train_stream)} tokens: "
        f"{steps} steps of {B}x{T} tokens"
    )
    losses = []
    start = time.perf_counter()
    for step in range(steps):
        offsets = torch.randint(0, len(train_stream) - T, (B,), generator=generator)
        batch = torch.stack([train_stream[o : o + T] for o in offsets.tolist()])
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, steps, cfg["lr"], cfg["warmup_steps"], cfg["min_lr_ratio"])
        loss = model(batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 20 == 0 or step == steps - 1:
            log(f"  step {step:4d}  loss {loss.item():.3f}  ({time.perf_counter() - start:.0f}s)")
    seconds = time.perf_counter() - start

    model.eval()
    with torch.no_grad():
        n = (len(val_stream) - 1) // T
        windows = val_stream[: n * T].view(n, T)
        val_loss = sum(model(w[None], labels=w[None]).loss.item() for w in windows) / max(1, n)
    model.to(getattr(torch, cfg["save_dtype"]))
    model.save_pretrained(base_dir)
    summary = {
        "parameters": model.num_parameters(),
        "steps": steps,
        "tokens_seen": steps * B * T,
        "corpus_tokens": len(stream),
        "first_loss": round(losses[0], 4),
        "last_loss": round(sum(losses[-10:]) / min(10, len(losses)), 4),
        "val_loss": round(val_loss, 4),
        "seconds": round(seconds, 1),
    }
    log(
        f"pretrained: loss {summary['first_loss']} -> {summary['last_loss']} (held-out {summary['val_loss']}) "
        f"in {seconds:.0f}s"
    )
    return summary


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------


def build(
    assets: Path | None = None,
    force: bool = False,
    only: Sequence[str] | None = None,
    log: Callable[[str], None] = _log_default,
) -> list[str]:
    """Build the missing assets (all of them with ``force``) into ``assets`` (default: the package's).

    Args:
        only: restrict to these parts (of :data:`PARTS`); parts depending on a rebuilt one are
            rebuilt too.

    Returns:
        The parts built, in order.

    Raises:
        ValueError: an unknown part in ``only``.
    """
    assets = Path(assets) if assets is not None else assets_dir()
    wanted = list(PARTS) if only is None else list(only)
    unknown = [p for p in wanted if p not in PARTS]
    if unknown:
        raise ValueError(
            f"only={list(only)!r}; unknown part(s) {unknown}, expected some of {list(PARTS)}"
        )
    built: list[str] = []
    depends = {"tokenizer": ["corpus"], "model": ["corpus", "tokenizer"]}
    start = time.perf_counter()
    info: dict = {}
    for part in PARTS:
        stale = any(d in built for d in depends.get(part, []))
        if not (part in wanted or stale):
            continue
        if not (force or stale or not part_present(part, assets)):
            continue
        log(f"building {part} ...")
        if part == "corpus":
            build_corpus(assets / "corpus.txt")
        elif part == "tokenizer":
            tokenizer = build_tokenizer(assets / "corpus.txt", assets / "base")
            log(f"  vocabulary: {tokenizer.vocab_size} tokens")
        elif part == "chat":
            build_chat_data(assets / "chat_train.jsonl", assets / "chat_eval.jsonl")
        elif part == "model":
            info["pretraining"] = pretrain(assets / "base", assets / "corpus.txt", log=log)
        built.append(part)
    if "model" in built:
        import tokenizers
        import torch

        info.update(
            seed=SEED,
            python=platform.python_version(),
            torch=torch.__version__,
            tokenizers=tokenizers.__version__,
            pretrain_settings=PRETRAIN,
            built_parts=built,
        )
        atomic_write_json(assets / "base" / "build_info.json", info)
    if built:
        # Files are written atomically through temporary files, which are created private (0600);
        # the assets are meant to be read by anyone who can read the package.
        for path in assets.rglob("*"):
            if path.is_file():
                path.chmod(0o644)
        log(f"built {', '.join(built)} in {time.perf_counter() - start:.0f}s into {assets}")
    return built


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.demo_assets.build",
        description="Build the demo's assets (corpus, tokenizer, chat data, base model).",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even what exists")
    parser.add_argument(
        "--only", nargs="+", choices=PARTS, help="build only these parts (and what depends on them)"
    )
    parser.add_argument(
        "--assets", type=Path, default=None, help="output directory (default: the package's assets)"
    )
    args = parser.parse_args(argv)
    built = build(args.assets, force=args.force, only=args.only)
    if not built:
        print("all demo assets present (use --force to rebuild)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
