"""TrainingConfig: the ``training_config`` dictionary, with Hugging Face TrainingArguments' names.

The fine-tuning recipe from the Phi-3 model card (``sample_finetune.py``) runs as written:

    training_config = {"bf16": True, "do_eval": False, "learning_rate": 5.0e-06, "log_level": "info",
        "logging_steps": 20, "logging_strategy": "steps", "lr_scheduler_type": "cosine",
        "num_train_epochs": 1, "max_steps": -1, "output_dir": "./checkpoint_dir",
        "overwrite_output_dir": True, "per_device_eval_batch_size": 4,
        "per_device_train_batch_size": 4, "remove_unused_columns": True, "save_steps": 100,
        "save_total_limit": 1, "seed": 0, "gradient_checkpointing": True,
        "gradient_checkpointing_kwargs": {"use_reentrant": False},
        "gradient_accumulation_steps": 1, "warmup_ratio": 0.2}

plus ``max_seq_length`` and ``packing`` (which the recipe passes to its trainer).
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..checks import check_choice, check_positive_int, sort_keys
from ..data.records import ON_ERROR_MODES

__all__ = ["TrainingConfig", "IGNORED_KEYS", "SCHEDULERS", "load_configs"]

SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")

# TrainingArguments keys that change nothing here, accepted so that existing configs run as written.
# A value that would ask for something we do not do (e.g. logging_strategy="epoch") is refused.
IGNORED_KEYS: dict[str, tuple | None] = {
    "log_level": None,  # our log is one line per logging_steps
    "remove_unused_columns": None,
    "do_train": None,
    "do_eval": None,  # evaluation runs whenever there is eval data (eval_steps and at the end)
    "report_to": None,
    "logging_strategy": ("steps",),
    "save_strategy": ("steps",),
    "eval_strategy": ("steps", "no"),
    "evaluation_strategy": ("steps", "no"),
    "logging_first_step": None,
    "dataloader_num_workers": None,
    "dataloader_pin_memory": None,
    "disable_tqdm": None,
    "run_name": None,
    "push_to_hub": (False,),
    "fp16": (False,),
    "tf32": None,
    "optim": ("adamw_torch", "adamw_torch_fused", "adamw_hf"),
}


@dataclass
class TrainingConfig:
    """How to train. Names and meanings as in ``transformers.TrainingArguments`` where one exists.

    ``overwrite_output_dir``: a fresh (not resumed) run into an output_dir that holds an earlier
    run's checkpoints is an error unless this is true; then that run's files are removed first.
    ``max_steps`` > 0 overrides ``num_train_epochs``. ``warmup_steps`` > 0 overrides ``warmup_ratio``.
    ``eval_steps`` None: evaluate only before and after training. ``bf16``:
    base weights in bfloat16, LoRA parameters in float32. ``eval_fraction``: the share of the training
    file held out when no eval file is given. ``on_error``: "raise" (stop before training and list
    every malformed record) or "skip" (leave them out and report how many).

    Past one device (docs/scaling.md): ``device`` "auto" (CUDA when torch sees a GPU, else CPU),
    "cpu", "cuda" or "cuda:N"; under torchrun "cuda" is each rank's ``cuda:LOCAL_RANK``.
    ``fsdp``: shard the frozen base with FSDP2 across the torchrun processes.
    ``global_train_batch_size``: sequences per micro-batch over all ranks (None:
    per_device_train_batch_size × world size); when set it must divide by the world size and fixes
    the per-device batch.
    """

    output_dir: str = "lora-output"
    overwrite_output_dir: bool = False
    learning_rate: float = 2e-4
    per_device_train_batch_size: int = 4
    per_device_eval_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    num_train_epochs: float = 1.0
    max_steps: int = -1
    lr_scheduler_type: str = "linear"
    warmup_ratio: float = 0.0
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    logging_steps: int = 10
    eval_steps: int | None = None
    save_steps: int = 500
    save_total_limit: int | None = None
    seed: int = 42
    bf16: bool = False
    gradient_checkpointing: bool = False
    gradient_checkpointing_kwargs: dict = field(default_factory=lambda: {"use_reentrant": False})
    max_seq_length: int = 1024
    packing: bool = False
    eval_fraction: float = 0.05
    on_error: str = "raise"
    device: str = "auto"
    fsdp: bool = False
    global_train_batch_size: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.output_dir, os.PathLike):
            self.output_dir = os.fspath(self.output_dir)
        if not isinstance(self.output_dir, str) or not self.output_dir:
            raise ValueError(f"training_config output_dir={self.output_dir!r}: expected a "
                             "directory path")
        _positive_int(self, "per_device_train_batch_size", "per_device_eval_batch_size",
                      "gradient_accumulation_steps", "logging_steps", "save_steps", "max_seq_length")
        for name in ("max_steps",):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or (v <= 0 and v != -1):
                raise ValueError(f"training_config {name}={v!r}: expected a positive int, or -1 for 'use num_train_epochs'")
        if self.eval_steps is not None:
            _positive_int(self, "eval_steps")
        if self.save_total_limit is not None:
            _positive_int(self, "save_total_limit")
        for name in ("learning_rate", "num_train_epochs", "weight_decay", "adam_epsilon", "max_grad_norm"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0:
                raise ValueError(f"training_config {name}={v!r}: expected a non-negative number")
        if self.max_steps == -1 and self.num_train_epochs <= 0:
            raise ValueError(f"training_config num_train_epochs={self.num_train_epochs!r} with max_steps=-1: nothing to train")
        for name in ("warmup_ratio", "eval_fraction", "adam_beta1", "adam_beta2"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 <= v < 1:
                raise ValueError(f"training_config {name}={v!r}: expected a number in [0, 1)")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"training_config warmup_steps={self.warmup_steps!r}: expected an int >= 0")
        if self.lr_scheduler_type not in SCHEDULERS:
            raise ValueError(f"training_config lr_scheduler_type={self.lr_scheduler_type!r}: expected one of {', '.join(SCHEDULERS)}")
        seed = self.seed
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
            raise ValueError(f"training_config seed={self.seed!r}: expected an int in [0, 2**63)")
        if self.global_train_batch_size is not None:
            _positive_int(self, "global_train_batch_size")
        if not isinstance(self.device, str) or not (
                self.device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", self.device)):
            raise ValueError(f"training_config device={self.device!r}: "
                             "expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
        for name in ("bf16", "gradient_checkpointing", "packing", "overwrite_output_dir", "fsdp"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"training_config {name}={getattr(self, name)!r}: expected true or false")
        kwargs = self.gradient_checkpointing_kwargs or {}
        if not isinstance(kwargs, dict):
            raise ValueError(f"training_config gradient_checkpointing_kwargs={kwargs!r}: "
                             "expected an object such as {\"use_reentrant\": false}, or null")
        if kwargs.get("use_reentrant", False):
            raise ValueError("training_config gradient_checkpointing_kwargs={'use_reentrant': True}: only the non-reentrant kind is supported")
        check_choice(self.on_error, ON_ERROR_MODES, "training_config on_error")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainingConfig:
        """Build from a ``training_config`` dict. An unknown key is a ``ValueError`` naming it;
        the keys in :data:`IGNORED_KEYS` are accepted and have no effect (with the values listed there)."""
        if not isinstance(d, dict):
            raise TypeError(f"training_config={d!r}: expected a dict")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = sort_keys(d, names, IGNORED_KEYS, "training_config", supported_hint=True)
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _positive_int(cfg, *names: str) -> None:
    for name in names:
        check_positive_int(getattr(cfg, name), f"training_config {name}")


def load_configs(path: str | os.PathLike) -> tuple[dict, dict]:
    """``(training_config, peft_config)`` from a JSON or TOML file with those two sections."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config {path}: no such file")
    raw = path.read_bytes()
    try:
        if path.suffix.lower() == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                import tomli as tomllib
            data = tomllib.loads(raw.decode("utf-8"))
        else:
            data = json.loads(raw)
    except Exception as e:  # noqa: BLE001 - any parse error becomes one clear message
        raise ValueError(f"--config {path}: cannot parse ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected an object with 'training_config' and 'peft_config'")
    unknown = set(data) - {"training_config", "peft_config"}
    if unknown:
        raise ValueError(f"--config {path}: unknown section(s) {sorted(unknown)}; expected training_config, peft_config")
    for section in ("training_config", "peft_config"):
        value = data.get(section)
        if value is not None and not isinstance(value, dict):
            raise ValueError(f"--config {path}: {section} is a {type(value).__name__} "
                             f"({str(value)[:40]!r}); expected an object of its keys")
    return dict(data.get("training_config") or {}), dict(data.get("peft_config") or {})
