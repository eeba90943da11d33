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
import importlib.util
import json
import math
import numbers
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..checks import check_checkpoint_layers, check_choice, check_positive_int
from ..data.records import ON_ERROR_MODES

__all__ = [
    "TrainingConfig",
    "IGNORED_KEYS",
    "SCHEDULERS",
    "STRATEGIES",
    "LOG_LEVELS",
    "OPTIMIZERS",
    "UNSUPPORTED_OPTIMIZERS",
    "ALIASES",
    "load_configs",
]

SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
STRATEGIES = ("no", "steps", "epoch")  # transformers' logging_, save_ and eval_strategy
LOG_LEVELS = ("debug", "info", "warning", "error", "critical", "passive")
REPORT_TO = ("none", "tensorboard", "all")

# optim: transformers' name -> what runs here (see trainer.make_optimizer).
OPTIMIZERS: dict[str, str] = {
    "adamw_torch": "torch.optim.AdamW",
    "adamw_torch_fused": "torch.optim.AdamW(fused=True)",
    "adamw_hf": "torch.optim.AdamW (transformers' removed AdamW computed the same update)",
    "paged_adamw_32bit": "torch.optim.AdamW (the same 32-bit update; the state is not paged)",
    "sgd": "torch.optim.SGD",
    "adafactor": "torch.optim.Adafactor (lr as given: transformers' relative_step=False)",
    "adagrad": "torch.optim.Adagrad",
    "rmsprop": "torch.optim.RMSprop",
}
# optim values that need something torch does not have, and the closest value that runs here.
UNSUPPORTED_OPTIMIZERS: dict[str, str] = {
    "adamw_bnb_8bit": "adamw_torch",
    "adamw_8bit": "adamw_torch",
    "paged_adamw_8bit": "adamw_torch",
    "adamw_torch_4bit": "adamw_torch",
    "adamw_torch_8bit": "adamw_torch",
    "adamw_anyprecision": "adamw_torch",
    "adamw_torch_xla": "adamw_torch",
    "adamw_torch_npu_fused": "adamw_torch_fused",
    "adamw_apex_fused": "adamw_torch_fused",
    "stable_adamw": "adamw_torch",
    "grokadamw": "adamw_torch",
    "schedule_free_adamw": "adamw_torch",
    "schedule_free_radam": "adamw_torch",
    "schedule_free_sgd": "sgd",
    "lion_32bit": "adamw_torch",
    "lion_8bit": "adamw_torch",
    "paged_lion_32bit": "adamw_torch",
    "paged_lion_8bit": "adamw_torch",
    "ademamix": "adamw_torch",
    "ademamix_8bit": "adamw_torch",
    "paged_ademamix_32bit": "adamw_torch",
    "paged_ademamix_8bit": "adamw_torch",
    "rmsprop_bnb": "rmsprop",
    "rmsprop_bnb_8bit": "rmsprop",
    "rmsprop_bnb_32bit": "rmsprop",
    "galore_adamw": "adamw_torch",
    "galore_adamw_8bit": "adamw_torch",
    "galore_adafactor": "adafactor",
    "galore_adamw_layerwise": "adamw_torch",
    "galore_adamw_8bit_layerwise": "adamw_torch",
    "galore_adafactor_layerwise": "adafactor",
    "apollo_adamw": "adamw_torch",
    "apollo_adamw_layerwise": "adamw_torch",
    "lomo": "sgd",
    "adalomo": "adafactor",
}

# Other names for a field: evaluation_strategy (TrainingArguments before 4.46), and
# transformers 5's activation_checkpointing names.
ALIASES = {
    "evaluation_strategy": "eval_strategy",
    "activation_checkpointing": "gradient_checkpointing",
    "activation_checkpointing_kwargs": "gradient_checkpointing_kwargs",
}

# TrainingArguments keys that change nothing here, accepted so that existing configs run as
# written: None = any value; a tuple = only those values (another value asks for something this
# tool does not do, and is refused with the reason in _NOT_DONE). docs/finetune.md lists them all.
IGNORED_KEYS: dict[str, tuple | None] = {
    # bookkeeping and names
    "remove_unused_columns": None,  # the chat data pipeline keeps only what the model needs
    "do_train": None,  # lora-finetune always trains
    "run_name": None,
    "project": None,
    "trackio_space_id": None,
    "trackio_bucket_id": None,
    "trackio_static_space_id": None,
    "label_names": None,  # labels come from the chat template's assistant turns
    "length_column_name": None,
    "include_num_input_tokens_seen": None,  # tokens/s is always logged
    "skip_memory_metrics": None,
    "logging_nan_inf_filter": None,  # a non-finite loss stops the run instead
    "restore_callback_states_from_checkpoint": None,
    # data loading: examples are tokenized in memory and collated in-process
    "dataloader_num_workers": None,
    "dataloader_pin_memory": None,
    "dataloader_persistent_workers": None,
    "dataloader_prefetch_factor": None,
    "dataloader_multiprocessing_context": None,
    "dataloader_in_order": None,
    # one process (torchrun support belongs to the distributed work)
    "local_rank": None,
    "log_level_replica": None,
    "log_on_each_node": None,
    "save_on_each_node": None,
    "average_tokens_across_devices": None,
    "ddp_find_unused_parameters": None,
    "ddp_bucket_cap_mb": None,
    "ddp_broadcast_buffers": None,
    "ddp_static_graph": None,
    "ddp_backend": None,
    "ddp_timeout": None,
    # evaluation is the held-out loss only: no predictions are gathered
    "prediction_loss_only": None,
    "eval_do_concat_batches": None,
    "eval_use_gather_object": None,
    "eval_accumulation_steps": None,
    "include_for_metrics": None,
    "batch_eval_metrics": None,
    # the hub: nothing is uploaded
    "hub_token": None,
    "hub_private_repo": None,
    "hub_model_id": None,
    "hub_strategy": None,
    "hub_always_push": None,
    "hub_revision": None,
    # accepted only at the value that asks for nothing
    "push_to_hub": (False,),
    "do_predict": (False,),
    "use_cache": (False,),
    "save_safetensors": (True,),
    "group_by_length": (False,),
    "train_sampling_strategy": ("random",),
    "dataloader_drop_last": (False,),
    "ignore_data_skip": (False,),
    "full_determinism": (False,),
    "data_seed": (None,),
    "torch_empty_cache_steps": (None,),
    "torch_compile": (False,),
    "torch_compile_backend": (None,),
    "torch_compile_mode": (None,),
    "use_liger_kernel": (False,),
    "liger_kernel_config": (None,),
    "neftune_noise_alpha": (None,),
    "auto_find_batch_size": (False,),
    "label_smoothing_factor": (0, 0.0),
    "lr_scheduler_kwargs": (None, {}),
    "optim_args": (None, ""),
    "optim_target_modules": (None,),
    "bf16_full_eval": (False,),
    "fp16_full_eval": (False,),
    "eval_delay": (0, 0.0),
    "enable_jit_checkpoint": (False,),
    "load_best_model_at_end": (False,),
    "metric_for_best_model": (None,),
    "greater_is_better": (None,),
    "accelerator_config": (None, {}),
    "parallelism_config": (None,),
    "fsdp_config": (None, {}),
    "deepspeed": (None,),
    "debug": ("", None, []),
}

# Why a value outside IGNORED_KEYS' accepted ones is refused, and what to do instead.
_NOT_DONE = {
    "push_to_hub": "nothing is uploaded; push the adapter/ directory yourself",
    "do_predict": "there is no prediction step; use lora-generate",
    "use_cache": "the training forward never builds a KV cache",
    "save_safetensors": "checkpoints are always safetensors (nothing here pickles)",
    "group_by_length": "batches are drawn in a seeded random order (packing pads less)",
    "train_sampling_strategy": "batches are drawn in a seeded random order",
    "dataloader_drop_last": "the last, smaller micro-batch of an epoch is kept",
    "ignore_data_skip": "a resumed run always continues the same data order",
    "full_determinism": "CPU runs are deterministic already; CUDA kernels are not forced to be",
    "data_seed": "the data order follows seed",
    "torch_empty_cache_steps": "the CUDA cache is not emptied during training",
    "torch_compile": "the model runs eagerly",
    "use_liger_kernel": "no Liger kernels here",
    "neftune_noise_alpha": "no NEFTune noise here",
    "auto_find_batch_size": "set per_device_train_batch_size yourself",
    "label_smoothing_factor": "the loss is plain cross-entropy",
    "lr_scheduler_kwargs": "the schedulers take no extra arguments here",
    "optim_args": "the optimizers take no extra arguments here (see optim)",
    "optim_target_modules": "the optimizer updates every trainable (LoRA) parameter",
    "bf16_full_eval": "evaluation runs in the training dtype (set bf16)",
    "fp16_full_eval": "evaluation runs in the training dtype (set fp16)",
    "eval_delay": "evaluation follows eval_strategy from the first step",
    "load_best_model_at_end": "the final adapter is the last step's; every checkpoint is kept "
    "within save_total_limit",
    "fsdp_config": "fsdp: true takes no options here",
    "deepspeed": "one process, no DeepSpeed",
    "accelerator_config": "one process, no Accelerate",
    "parallelism_config": "one process, no Accelerate",
    "torch_compile_backend": "the model runs eagerly",
    "torch_compile_mode": "the model runs eagerly",
    "liger_kernel_config": "no Liger kernels here",
    "enable_jit_checkpoint": "checkpoints are written at save steps and at the end only",
    "metric_for_best_model": "no best-model tracking",
    "greater_is_better": "no best-model tracking",
    "debug": "no debug modes",
}


@dataclass
class TrainingConfig:
    """How to train. Names and meanings as in ``transformers.TrainingArguments`` where one exists.

    ``overwrite_output_dir``: a fresh (not resumed) run into an output_dir that holds an earlier
    run's checkpoints is an error unless this is true; then that run's files are removed first.
    ``max_steps`` > 0 overrides ``num_train_epochs``. ``warmup_steps`` > 0 overrides
    ``warmup_ratio`` (a float below 1 is a ratio of the total steps, as transformers 5).
    ``logging_steps``, ``eval_steps`` and ``save_steps`` may be a float in (0, 1): that share of
    the total steps, rounded up. ``bf16`` / ``fp16``: base weights in bfloat16 / float16, LoRA
    parameters in float32 (fp16 needs CUDA and uses a loss scaler). ``do_eval`` None: evaluate
    when there is eval data; false: never. ``eval_fraction``: the share of the training file held
    out when no eval file is given. ``on_error``: "raise" (stop before training and list every
    malformed record) or "skip" (leave them out and report how many). docs/finetune.md describes
    every key.

    Past one device (docs/scaling.md): ``device`` "auto" (CUDA when torch sees a GPU, else CPU),
    "cpu", "cuda" or "cuda:N"; under torchrun "cuda" is each rank's ``cuda:LOCAL_RANK``
    (``use_cpu`` true means "cpu"). ``fsdp``: shard the frozen base with FSDP2 across the torchrun
    processes. ``global_train_batch_size``: sequences per micro-batch over all ranks (None:
    per_device_train_batch_size × world size); when set it must divide by the world size and fixes
    the per-device batch.
    ``gradient_checkpointing_layers`` (ours, not transformers'): with ``gradient_checkpointing``,
    checkpoint only the first N decoder layers (None: all); the rest keep their activations,
    trading memory for a faster step (docs/performance.md).
    ``quantize``: None, or "nf4" to load the base Linear weights as 4-bit NormalFloat (QLoRA,
    docs/qlora.md; bf16 then sets the compute dtype).
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
    warmup_steps: int | float = 0
    optim: str = "adamw_torch"
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    logging_strategy: str = "steps"
    logging_steps: int | float = 10
    logging_first_step: bool = False
    log_level: str = "passive"
    logging_dir: str | None = None
    disable_tqdm: bool | None = None
    report_to: str | list | None = "none"
    do_eval: bool | None = None
    eval_strategy: str | None = None
    eval_steps: int | float | None = None
    eval_on_start: bool = False
    save_strategy: str = "steps"
    save_steps: int | float = 500
    save_total_limit: int | None = None
    save_only_model: bool = False
    resume_from_checkpoint: str | None = None
    seed: int = 42
    bf16: bool = False
    fp16: bool = False
    tf32: bool | None = None
    use_cpu: bool = False
    gradient_checkpointing: bool = False
    gradient_checkpointing_kwargs: dict = field(default_factory=lambda: {"use_reentrant": False})
    gradient_checkpointing_layers: int | None = None
    max_seq_length: int = 1024
    packing: bool = False
    eval_fraction: float = 0.05
    on_error: str = "raise"
    device: str = "auto"
    fsdp: bool = False
    global_train_batch_size: int | None = None
    quantize: str | None = None  # "nf4": the frozen base in 4 bits (QLoRA; docs/qlora.md)

    def __post_init__(self) -> None:
        if isinstance(self.output_dir, os.PathLike):
            self.output_dir = os.fspath(self.output_dir)
        if not isinstance(self.output_dir, str) or not self.output_dir:
            raise ValueError(
                f"training_config output_dir={self.output_dir!r}: expected a directory path"
            )
        _positive_int(
            self,
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "gradient_accumulation_steps",
            "max_seq_length",
        )
        _steps_or_fraction(self, "logging_steps", "save_steps")
        for name in ("max_steps",):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or (v <= 0 and v != -1):
                raise ValueError(
                    f"training_config {name}={v!r}: expected a positive int, or -1 for 'use num_train_epochs'"
                )
        if self.eval_steps is not None:
            _steps_or_fraction(self, "eval_steps")
        if self.save_total_limit is not None:
            _positive_int(self, "save_total_limit")
        for name in (
            "learning_rate",
            "num_train_epochs",
            "weight_decay",
            "adam_epsilon",
            "max_grad_norm",
        ):
            v = getattr(self, name)
            if (
                isinstance(v, bool)
                or not isinstance(v, numbers.Real)
                or not math.isfinite(v)
                or v < 0
            ):
                raise ValueError(f"training_config {name}={v!r}: expected a non-negative number")
        if self.max_steps == -1 and self.num_train_epochs <= 0:
            raise ValueError(
                f"training_config num_train_epochs={self.num_train_epochs!r} with max_steps=-1: nothing to train"
            )
        for name in ("warmup_ratio", "eval_fraction", "adam_beta1", "adam_beta2"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 <= v < 1:
                raise ValueError(f"training_config {name}={v!r}: expected a number in [0, 1)")
        w = self.warmup_steps
        whole = isinstance(w, int) or (isinstance(w, float) and w.is_integer())
        in_range = isinstance(w, (int, float)) and (0 <= w < 1 or (w >= 1 and whole))
        if isinstance(w, bool) or not in_range:
            raise ValueError(
                f"training_config warmup_steps={w!r}: expected an int >= 0, or a float in [0, 1) "
                "(a ratio of the total steps)"
            )
        if self.lr_scheduler_type not in SCHEDULERS:
            raise ValueError(
                f"training_config lr_scheduler_type={self.lr_scheduler_type!r}: expected one of {', '.join(SCHEDULERS)}"
            )
        seed = self.seed
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
            raise ValueError(f"training_config seed={self.seed!r}: expected an int in [0, 2**63)")
        if self.global_train_batch_size is not None:
            _positive_int(self, "global_train_batch_size")
        if not isinstance(self.device, str) or not (
            self.device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", self.device)
        ):
            raise ValueError(
                f"training_config device={self.device!r}: "
                "expected 'auto', 'cpu', 'cuda' or 'cuda:N'"
            )
        for name in (
            "bf16",
            "fp16",
            "gradient_checkpointing",
            "packing",
            "overwrite_output_dir",
            "fsdp",
            "logging_first_step",
            "eval_on_start",
            "save_only_model",
            "use_cpu",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(
                    f"training_config {name}={getattr(self, name)!r}: expected true or false"
                )
        for name in ("do_eval", "disable_tqdm", "tf32"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                raise ValueError(
                    f"training_config {name}={getattr(self, name)!r}: expected true, false or null"
                )
        if self.bf16 and self.fp16:
            raise ValueError("training_config bf16=true and fp16=true: choose one (bf16 on CPU)")
        self._check_strategies()
        self._check_optim()
        self._check_report_to()
        if self.log_level not in LOG_LEVELS:
            raise ValueError(
                f"training_config log_level={self.log_level!r}: expected one of "
                f"{', '.join(LOG_LEVELS)}"
            )
        kwargs = self.gradient_checkpointing_kwargs or {}
        if not isinstance(kwargs, dict) or set(kwargs) - {"use_reentrant"}:
            raise ValueError(
                f"training_config gradient_checkpointing_kwargs={kwargs!r}: expected an object "
                "with at most 'use_reentrant' (true or false), such as {\"use_reentrant\": false}, "
                "or null"
            )
        if not isinstance(kwargs.get("use_reentrant", False), bool):
            raise ValueError(
                f"training_config gradient_checkpointing_kwargs={kwargs!r}: use_reentrant must be "
                "true or false"
            )
        check_checkpoint_layers(
            self.gradient_checkpointing_layers, "training_config gradient_checkpointing_layers"
        )
        check_choice(self.on_error, ON_ERROR_MODES, "training_config on_error")
        if self.quantize is not None:
            from ..quant import check_method

            check_method(self.quantize, "training_config quantize")
        for name in ("logging_dir", "resume_from_checkpoint"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, str):
                raise ValueError(f"training_config {name}={v!r}: expected a path (string) or null")

    def _check_strategies(self) -> None:
        for name in ("logging_strategy", "save_strategy", "eval_strategy"):
            v = getattr(self, name)
            if v is None and name == "eval_strategy":
                continue  # not given: evaluate every eval_steps if set, and at the end
            if v not in STRATEGIES:
                expected = ", ".join(map(repr, STRATEGIES))
                raise ValueError(f"training_config {name}={v!r}: expected one of {expected}")

    def _check_optim(self) -> None:
        if self.optim in OPTIMIZERS:
            return
        closest = UNSUPPORTED_OPTIMIZERS.get(self.optim)
        if closest is not None:
            raise ValueError(
                f"training_config optim={self.optim!r}: not available here (it needs "
                f"{_optim_needs(self.optim)}); the closest supported is {closest!r} "
                f"({OPTIMIZERS[closest]})"
            )
        raise ValueError(
            f"training_config optim={self.optim!r}: unknown; supported: {', '.join(OPTIMIZERS)}"
        )

    def _check_report_to(self) -> None:
        for target in self.report_targets(check=True):
            if target == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
                raise ValueError(
                    "training_config report_to='tensorboard' needs the tensorboard package: "
                    "pip install 'lora[tensorboard]' (or report_to: 'none'; metrics.jsonl is "
                    "always written)"
                )

    def report_targets(self, check: bool = False) -> list[str]:
        """``report_to`` as a list of integrations that will receive metrics: [] or ["tensorboard"].
        "all" means every installed one (tensorboard if installed, as transformers)."""
        value = self.report_to
        values = [value] if value is None or isinstance(value, str) else list(value)
        out: list[str] = []
        for v in values:
            if v is None or v == "none":
                continue
            if v not in REPORT_TO:
                if check:
                    raise ValueError(
                        f"training_config report_to={self.report_to!r}: {v!r} is not supported "
                        "here; expected 'none', 'tensorboard' or 'all' (metrics.jsonl is always "
                        "written)"
                    )
                continue
            if v == "all":
                if importlib.util.find_spec("tensorboard") is not None and "tensorboard" not in out:
                    out.append("tensorboard")
            elif v not in out:
                out.append(v)
        return out

    @property
    def skips_evaluation(self) -> bool:
        """do_eval=false, and no eval_strategy that turns evaluation back on ("steps"/"epoch" set
        do_eval in transformers)."""
        return self.do_eval is False and self.eval_strategy not in ("steps", "epoch")

    @property
    def use_reentrant(self) -> bool:
        return bool((self.gradient_checkpointing_kwargs or {}).get("use_reentrant", False))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainingConfig:
        """Build from a ``training_config`` dict. An unknown key is a ``ValueError`` naming it;
        the keys in :data:`IGNORED_KEYS` are accepted and have no effect (with the values listed
        there, another value is refused with the reason); the keys in :data:`ALIASES` are other
        names of a field (both given with different values is an error)."""
        if not isinstance(d, dict):
            raise TypeError(f"training_config={d!r}: expected a dict")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in d.items():
            if key in ALIASES:
                target = ALIASES[key]
                if target in d and d[target] != value:
                    raise ValueError(
                        f"training_config {key}={value!r} and {target}={d[target]!r}: {key} is "
                        f"another name for {target}; give one of them"
                    )
                if not (target == "gradient_checkpointing" and value is None):
                    kwargs[target] = value
            elif key in names:
                if key == "gradient_checkpointing" and value is None:
                    continue  # transformers 5's "not set"
                kwargs[key] = value
            elif key in IGNORED_KEYS:
                allowed = IGNORED_KEYS[key]
                if allowed is not None and not any(_same(value, a) for a in allowed):
                    why = _NOT_DONE.get(key)
                    raise ValueError(
                        f"training_config {key}={value!r}: not supported"
                        + (f" ({why})" if why else "")
                        + f"; accepted: {', '.join(map(repr, allowed))}"
                    )
            else:
                raise ValueError(
                    f"training_config has an unknown key {key!r}; supported: "
                    f"{', '.join(sorted(names))} (other names: {', '.join(sorted(ALIASES))}; "
                    "accepted without effect: "
                    f"{', '.join(sorted(IGNORED_KEYS))})"
                )
        if kwargs.get("gradient_checkpointing_kwargs", ...) is None:
            kwargs.pop("gradient_checkpointing_kwargs")  # transformers' default: None
        if kwargs.get("report_to", ...) is None:
            kwargs["report_to"] = "none"
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _same(value: Any, allowed: Any) -> bool:
    # True == 1 in Python: an accepted False must not let 0 through as "the same", nor the reverse
    return (
        type(value) is type(allowed)
        and value == allowed
        or (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and isinstance(allowed, (int, float))
            and not isinstance(allowed, bool)
            and value == allowed
        )
    )


def _optim_needs(name: str) -> str:
    if "8bit" in name or "4bit" in name or "bnb" in name:
        return "a low-bit optimizer state (bitsandbytes / torchao)"
    if name.startswith("paged_"):
        return "bitsandbytes' paged optimizer state"
    for prefix, what in (
        ("galore", "GaLore"),
        ("apollo", "APOLLO"),
        ("lomo", "LOMO"),
        ("adalomo", "LOMO"),
        ("lion", "the Lion optimizer"),
        ("ademamix", "AdEMAMix"),
        ("schedule_free", "schedulefree"),
        ("grokadamw", "grokadamw"),
        ("stable_adamw", "torch-optimi"),
        ("adamw_anyprecision", "torchdistx"),
        ("adamw_torch_xla", "torch_xla"),
        ("adamw_torch_npu", "torch_npu"),
        ("adamw_apex", "apex"),
    ):
        if name.startswith(prefix):
            return what
    return "a package this tool does not use"


def _steps_or_fraction(cfg, *names: str) -> None:
    for name in names:
        v = getattr(cfg, name)
        whole = isinstance(v, int) or (isinstance(v, float) and v.is_integer())
        in_range = isinstance(v, (int, float)) and (0 < v < 1 or (v >= 1 and whole))
        ok = not isinstance(v, bool) and in_range
        if not ok:
            raise ValueError(
                f"training_config {name}={v!r}: expected a positive int, or a float in (0, 1) "
                "(that share of the total steps)"
            )


def resolve_steps(value: int | float, total_steps: int) -> int:
    """A ``*_steps`` value -> a step count: a float in (0, 1) is that share of ``total_steps``,
    rounded up (as transformers); anything else is taken as a whole number of steps."""
    if isinstance(value, float) and value < 1:
        return max(1, math.ceil(value * total_steps))
    return int(value)


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
        raise ValueError(
            f"--config {path}: expected an object with 'training_config' and 'peft_config'"
        )
    unknown = set(data) - {"training_config", "peft_config"}
    if unknown:
        raise ValueError(
            f"--config {path}: unknown section(s) {sorted(unknown)}; expected training_config, peft_config"
        )
    for section in ("training_config", "peft_config"):
        value = data.get(section)
        if value is not None and not isinstance(value, dict):
            raise ValueError(
                f"--config {path}: {section} is a {type(value).__name__} "
                f"({str(value)[:40]!r}); expected an object of its keys"
            )
    return dict(data.get("training_config") or {}), dict(data.get("peft_config") or {})
