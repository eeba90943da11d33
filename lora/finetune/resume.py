"""What a ``--resume`` may change, and the data fingerprint it checks.

A resumed run promises the same losses, step for step, as one never interrupted. That holds only
if everything that decides the numbers is what the checkpoint was trained with: the seed, the batch
shape, the optimizer and schedule settings, the LoRA config and the training examples themselves.
:func:`resume_problems` compares a checkpoint's recorded configs and data fingerprint with the new
run's and lists every difference that breaks the promise, naming the old and the new value.

Free to change: where and how often the run logs, evaluates and saves (:data:`FREE_ON_RESUME`),
and the length of the run (``max_steps``/``num_train_epochs``), as long as it does not end before
the checkpoint's step.
"""

from __future__ import annotations

import hashlib
import os
from array import array
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = [
    "FREE_ON_RESUME",
    "ResumeMismatch",
    "data_fingerprint",
    "file_fingerprints",
    "examples_sha256",
    "resume_problems",
]

# training_config keys whose change leaves every training step's numbers as they were.
FREE_ON_RESUME = frozenset(
    {
        "output_dir",
        "overwrite_output_dir",
        "logging_steps",
        "eval_steps",
        "save_steps",
        "save_total_limit",
        "per_device_eval_batch_size",
        "max_steps",
        "num_train_epochs",
        "gradient_checkpointing",
        "gradient_checkpointing_kwargs",
        "gradient_checkpointing_layers",
        "on_error",
        # keys other versions may carry that change no number either
        "log_level",
        "report_to",
        "logging_strategy",
        "save_strategy",
        "eval_strategy",
        "evaluation_strategy",
        "logging_first_step",
        "disable_tqdm",
        "run_name",
        "dataloader_num_workers",
        "dataloader_pin_memory",
        # the recipe keys that only say where to start, what to print, report and keep
        "resume_from_checkpoint",
        "logging_dir",
        "eval_on_start",
        "do_eval",
        "save_only_model",
    }
)


class ResumeMismatch(ValueError):
    """The run asked for differs from the checkpoint in a way that breaks bit-identical resume."""


def examples_sha256(examples: Iterable) -> str:
    """SHA-256 over the token ids, labels and positions of ``examples`` (``lora.data.Example``),
    in order: equal exactly when the trainer would see the same sequences."""
    fast = getattr(examples, "content_sha256", None)
    if fast is not None:  # lora.data.ExampleArray: hashed from its arrays, no Python lists
        return fast()
    h = hashlib.sha256()
    for ex in examples:
        for name in ("input_ids", "labels", "position_ids", "segment_ids"):
            values = getattr(ex, name, None) or []
            h.update(array("q", values).tobytes())
            h.update(b"|")
        h.update(b"\n")
    return h.hexdigest()


def file_fingerprints(paths: Any) -> list[dict[str, Any]]:
    """``[{"path", "size", "sha256"}]`` for each data file in ``paths`` (one path, several, or
    in-memory records: then ``[]``). Paths are resolved, so a different working directory does not
    count as a different file."""
    if paths is None:
        return []
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = list(paths)
    if not all(isinstance(p, (str, os.PathLike)) for p in paths):
        return []  # records, not files: the examples' hash covers them
    from ..data.sources import resolve_data_files  # directories, globs, DIR:SPLIT -> files

    out = []
    for data_file in resolve_data_files(paths):
        path = data_file.path.resolve()
        h = hashlib.sha256()
        size = 0
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
                size += len(chunk)
        out.append({"path": str(path), "size": size, "sha256": h.hexdigest()})
    return out


def data_fingerprint(data, train_files: Any = None, eval_files: Any = None) -> dict[str, Any]:
    """What a checkpoint records about its data: the files (resolved path, size, SHA-256) and a
    hash of the tokenized training and eval examples."""
    return {
        "train_files": file_fingerprints(train_files),
        "eval_files": file_fingerprints(eval_files),
        "train_examples_sha256": examples_sha256(data.train),
        "eval_examples_sha256": examples_sha256(data.eval),
        "train_examples": len(data.train),
    }


def _describe_files(files: Sequence[dict]) -> str:
    if not files:
        return "in-memory records"
    return ", ".join(f"{f['path']} ({f['size']} bytes, sha256 {f['sha256'][:12]})" for f in files)


def resume_problems(
    step: int,
    total_steps: int,
    old_training: dict | None,
    new_training: dict,
    old_peft: dict | None,
    new_peft: dict,
    old_data: dict | None,
    new_data: dict | None,
) -> list[str]:
    """Every difference between a checkpoint (at ``step``) and the resumed run that breaks the
    bit-identical promise, one sentence each, naming the old and the new value. Keys one side
    lacks (a checkpoint from an older version) are not compared."""
    problems = []
    if total_steps < step:
        problems.append(
            f"the run would end at step {total_steps} (max_steps/num_train_epochs), before "
            f"the checkpoint's step {step}; give max_steps >= {step}"
        )
    old_training = old_training or {}
    for key in sorted(set(old_training) & set(new_training)):
        if key in FREE_ON_RESUME:
            continue
        if old_training[key] != new_training[key]:
            problems.append(
                f"training_config {key} was {old_training[key]!r}, now {new_training[key]!r}"
            )
    old_peft = old_peft or {}
    for key in sorted(set(old_peft) & set(new_peft)):
        if old_peft[key] != new_peft[key]:
            problems.append(f"peft_config {key} was {old_peft[key]!r}, now {new_peft[key]!r}")
    if old_data and new_data:
        if old_data.get("train_examples_sha256") not in (
            None,
            new_data.get("train_examples_sha256"),
        ):
            was = _describe_files(old_data.get("train_files", []))
            now = _describe_files(new_data.get("train_files", []))
            problems.append(
                f"the training data differs: was {was} "
                f"({old_data.get('train_examples')} examples), "
                f"now {now} ({new_data.get('train_examples')} examples)"
            )
    return problems
