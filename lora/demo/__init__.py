"""What ``lora-finetune`` runs on without ``--model`` and ``--data``: assets made by the project itself.

- ``base_model_dir()``: a small Phi-3 checkpoint directory in the real format (config.json,
  model.safetensors, tokenizer.json with Phi-3's special tokens, tokenizer_config.json with the
  Phi-3-mini-4k-instruct chat template, generation_config.json), pretrained on ``corpus_file()``;
- ``train_file()`` / ``eval_file()``: chat conversations (``messages`` JSONL) that teach a skill the
  base model lacks, answering "what number comes after forty-two?" ("It is forty-three."; see
  :mod:`lora.demo.skill`), the eval file asking only about numbers the training file never asks about;
- ``ensure_assets()``: checks that they are all there (they are committed with the project; the
  scripts that regenerate them live outside the package, in ``tools/demo_assets``);
- :mod:`lora.demo.skill`: the skill, its questions and answers, and how a reply is scored;
- :mod:`lora.demo.run`: the demo itself (``run_demo``), built on :mod:`lora.finetune`.

This package sits on top: it may import everything; nothing in the library imports it, except the
command lines' defaults (``lora-finetune`` runs the demo, ``lora-generate`` its model).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

__all__ = [
    "PARTS",
    "part_present",
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


# The assets in the order they are built (each from the ones before), and the files each part is.
PARTS = ("corpus", "tokenizer", "chat", "model")
_PART_FILES = {
    "corpus": ("corpus.txt",),
    "tokenizer": (
        "base/tokenizer.json",
        "base/tokenizer_config.json",
        "base/generation_config.json",
    ),
    "chat": ("chat_train.jsonl", "chat_eval.jsonl"),
    "model": ("base/config.json", "base/model.safetensors"),
}


def part_present(part: str, assets: Path | None = None) -> bool:
    """Whether every file of asset ``part`` (one of :data:`PARTS`) is in ``assets`` (default: the
    package's). ``KeyError`` for an unknown part."""
    assets = Path(assets) if assets is not None else assets_dir()
    return all((assets / f).is_file() for f in _PART_FILES[part])


def missing_assets() -> list[str]:
    """The parts (of :data:`PARTS`) whose files are missing; empty when all are there."""
    return [part for part in PARTS if not part_present(part, assets_dir())]


def ensure_assets(log: Callable[[str], None] = print) -> Path:
    """Return :func:`assets_dir` when every demo asset is there. Raises ``FileNotFoundError``
    naming the missing parts and the command that rebuilds them (from a source checkout) otherwise."""
    missing = missing_assets()
    if missing:
        raise FileNotFoundError(
            f"demo assets missing ({', '.join(missing)}) in {assets_dir()}: they are committed with the "
            "project; rebuild them from the repository root with `python -m tools.demo_assets.build`"
        )
    return assets_dir()
