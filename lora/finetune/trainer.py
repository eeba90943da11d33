"""The training loop: LoRA fine-tuning of a causal LM on prepared chat data.

    result = finetune("Phi-3-mini-4k-instruct/", "chat.jsonl", training_config, peft_config)

or, with objects already in hand (the demo does this to evaluate the base model first):

    trainer = Trainer(model, tokenizer, data, TrainingConfig(...), LoRAConfig(...))
    trainer.train()

Data order is a pure function of (seed, step). Each epoch is a permutation of the training
sequences seeded with seed + epoch, cut into M micro-batches; an epoch has ⌈M/G⌉ optimizer steps
(G = gradient_accumulation_steps), step u of an epoch taking its micro-batches u·G … u·G+G−1 and
the last step of the epoch the M − (⌈M/G⌉−1)·G left: transformers' Trainer's epochs, so that
``num_train_epochs`` trains on every sequence. Resuming therefore needs only the step, and a run resumed
from a checkpoint gives the same loss at every later step as one never interrupted (the optimizer,
the learning-rate position and the RNG state that dropout draws from are restored exactly).

Nothing lost, nothing silent: a run locks its output directory (:mod:`.lock`), recovers what a
killed run left between two renames (:func:`.state.recover_checkpoints`), refuses a resume whose
configs or data differ from the checkpoint's (:mod:`.resume`), keeps the logging window in each
checkpoint so that metrics.jsonl after a resume equals the uninterrupted run's, and stops on a
non-finite, exploding or stalled loss, on SIGINT/SIGTERM and on a full disk with one line naming
the last complete checkpoint.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..checks import IGNORE_INDEX
from ..config import LoRAConfig
from ..surgery import inject, trainable_parameters
from .config import TrainingConfig, resolve_steps
from .distributed import DistContext, global_batch_size, resume_comparable
from .lock import OutputDirLock
from .metrics import (
    METRICS_FILE,
    append_metrics,
    plot_metrics,
    read_metrics,
    repair_metrics,
    truncate_metrics,
)
from .resume import ResumeMismatch, data_fingerprint, resume_problems
from .state import (
    latest_checkpoint,
    list_checkpoints,
    read_training_state,
    recover_checkpoints,
    restore_optimizer_and_rng,
    rotate_checkpoints,
    write_checkpoint,
)

__all__ = [
    "Trainer",
    "TrainResult",
    "TrainingError",
    "TrainingInterrupted",
    "ResumeMismatch",
    "lr_factor",
    "make_optimizer",
    "make_loss_scaler",
    "Intervals",
]

# Divergence checks (see Trainer.train): a step loss above LOSS_JUMP_FACTOR times the mean of the
# last LOSS_HISTORY step losses (and at least LOSS_JUMP_MIN above it, so that a tiny loss's noise
# is no jump), once LOSS_HISTORY_MIN losses are known, stops the run.
LOSS_JUMP_FACTOR = 10.0
LOSS_JUMP_MIN = 1.0
LOSS_HISTORY = 20
LOSS_HISTORY_MIN = 5


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite, exploding or stalled loss, a full disk); the message
    says where the last good checkpoint is."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the run; the message names the step and the last checkpoint."""


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """The learning-rate multiplier for optimizer step ``step`` (0-based), as transformers' schedulers."""
    if kind == "constant":
        return 1.0
    if step < warmup:
        return step / max(1, warmup)
    if kind == "constant_with_warmup":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    if kind == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    raise ValueError(f"lr_scheduler_type={kind!r}")


def make_optimizer(config: TrainingConfig, params: Sequence[nn.Parameter]) -> torch.optim.Optimizer:
    """The torch optimizer that ``config.optim`` names (see ``config.OPTIMIZERS``), over ``params``,
    with ``learning_rate`` and ``weight_decay`` (matrices only: no decay on 1-D parameters); the
    AdamW kinds also take adam_beta1, adam_beta2 and adam_epsilon.

    Raises:
        ValueError: an optim value with no torch optimizer (TrainingConfig refuses it first).
    """
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    name, lr = config.optim, config.learning_rate
    adam = dict(lr=lr, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon)
    if name in ("adamw_torch", "adamw_hf", "paged_adamw_32bit"):
        return torch.optim.AdamW(groups, **adam, foreach=False)
    if name == "adamw_torch_fused":
        return torch.optim.AdamW(groups, **adam, fused=True)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr)
    if name == "adafactor":
        return torch.optim.Adafactor(groups, lr=lr)
    if name == "adagrad":
        return torch.optim.Adagrad(groups, lr=lr)
    if name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=lr)
    raise ValueError(f"training_config optim={name!r}: no torch optimizer for it")


def make_loss_scaler(config: TrainingConfig, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16: a CUDA ``GradScaler`` (float16 gradients underflow without one); otherwise None.

    Raises:
        ValueError: fp16 on a device other than CUDA.
    """
    if not config.fp16:
        return None
    if device.type != "cuda":
        raise ValueError(
            f"training_config fp16=true needs a CUDA GPU (float16 compute with a loss scaler); "
            f"this run is on {device.type}. On CPU use bf16=true (bfloat16 base weights) or "
            "neither (float32)."
        )
    return torch.amp.GradScaler("cuda")


@dataclass(frozen=True)
class Intervals:
    """When the loop logs, evaluates and saves: transformers' ``*_strategy`` and ``*_steps``, with
    "epoch" as every ``steps_per_epoch`` optimizer steps. None: never between start and end.

    At the last step a log row is always written, and (unless the strategy is "no" for saving, or
    evaluation is off) a checkpoint and an evaluation always follow.
    """

    log_every: int | None
    eval_every: int | None
    save_every: int | None
    log_first_step: bool = False

    @classmethod
    def from_config(
        cls, cfg: TrainingConfig, total_steps: int, steps_per_epoch: int, evaluate: bool
    ) -> Intervals:
        def every(strategy: str | None, steps) -> int | None:
            if strategy == "epoch":
                return steps_per_epoch
            if strategy == "steps" and steps is not None:
                return resolve_steps(steps, total_steps)
            return None

        eval_strategy = cfg.eval_strategy or ("steps" if cfg.eval_steps else "no")
        eval_steps = cfg.eval_steps if cfg.eval_steps is not None else cfg.logging_steps
        return cls(
            log_every=every(cfg.logging_strategy, cfg.logging_steps),
            eval_every=every(eval_strategy, eval_steps) if evaluate else None,
            save_every=every(cfg.save_strategy, cfg.save_steps),
            log_first_step=cfg.logging_first_step,
        )

    def logs(self, step: int, total: int) -> bool:
        return step == total or (self.log_first_step and step == 1) or _hits(step, self.log_every)

    def evaluates(self, step: int, total: int) -> bool:
        return step != total and _hits(step, self.eval_every)

    def saves(self, step: int, total: int) -> bool:
        return step != total and _hits(step, self.save_every)


def _hits(step: int, every: int | None) -> bool:
    return every is not None and step % every == 0


# How much a run prints, by log_level: setup and checkpoint lines are "info"; the periodic step
# and eval lines are "metrics" (printed down to "warning", as transformers prints its metric dicts
# whatever the level); "error" and "critical" print nothing while a run goes well.
_LEVELS = {
    "debug": 10,
    "info": 20,
    "passive": 20,
    "metrics": 30,
    "warning": 30,
    "error": 40,
    "critical": 50,
}


def prints(config: TrainingConfig, level: str) -> bool:
    """Whether a line of ``level`` ("info", "metrics", "warning") is printed at ``log_level``."""
    return _LEVELS[level] >= _LEVELS[config.log_level]


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class TensorBoardReporter:
    """Writes each metrics row as tensorboard scalars (``train/loss``, ``eval/loss``, ...), with
    transformers' tag names, into ``log_dir``. Needs the tensorboard package."""

    def __init__(self, log_dir: Path, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def report(self, row: dict) -> None:
        step = row["step"]
        for key, value in row.items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            tag = f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


@dataclass
class TrainResult:
    """What :meth:`Trainer.train` returns. ``steps``: the optimizer step the run ended at;
    ``train_loss``: the mean of the step losses of the steps this call trained (transformers'
    ``TrainOutput.training_loss``: after a resume, the steps since the checkpoint), None when it
    trained none; ``eval_loss``: the final evaluation's, None without evaluation; ``metrics``:
    the rows of metrics.jsonl."""

    output_dir: Path
    adapter_dir: Path | None
    merged_dir: Path | None
    steps: int
    train_loss: float | None
    eval_loss: float | None
    metrics: list[dict] = field(default_factory=list)
    plot: Path | None = None


class Trainer:
    """Fine-tunes the LoRA parameters of an injected model.

    Args:
        model: a causal LM whose ``forward(input_ids, attention_mask, position_ids, labels,
            num_items_in_batch=...)`` returns ``.loss`` (lora's Phi-3), already injected with
            :func:`lora.inject` (or injected here if ``peft`` is given and the model has no LoRA yet).
        tokenizer: a :class:`lora.data.Tokenizer` (saved next to the adapter and the merged model).
        data: a :class:`lora.data.ChatData`.
        training: a :class:`TrainingConfig`.
        peft: the :class:`lora.LoRAConfig` to inject with (ignored when the model is already injected).
        base_model_name_or_path: recorded in adapter_config.json.
        log: where log lines go (default: through tqdm, to stderr's neighbour stdout); how many
            lines depends on ``training.log_level``.
        progress: show a tqdm progress bar on stderr, when stderr is a terminal (and
            ``disable_tqdm`` is not set). Elsewhere (CI, nohup, a log file) only the periodic
            step lines are printed.
        dist: this process's place in a torchrun job (:mod:`lora.finetune.distributed`); default:
            the one-process run. Only rank 0 logs and writes; see docs/scaling.md.

    Raises:
        ValueError: no trainable parameter; fp16 off CUDA; do_eval=true with no eval data.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        data,
        training: TrainingConfig,
        peft: LoRAConfig | None = None,
        base_model_name_or_path: str | None = None,
        log: Callable[[str], None] | None = None,
        progress: bool = True,
        dist: DistContext | None = None,
    ):
        self.model, self.tokenizer, self.data, self.cfg = model, tokenizer, data, training
        self.dist = dist if dist is not None else DistContext()
        # Sequences per micro-batch: the global batch, and this rank's slice (see _micro_batch).
        self.global_batch, self.per_device_batch = global_batch_size(
            training.per_device_train_batch_size,
            self.dist.world_size,
            training.global_train_batch_size,
        )
        self.output_dir = Path(training.output_dir)
        self.base_model_name_or_path = base_model_name_or_path
        self.progress = progress
        self._log = log
        if getattr(model, "lora_config", None) is None:
            if peft is None:
                raise ValueError(
                    "Trainer: the model has no LoRA layers and no peft config was given"
                )
            inject(model, peft)
        self.peft = model.lora_config
        if training.gradient_checkpointing:
            kwargs = {"use_reentrant": training.use_reentrant}
            if training.gradient_checkpointing_layers is None:
                model.gradient_checkpointing_enable(kwargs)
            else:  # ours only (lora.models.Phi3ForCausalLM)
                model.gradient_checkpointing_enable(
                    kwargs, layers=training.gradient_checkpointing_layers
                )
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("Trainer: the model has no trainable parameter")
        self.dist.broadcast_parameters(self.params)
        self.optimizer = make_optimizer(training, self.params)
        self.scaler = make_loss_scaler(training, self._device())
        self._set_tf32()
        n = len(data.train)
        self.micro_per_epoch = math.ceil(n / self.global_batch)
        # As transformers' Trainer: the last step of an epoch takes the micro-batches left over
        # (M % G of them when G does not divide M); no step spans two epochs.
        self.steps_per_epoch = math.ceil(
            self.micro_per_epoch / training.gradient_accumulation_steps
        )
        self.total_steps = (
            training.max_steps
            if training.max_steps > 0
            else max(1, math.ceil(training.num_train_epochs * self.steps_per_epoch))
        )
        self.warmup_steps = (
            resolve_steps(training.warmup_steps, self.total_steps)
            if training.warmup_steps
            else math.ceil(training.warmup_ratio * self.total_steps)
        )
        self.evaluates = self._evaluation_wanted()
        self.intervals = Intervals.from_config(
            training, self.total_steps, self.steps_per_epoch, self.evaluates
        )
        self.collate = data.collate_fn()
        self._reporters: list = []
        self.step = 0
        self._perm_cache: tuple[int, list[int]] | None = None
        # Held for the whole run; build_trainer() takes it before loading anything and hands it
        # over (released by whoever called build_trainer, with release_lock()).
        self.lock: OutputDirLock | None = None
        # What the checkpoint records about the data; finetune() adds the files' fingerprints.
        self.train_files = None
        self.eval_files = None
        self.allow_resume_changes = False
        self._fingerprint: dict | None = None
        self._reset_window()
        self._monitor: dict = {"recent_losses": [], "zero_grad_steps": 0}

    def _evaluation_wanted(self) -> bool:
        cfg, has_eval = self.cfg, bool(self.data.eval)
        if cfg.do_eval is False:
            if not cfg.skips_evaluation and has_eval:
                self._why_eval = (
                    f"evaluating although do_eval=false: eval_strategy="
                    f"{cfg.eval_strategy!r} turns it on, as in transformers"
                )
                return True
            self._why_eval = "do_eval=false: no evaluation"
            return False
        if cfg.do_eval is True and not has_eval:
            raise ValueError(
                "training_config do_eval=true, but there is no eval data: give an "
                "eval file (--eval-data) or a positive eval_fraction"
            )
        self._why_eval = None if has_eval else "no eval data: no evaluation"
        return has_eval

    def _set_tf32(self) -> None:
        if self.cfg.tf32 is None:
            return
        if self._device().type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = self.cfg.tf32
            torch.backends.cudnn.allow_tf32 = self.cfg.tf32
        elif self.cfg.tf32:
            self.log(
                f"tf32=true has no effect on {self._device().type} (TensorFloat-32 is a CUDA mode)",
                "warning",
            )

    # --- logging -----------------------------------------------------------------------------------
    def log(self, line: str, level: str = "info") -> None:
        """Print ``line`` (rank 0 only) if ``log_level`` lets ``level`` through ("info",
        "metrics", "warning")."""
        if not self.dist.is_main or not prints(self.cfg, level):
            return
        if self._log is not None:
            self._log(line)
        else:
            from tqdm import tqdm

            tqdm.write(line, file=sys.stdout)

    def _append_metrics(self, row: dict) -> None:
        if not self.dist.is_main:
            return
        append_metrics(self.output_dir, row)
        for reporter in self._reporters:
            reporter.report(row)

    def _open_reporters(self) -> None:
        self._reporters = []
        if "tensorboard" in self.cfg.report_targets():
            log_dir = Path(self.cfg.logging_dir or self.output_dir / "runs")
            # purge_step: a resumed run's events replace those the interrupted one wrote after it
            self._reporters.append(TensorBoardReporter(log_dir, purge_step=self.step or None))
            self.log(f"tensorboard event files: {log_dir}")

    def _close_reporters(self) -> None:
        for reporter in self._reporters:
            reporter.close()
        self._reporters = []

    def _reset_window(self) -> None:
        # The running logging window; saved in each checkpoint so that a resumed run logs the same
        # averages as an uninterrupted one.
        self._window = {"loss": 0.0, "steps": 0, "tokens": 0}

    # --- data ----------------------------------------------------------------------------------------
    def _micro_batch(self, index: int) -> dict:
        epoch, k = divmod(index, self.micro_per_epoch)
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            g = torch.Generator().manual_seed(self.cfg.seed + epoch)
            self._perm_cache = (epoch, torch.randperm(len(self.data.train), generator=g).tolist())
        bs = self.global_batch
        ids = self._perm_cache[1][k * bs : (k + 1) * bs]
        mine = self.dist.shard(ids, self.per_device_batch)
        if not mine:  # past a short last batch: a forward counting nothing keeps ranks in step
            batch = self.collate([self.data.train[ids[0]]])
            batch["labels"] = torch.full_like(batch["labels"], IGNORE_INDEX)
            batch["filler"] = True
            return batch
        return self.collate([self.data.train[i] for i in mine])

    def micro_batches_of(self, step: int) -> range:
        """The micro-batch indices (over the whole run: epoch · M + k) that optimizer step
        ``step`` (0-based) accumulates: G of them, fewer at the last step of an epoch."""
        epoch, u = divmod(step, self.steps_per_epoch)
        M, G = self.micro_per_epoch, self.cfg.gradient_accumulation_steps
        return range(epoch * M + u * G, epoch * M + min(u * G + G, M))

    def epoch_after(self, steps: int) -> float:
        """The epoch count after ``steps`` optimizer steps, by micro-batches (as transformers logs it)."""
        if steps == 0:
            return 0.0
        last = self.micro_batches_of(steps - 1)[-1] + 1
        return last / self.micro_per_epoch

    def _ranks_note(self) -> str:
        w = self.dist.world_size
        if w == 1:
            return ""
        return f" ({w} ranks x {self.per_device_batch}{', FSDP' if self.dist.fsdp else ''})"

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _forward(self, batch: dict, num_items: int | None = None):
        dev = self._device()
        return self.model(
            input_ids=batch["input_ids"].to(dev),
            attention_mask=batch["attention_mask"].to(dev),
            position_ids=batch["position_ids"].to(dev),
            labels=batch["labels"].to(dev),
            use_cache=False,  # a returned cache would keep every layer's keys and values alive
            num_items_in_batch=num_items,
        )

    @staticmethod
    def _count_labels(batch: dict) -> int:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    # --- evaluation ------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, examples: Sequence | None = None) -> float | None:
        """Token-weighted mean loss over the eval examples (None when there are none)."""
        examples = self.data.eval if examples is None else examples
        if not examples:
            return None
        was_training = self.model.training
        self.model.eval()
        total, count = 0.0, 0
        bs = self.cfg.per_device_eval_batch_size
        starts = list(range(0, len(examples), bs))
        world, rank = self.dist.world_size, self.dist.rank
        # Rank r takes batches r, r+W, ...; every rank runs the same number of forwards (FSDP
        # gathers weights in each one), a rank past the end re-running batch 0 without counting it.
        for round_start in range(0, len(starts), world):
            j = round_start + rank
            start = starts[j] if j < len(starts) else 0
            batch = self.collate(list(examples[start : start + bs]))
            n = self._count_labels(batch)
            if n == 0 and world == 1:
                continue
            loss = float(self._forward(batch, num_items=1).loss)  # num_items=1: the summed loss
            if j < len(starts):
                total += loss
                count += n
        total, count = self.dist.sum([total, count])
        self.model.train(was_training)
        return total / count if count else None

    def _log_eval(self, loss: float | None) -> None:
        if loss is None:
            return
        ppl = math.exp(min(loss, 50.0))
        self._append_metrics({"step": self.step, "eval_loss": loss, "eval_perplexity": ppl})
        self.log(f"step {self.step:>6d} | eval loss {loss:.4f} | perplexity {ppl:.2f}", "metrics")

    # --- checkpoints -----------------------------------------------------------------------------------
    def _write_adapter(self, directory: Path) -> None:
        from ..adapters import save_adapter

        save_adapter(self.model, directory, base_model_name_or_path=self.base_model_name_or_path)

    def save_checkpoint(self) -> Path:
        path = self.output_dir / f"checkpoint-{self.step}"
        if self.dist.is_main:  # the LoRA state is the same on every rank: rank 0 writes it
            extra = {
                "total_steps": self.total_steps,
                "training_config": self.cfg.to_dict(),
                "peft_config": self.peft.to_dict(),
                "base_model_name_or_path": self.base_model_name_or_path,
                "data": self.data_fingerprint(),
                "window": dict(self._window),
                "monitor": {
                    "recent_losses": list(self._monitor["recent_losses"]),
                    "zero_grad_steps": self._monitor["zero_grad_steps"],
                },
                "world_size": self.dist.world_size,
                "global_train_batch_size": self.global_batch,
                "steps_per_epoch": self.steps_per_epoch,
            }
            if self.scaler is not None:
                extra["grad_scaler"] = self.scaler.state_dict()
            if self.cfg.save_only_model:
                extra["save_only_model"] = True  # no optimizer or RNG state: cannot be resumed
            optimizer = None if self.cfg.save_only_model else self.optimizer
            path = write_checkpoint(
                self.output_dir, self.step, optimizer, self._write_adapter, extra
            )
            _fsync_path(self.output_dir / METRICS_FILE)
            limit = self.cfg.save_total_limit
            for old in rotate_checkpoints(self.output_dir, limit):
                self.log(f"removed old checkpoint {old.name} (save_total_limit={limit})")
        self.dist.barrier()
        return path

    def data_fingerprint(self) -> dict:
        """The data as a checkpoint records it (:func:`lora.finetune.resume.data_fingerprint`)."""
        if self._fingerprint is None:
            self._fingerprint = data_fingerprint(self.data, self.train_files, self.eval_files)
        return self._fingerprint

    def resume(self, checkpoint: str | os.PathLike | None = None) -> int:
        """Restore adapter, optimizer, step, RNG and the logging window from ``checkpoint``
        (default: the newest complete one in output_dir); returns the step to continue from.

        Raises:
            ValueError: there is no checkpoint to resume from (the message says what was found).
            ResumeMismatch: the configs or the data differ from the checkpoint's in a way that
                breaks bit-identical resume (unless ``allow_resume_changes``: then a warning).
        """
        from ..adapters import load_adapter

        checkpoint = (
            Path(checkpoint) if checkpoint is not None else latest_checkpoint(self.output_dir)
        )
        if self.dist.enabled:  # every rank resumes from the checkpoint rank 0 found
            chosen = self.dist.broadcast_text(None if checkpoint is None else str(checkpoint))
            checkpoint = None if chosen is None else Path(chosen)
        if checkpoint is None:
            raise ValueError(
                f"--resume: nothing to resume in {str(self.output_dir)!r}: "
                f"{self._describe_output_dir()}"
            )
        _refuse_model_only_checkpoint(checkpoint)
        state, tensors = read_training_state(checkpoint)
        step = int(state["step"])
        saved_global = _saved_global_batch(state, self.global_batch)
        saved_world = int(state.get("world_size", 1))
        # The global batch decides the numbers, not how it is split over ranks or devices.
        same_split = saved_world == self.dist.world_size
        problems = resume_problems(
            step,
            self.total_steps,
            resume_comparable(state.get("training_config"), saved_global, same_split),
            resume_comparable(self.cfg.to_dict(), self.global_batch, same_split),
            state.get("peft_config"),
            self.peft.to_dict(),
            state.get("data"),
            self.data_fingerprint(),
        )
        if saved_global != self.global_batch:
            problems.append(
                _global_batch_message(state, saved_global, self.global_batch, self.dist.world_size)
            )
        elif (problem := self._epoch_layout_problem(state)) is not None:
            problems.append(problem)
        if problems and not self.allow_resume_changes:
            raise ResumeMismatch(
                f"--resume from {checkpoint}: the run differs from the checkpoint's ("
                + "; ".join(problems)
                + "). Resume with the checkpoint's settings, start a new run "
                "in another --output, or allow the change (--allow-resume-changes) and lose "
                "bit-identical resume"
            )
        if problems:
            self.log(
                f"warning: resuming {checkpoint} with changes ({'; '.join(problems)}): the "
                "run is no longer bit-identical to an uninterrupted one"
            )
        old_base = state.get("base_model_name_or_path")
        if old_base and self.base_model_name_or_path and old_base != self.base_model_name_or_path:
            self.log(
                f"warning: the checkpoint was trained on base model {old_base!r}; "
                f"resuming on {self.base_model_name_or_path!r}"
            )
        if not same_split:
            self.log(
                f"resuming a checkpoint of {saved_world} process(es) on "
                f"{self.dist.world_size}: the same run, up to floating-point rounding"
            )
        load_adapter(self.model, checkpoint)
        restore_optimizer_and_rng(self.optimizer, state, tensors)
        if self.scaler is not None and state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])
        self.step = step
        if isinstance(state.get("window"), dict):
            self._window = {
                "loss": float(state["window"].get("loss", 0.0)),
                "steps": int(state["window"].get("steps", 0)),
                "tokens": int(state["window"].get("tokens", 0)),
            }
        if isinstance(state.get("monitor"), dict):
            monitor = state["monitor"]
            self._monitor = {
                "recent_losses": [float(x) for x in monitor.get("recent_losses", [])],
                "zero_grad_steps": int(monitor.get("zero_grad_steps", 0)),
            }
        if self.dist.is_main:
            self._truncate_metrics(self.step)
        self.dist.barrier()
        self.log(f"resumed from {checkpoint} at step {self.step}")
        return self.step

    def _epoch_layout_problem(self, state: dict) -> str | None:
        # Checkpoints before steps_per_epoch was recorded were written by a loop whose epochs held
        # floor(M / G) steps, the M % G micro-batches left running on into the next epoch's steps;
        # where G divides M that is the same data order as now.
        M, G = self.micro_per_epoch, self.cfg.gradient_accumulation_steps
        saved = state.get("steps_per_epoch")
        if saved is None and M % G == 0:
            return None
        if saved == self.steps_per_epoch:
            return None
        if saved is None:
            return (
                f"it was written by an earlier lora-finetune whose epochs held {M // G} optimizer "
                f"steps of {G} micro-batches, the {M % G} left over running on into the next "
                f"epoch; an epoch now holds {self.steps_per_epoch} steps, the last taking those "
                f"{M % G} (as transformers' Trainer does), so the data order from here differs"
            )
        return (
            f"it was trained with {saved} optimizer steps per epoch, this run has "
            f"{self.steps_per_epoch} ({M} micro-batches, gradient accumulation {G})"
        )

    def _describe_output_dir(self) -> str:
        if not self.output_dir.is_dir():
            return "the directory does not exist"
        names = sorted(
            p.name + ("/" if p.is_dir() else "")
            for p in self.output_dir.iterdir()
            if p.name != ".lora-run.lock"
        )
        if not names:
            return "the directory is empty; start without --resume"
        return (
            f"no complete checkpoint-N, only {', '.join(names)}; start over with --overwrite "
            "or choose another --output"
        )

    def _start_fresh(self) -> None:
        # An earlier run's files are removed only when the user said so: nothing is lost by accident.
        earlier = earlier_run(self.output_dir)
        if not earlier:
            self.dist.barrier()
            return
        if not self.cfg.overwrite_output_dir:
            raise earlier_run_error(self.output_dir, earlier)
        if self.dist.is_main:  # every rank saw the earlier run; one removes it
            derived = [self.output_dir / name for name in ("loss_curve.png", "merged", "runs")]
            for p in earlier + derived:
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
        self.dist.barrier()
        self.log(f"overwrite_output_dir: removed the earlier run in {self.output_dir}")

    def _truncate_metrics(self, step: int) -> None:
        # Rows logged after the checkpoint by the interrupted run are logged again by this one.
        truncate_metrics(self.output_dir, step)

    def _repair_metrics(self) -> None:
        # A kill while a row was written leaves a cut last line; drop it so that the next row
        # starts on a line of its own.
        if repair_metrics(self.output_dir):
            self.log(f"{self.output_dir / METRICS_FILE}: dropped a row cut by an interrupted write")

    # --- the loop ----------------------------------------------------------------------------------------
    def train(self, resume: bool | str | os.PathLike = False) -> TrainResult:
        """Run until ``total_steps``; log, evaluate and checkpoint as ``Intervals`` says (by
        default: every logging_steps, every eval_steps and at the end, every save_steps and at the
        end). ``resume``: True (the newest complete checkpoint in output_dir), a checkpoint path,
        or False (then ``resume_from_checkpoint`` from the config, if set).

        The output directory is locked for the whole run, and what an earlier run killed while
        saving left behind is recovered first (:func:`lora.finetune.state.recover_checkpoints`).

        Raises:
            OutputDirBusy: another run holds the output directory.
            ValueError: ``resume`` with nothing to resume; a fresh run into an earlier run's
                directory without ``overwrite_output_dir``.
            ResumeMismatch: ``resume`` with settings or data that break bit-identical resume.
            TrainingError: a non-finite loss, a loss jump or a stalled gradient (no checkpoint is
                written for that step), or a full disk; the message names the last checkpoint.
            TrainingInterrupted: SIGINT/SIGTERM; the message names the step and the last checkpoint.
        """
        own_lock = self.lock is None and self.dist.is_main  # rank 0 is the only writer
        if own_lock:
            self.lock = OutputDirLock.acquire(self.output_dir)
        try:
            with sigterm_as_interrupt():
                return self._train(resume)
        except TrainingInterrupted:
            raise
        except KeyboardInterrupt:
            raise TrainingInterrupted(self._interrupted_message()) from None
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            raise self._no_space_error() from None
        finally:
            if own_lock:
                self.lock.release()
                self.lock = None

    def _no_space_error(self) -> TrainingError:
        last = latest_checkpoint(self.output_dir)
        kept = f"the last complete checkpoint is {last}" if last else "no checkpoint was written"
        return TrainingError(
            f"no space left on device writing to {self.output_dir} at step "
            f"{self.step}; {kept}; free some space and continue with --resume"
        )

    def release_lock(self) -> None:
        """Release the output directory's lock handed over by :func:`build_trainer` (idempotent)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _interrupted_message(self) -> str:
        last = latest_checkpoint(self.output_dir)
        return f"interrupted at step {self.step}; last complete checkpoint " + (
            f"{last}; continue with --resume" if last else "none (nothing to resume yet)"
        )

    def _train(self, resume: bool | str | os.PathLike) -> TrainResult:
        from tqdm import tqdm

        cfg = self.cfg
        if self.dist.is_main:
            for line in recover_checkpoints(self.output_dir):
                self.log(line)
            self._repair_metrics()
        self.dist.barrier()
        if not resume and cfg.resume_from_checkpoint:
            resume = cfg.resume_from_checkpoint
        if resume:
            self.resume(None if resume is True else resume)
        else:
            self._start_fresh()
        trainable, total = trainable_parameters(self.model)
        self.log(f"trainable params: {trainable:,} of {total:,} ({100 * trainable / total:.4f}%)")
        self.log(
            f"{len(self.data.train)} training sequences, {self.micro_per_epoch} micro-batches of "
            f"{self.global_batch}{self._ranks_note()} per epoch, "
            f"gradient accumulation {cfg.gradient_accumulation_steps}: "
            f"{self.total_steps} optimizer steps (warmup {self.warmup_steps}, "
            f"{cfg.lr_scheduler_type} schedule, optimizer {cfg.optim})"
        )
        if self._why_eval:
            self.log(self._why_eval)
        self._open_reporters()
        try:
            train_loss = self._loop(tqdm)
            eval_loss = None
            if self.evaluates:
                eval_loss = self._logged_eval(self.step)  # a resumed run that had evaluated already
                if self.dist.sum([eval_loss is None])[0] > 0:  # every rank decides alike
                    eval_loss = self.evaluate()
                    self._log_eval(eval_loss)
        finally:
            self._close_reporters()
        if cfg.save_strategy != "no":
            final = self.save_checkpoint()  # a later --resume with more max_steps continues here
            self.log(f"saved {final}")
        adapter_dir = self.output_dir / "adapter"
        plot = None
        if self.dist.is_main:
            self._write_adapter(adapter_dir)
            plot = plot_metrics(self.output_dir)
        self.dist.barrier()
        return TrainResult(
            self.output_dir,
            adapter_dir,
            None,
            self.step,
            train_loss,
            eval_loss,
            read_metrics(self.output_dir),
            plot,
        )

    def _draws_progress_bar(self) -> bool:
        # A bar is carriage-return frames: on anything but a terminal (CI, nohup, a log file) they
        # pile up on one line, and the periodic step lines already say the same.
        return self.progress and not self.cfg.disable_tqdm and _is_terminal(sys.stderr)

    def _loop(self, tqdm) -> float | None:
        """Train to ``total_steps``; returns the mean step loss of the steps trained here."""
        cfg, when = self.cfg, self.intervals
        if cfg.eval_on_start and self.evaluates and self.step == 0:
            self._log_eval(self.evaluate())
        self.model.train()
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc="training",
            unit="step",
            disable=not self._draws_progress_bar(),
            dynamic_ncols=True,
            file=sys.stderr,
        )
        window = self._window
        window_start = time.perf_counter()
        run_start = time.perf_counter()
        start_step = self.step
        loss_sum, loss_steps = 0.0, 0  # this call's steps: the mean is TrainResult.train_loss
        while self.step < self.total_steps:
            lr = cfg.learning_rate * lr_factor(
                self.step, self.total_steps, self.warmup_steps, cfg.lr_scheduler_type
            )
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            batches = [self._micro_batch(i) for i in self.micro_batches_of(self.step)]
            self.dist.step_seed(cfg.seed, self.step)
            num_items = max(1, int(self.dist.sum([sum(self._count_labels(b) for b in batches)])[0]))
            step_loss = 0.0
            step_tokens = 0
            for batch in batches:
                loss = self._forward(batch, num_items=num_items).loss
                (loss if self.scaler is None else self.scaler.scale(loss)).backward()
                step_loss += float(loss.detach())
                if not batch.get("filler"):
                    mask = batch["attention_mask"]
                    step_tokens += int(
                        batch["input_ids"].numel() if mask.dim() != 2 else mask.sum()
                    )
            step_loss, step_tokens = self.dist.sum([step_loss, step_tokens])  # all ranks'
            step_tokens = int(step_tokens)
            if not math.isfinite(step_loss):
                bar.close()
                raise TrainingError(
                    f"loss is {step_loss} at step {self.step + 1}: stopping. "
                    + self._last_good()
                    + " Try a lower learning_rate, or fp32 instead of bf16/fp16."
                )
            self.dist.reduce_gradients(self.params)
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            if cfg.max_grad_norm > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm))
            else:
                grad_norm = _grad_norm(self.params)
            problem = self._diverged(step_loss, grad_norm)
            if problem:
                bar.close()
                raise TrainingError(
                    f"{problem} at step {self.step + 1}: stopping. "
                    + self._last_good()
                    + " Try a lower learning_rate."
                )
            if self.scaler is not None:
                self.scaler.step(self.optimizer)  # skipped when the scaled gradients overflowed
                self.scaler.update()
            else:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.dist.release_freed_memory()
            self.step += 1
            loss_sum += step_loss
            loss_steps += 1
            window["loss"] += step_loss
            window["steps"] += 1
            window["tokens"] += step_tokens
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")

            if when.logs(self.step, self.total_steps):
                now = time.perf_counter()
                elapsed = now - run_start
                tps = window["tokens"] / max(now - window_start, 1e-9)
                eta = elapsed / max(self.step - start_step, 1) * (self.total_steps - self.step)
                row = {
                    "step": self.step,
                    "loss": window["loss"] / window["steps"],
                    "learning_rate": lr,
                    "tokens_per_second": tps,
                    "epoch": self.epoch_after(self.step),
                    "grad_norm": grad_norm,
                    "elapsed": elapsed,
                }
                row.update(self.dist.memory_row(self.model))
                self._append_metrics(row)
                self.log(
                    f"step {self.step:>6d}/{self.total_steps} | loss {row['loss']:.4f} | lr {lr:.3e} | "
                    f"{tps:,.0f} tok/s | elapsed {_hms(elapsed)} | eta {_hms(eta)}"
                    + _rank_summary(row, tps),
                    "metrics",
                )
                self._reset_window()
                window = self._window
                window_start = time.perf_counter()
            if when.evaluates(self.step, self.total_steps):
                self._log_eval(self.evaluate())
            if when.saves(self.step, self.total_steps):
                path = self.save_checkpoint()
                self.log(f"saved {path}")
        bar.close()
        return loss_sum / loss_steps if loss_steps else None

    def _last_good(self) -> str:
        last = latest_checkpoint(self.output_dir)
        return f"The last good checkpoint is {last}." if last else "No checkpoint was written yet."

    def _logged_eval(self, step: int) -> float | None:
        for row in reversed(read_metrics(self.output_dir)):
            if row.get("step") == step and "eval_loss" in row:
                return float(row["eval_loss"])
        return None

    def _diverged(self, loss: float, grad_norm: float) -> str | None:
        """Why the run has stalled or collapsed, or None; updates the running statistics."""
        mon = self._monitor
        recent = mon["recent_losses"]
        if len(recent) >= LOSS_HISTORY_MIN:
            mean = sum(recent) / len(recent)
            if loss > LOSS_JUMP_FACTOR * mean and loss - mean > LOSS_JUMP_MIN:
                return (
                    f"the loss jumped to {loss:.4g}, {loss / mean:.1f}x its running mean "
                    f"{mean:.4g} over the last {len(recent)} steps (the run is diverging)"
                )
        recent.append(loss)
        del recent[:-LOSS_HISTORY]
        mon["zero_grad_steps"] = mon["zero_grad_steps"] + 1 if grad_norm == 0.0 else 0
        if mon["zero_grad_steps"] >= resolve_steps(self.cfg.logging_steps, self.total_steps):
            return (
                f"the gradient norm has been exactly 0 for {mon['zero_grad_steps']} "
                f"consecutive steps (loss {loss:.4g}): the run has stalled or collapsed and "
                "would learn nothing more"
            )
        return None

    def merge_and_save(self, directory: str | os.PathLike | None = None) -> Path:
        """Merge the adapter into the base weights and write a full checkpoint directory
        (config.json, safetensors, tokenizer files) that ``Phi3ForCausalLM.from_pretrained`` and
        transformers read. The model is unloaded in place: plain layers from here on."""
        from ..surgery import merge_and_unload

        if self.dist.fsdp:
            raise ValueError(
                "--merge with --fsdp: the base is sharded across ranks; merge "
                "afterwards on one machine that holds the model (lora.load_adapter + "
                "lora.merge_and_unload, see docs/scaling.md)"
            )
        directory = Path(directory) if directory is not None else self.output_dir / "merged"
        if self.dist.is_main:
            merged = merge_and_unload(self.model)
            merged.save_pretrained(directory)
            if self.tokenizer is not None and hasattr(self.tokenizer, "save_pretrained"):
                self.tokenizer.save_pretrained(directory)
        self.dist.barrier()
        return directory


def earlier_run(output_dir: str | os.PathLike) -> list[Path]:
    """What an earlier run left in ``output_dir``: its checkpoints, metrics file and adapter."""
    out = Path(output_dir)
    found = [p for _, p in list_checkpoints(out)]
    return found + [p for p in (out / METRICS_FILE, out / "adapter") if p.exists()]


def earlier_run_error(output_dir: str | os.PathLike, earlier: list[Path]) -> ValueError:
    """The refusal of a fresh run into ``output_dir``, which holds ``earlier`` (:func:`earlier_run`)
    and no ``overwrite_output_dir``."""
    return ValueError(
        f"output_dir {str(output_dir)!r} holds an earlier run "
        f"({', '.join(sorted(p.name for p in earlier))}): resume it (--resume), choose another "
        "--output, or set overwrite_output_dir to start over"
    )


def _grad_norm(params) -> float:
    norms = [
        torch.linalg.vector_norm(p.grad.detach().float()) for p in params if p.grad is not None
    ]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


class sigterm_as_interrupt:
    """SIGTERM (what schedulers send) raises KeyboardInterrupt, as SIGINT does, for the run's
    duration; the previous handler is restored after. A no-op off the main thread."""

    def __enter__(self):
        self._old = None
        try:
            self._old = signal.signal(signal.SIGTERM, self._raise)
        except ValueError:  # not the main thread
            pass
        return self

    @staticmethod
    def _raise(signum, frame):
        raise KeyboardInterrupt

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def _refuse_model_only_checkpoint(checkpoint: Path) -> None:
    try:
        state = json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return  # read_training_state reports a damaged checkpoint
    if state.get("save_only_model"):
        raise ValueError(
            f"{checkpoint} was written with save_only_model=true: it holds the adapter but no "
            "optimizer or RNG state, so a run cannot continue from it exactly. Start a fresh run "
            "(load the adapter from it), or train with save_only_model=false to be able to resume."
        )


def _saved_global_batch(state: dict, default: int) -> int:
    # Checkpoints written before the global batch was recorded hold one process's batch.
    cfg = state.get("training_config") or {}
    saved = state.get("global_train_batch_size", cfg.get("per_device_train_batch_size"))
    return default if saved is None else int(saved)


def _global_batch_message(state: dict, saved: int, global_batch: int, world_size: int) -> str:
    # Data order is a function of (seed, step) for one global batch size; another size would
    # replay different sequences.
    saved_world = state.get("world_size", 1)
    hint = (
        f"per_device_train_batch_size={saved // world_size} with {world_size} process(es)"
        if saved % world_size == 0
        else f"a number of processes that divides {saved}; {saved} does not divide by {world_size}"
    )
    return (
        f"it was trained with a global batch of {saved} sequences per micro-batch "
        f"({saved_world} process(es)), this run has {global_batch} ({world_size} "
        f"process(es)): to resume with the same global batch use {hint}, or "
        f"global_train_batch_size={saved}"
    )


def _rank_summary(row: dict, tps: float) -> str:
    if row.get("world_size", 1) == 1:
        return f" | peak mem {row['memory_mb'][0]:,.0f} MiB"
    mem = ", ".join(f"{m:,.0f}" for m in row["memory_mb"])
    held = ", ".join(f"{m:,.1f}" for m in row["params_mb"])
    return (
        f" | {row['world_size']} ranks, {tps / row['world_size']:,.0f} tok/s each | "
        f"peak mem/rank [{mem}] MiB | params/rank [{held}] MiB"
    )


def _fsync_path(path: Path) -> None:
    if path.exists():
        with open(path, "rb") as f:
            os.fsync(f.fileno())


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:d}:{s:02d}"
