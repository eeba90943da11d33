"""What ``lora-finetune`` runs on without ``--model`` and ``--data``: assets made by the project itself.

- ``base_model_dir()``: a small Phi-3 checkpoint directory in the real format (config.json,
  model.safetensors, tokenizer.json with Phi-3's special tokens, tokenizer_config.json with the
  Phi-3-mini-4k-instruct chat template, generation_config.json), pretrained on ``corpus_file()``;
- ``train_file()`` / ``eval_file()``: chat conversations (``messages`` JSONL) that teach a skill the
  base model lacks, answering "what number comes after forty-two?" ("It is forty-three."; see
  :mod:`lora.demo.skill`), the eval file asking only about numbers the training file never asks about;
- ``ensure_assets()``: builds whatever is missing (see :mod:`lora.demo.build`). The assets are
  committed, so normally nothing is built.

This package may import ``lora.models`` and ``lora.data``; nothing in the library imports it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

__all__ = [
    "assets_dir",
    "base_model_dir",
    "corpus_file",
    "train_file",
    "eval_file",
    "ensure_assets",
    "missing_assets",
]


def assets_dir() -> Path:
    """The directory holding the demo's assets (inside the package)."""
    return Path(__file__).resolve().parent / "assets"


def base_model_dir() -> Path:
    """The pretrained base checkpoint directory (``assets/base``)."""
    return assets_dir() / "base"


def corpus_file() -> Path:
    """The plain-text pretraining corpus (one story per line)."""
    return assets_dir() / "corpus.txt"


def train_file() -> Path:
    """The chat training set (``messages`` JSONL)."""
    return assets_dir() / "chat_train.jsonl"


def eval_file() -> Path:
    """The held-out chat set (``messages`` JSONL): numbers never asked about in training.
    :func:`lora.demo.skill.eval_pairs` turns it into (prompt messages, reference) pairs and
    :func:`lora.demo.skill.score` scores a reply."""
    return assets_dir() / "chat_eval.jsonl"


def missing_assets() -> list[str]:
    """The parts (of ``lora.demo.build.PARTS``) whose files are missing; empty when all are there."""
    from .build import PARTS, _present

    return [part for part in PARTS if not _present(part, assets_dir())]


def ensure_assets(log: Callable[[str], None] = print) -> Path:
    """Build whatever demo asset is missing (pretraining takes a few minutes if the model is), and
    return :func:`assets_dir`."""
    missing = missing_assets()
    if missing:
        from .build import build

        log(f"demo assets missing ({', '.join(missing)}); building them")
        build(only=missing, log=log)
    return assets_dir()
