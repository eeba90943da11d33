"""From a checkpoint directory and chat data to a ready :class:`~lora.finetune.Trainer`: the one
pipeline that ``lora-finetune``, :func:`finetune` and the demo share.

    trainer = build_trainer(model_dir, "chat.jsonl", TrainingConfig.from_dict(tc), LoRAConfig(**pc))
    result = trainer.train()
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..config import LoRAConfig
from ..surgery import inject
from .config import TrainingConfig
from .distributed import DistContext, load_sharded_phi3, setup
from .lock import OutputDirLock, check_output_dir
from .trainer import Trainer, TrainResult, earlier_run, earlier_run_error, make_loss_scaler, prints

__all__ = ["build_trainer", "finetune"]


def build_trainer(
    model_dir: str | os.PathLike,
    train_file: str | os.PathLike | Sequence,
    training: TrainingConfig,
    peft: LoRAConfig,
    eval_file: str | os.PathLike | Sequence | None = None,
    say: Callable[[str], None] = print,
    log: Callable[[str], None] | None = None,
    progress: bool = True,
    data_cache: bool = True,
    dist: DistContext | None = None,
    resume: bool | str | os.PathLike = False,
) -> Trainer:
    """Seed, read the tokenizer and the data (``say`` gets its summary, if ``log_level`` lets
    info lines through), load the Phi-3 checkpoint in ``model_dir`` (bf16 / fp16 when
    ``training`` says so), inject ``peft`` and build the Trainer (``log`` and ``progress`` as
    :class:`Trainer`'s). ``dist``: this process's place in a torchrun job (from
    :func:`lora.finetune.distributed.setup`; default the one-process run): the model goes to its
    device, sharded with FSDP2 when ``dist.fsdp``, and only rank 0 says or shows anything.

    The eval set is ``eval_file``, else ``training.eval_fraction`` of the training records (none
    when ``do_eval`` is false: nothing is evaluated). Raises what the data and checkpoint loaders
    raise (:class:`lora.data.DataError`, ``FileNotFoundError``, ``ValueError``; fp16 off CUDA is a
    ``ValueError`` too) before anything is trained, and first :class:`OutputDirBusy` (another run
    holds ``training.output_dir``) or ``ValueError`` (it cannot be a writable directory; or, for a
    fresh run, ``resume`` false and no ``resume_from_checkpoint``, it holds an earlier run and
    ``overwrite_output_dir`` is not set, as :meth:`Trainer.train` would refuse). The
    returned trainer holds the output directory's lock: call ``trainer.release_lock()`` when done.
    With ``data_cache``, the prepared data is kept in ``output_dir/data_cache`` and reused by a
    later run with the same data, tokenizer, template and options (docs/data.md).
    """
    # The output directory is checked and locked before anything is loaded: a bad --output or a
    # directory another run is using costs no work. The trainer holds the lock from here on; the
    # caller releases it (trainer.release_lock()) when done with the directory.
    dist = dist if dist is not None else DistContext()
    # Under torchrun rank 0 alone checks, creates and locks the directory: it is the only writer.
    lock = OutputDirLock.acquire(check_output_dir(training.output_dir)) if dist.is_main else None
    try:
        fresh = not resume and not training.resume_from_checkpoint
        earlier = earlier_run(training.output_dir) if fresh else []
        if earlier and not training.overwrite_output_dir:
            raise earlier_run_error(training.output_dir, earlier)
        trainer = _build(
            model_dir, train_file, training, peft, eval_file, say, log, progress, data_cache, dist
        )
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    trainer.lock = lock
    trainer.train_files, trainer.eval_files = train_file, eval_file
    return trainer


def _build(
    model_dir, train_file, training, peft, eval_file, say, log, progress, data_cache=True, dist=None
) -> Trainer:
    from ..data import Tokenizer, prepare_chat_data
    from ..models import Phi3ForCausalLM

    dist = dist if dist is not None else DistContext()
    make_loss_scaler(training, torch.device(dist.device))  # fp16 off CUDA: say so first
    if not dist.is_main:
        say, log, progress = (lambda line: None), (lambda line: None), False
        data_cache = False  # rank 0 alone writes: the others prepare the same data in memory
    torch.manual_seed(training.seed)
    tokenizer = Tokenizer.from_pretrained(model_dir)
    # do_eval=false: nothing is evaluated, so nothing is held out of the training data either
    held_out = 0.0 if eval_file is not None or training.skips_evaluation else training.eval_fraction
    data = prepare_chat_data(
        train_file,
        tokenizer,
        training.max_seq_length,
        eval_file=eval_file,
        eval_fraction=held_out,
        seed=training.seed,
        packing=training.packing,
        on_error=training.on_error,
        cache_dir=Path(training.output_dir) / "data_cache" if data_cache else None,
        progress=progress,
        log=say,
    )
    if prints(training, "info"):
        say(data.summary())
    dtype = torch.bfloat16 if training.bf16 else torch.float16 if training.fp16 else torch.float32
    if dist.fsdp:  # each rank reads only its shards; LoRA drawn from the seed as inject draws it
        # (a 4-bit base too: each rank quantises its own blocks as it reads them)
        model = load_sharded_phi3(model_dir, peft, dtype, dist, quantize=training.quantize)
    else:
        model = Phi3ForCausalLM.from_pretrained(
            model_dir, dtype=dtype, device=dist.device, quantize=training.quantize
        )
        inject(model, peft)  # B = 0: until trained, the model computes exactly the base model
    return Trainer(
        model,
        tokenizer,
        data,
        training,
        base_model_name_or_path=str(model_dir),
        log=log,
        progress=progress,
        dist=dist,
    )


def finetune(
    model_dir: str | os.PathLike,
    train_file: str | os.PathLike | Sequence,
    training_config: dict | TrainingConfig,
    peft_config: dict | LoRAConfig,
    eval_file: str | os.PathLike | None = None,
    resume: bool = False,
    merge: bool = False,
    log: Callable[[str], None] | None = None,
    progress: bool = True,
    allow_resume_changes: bool = False,
) -> TrainResult:
    """Fine-tune the Phi-3 checkpoint in ``model_dir`` on a chat dataset; the Python form of
    ``lora-finetune``.

    ``training_config`` and ``peft_config`` are the two dictionaries of the Phi-3 fine-tuning recipe
    (or a :class:`TrainingConfig` / :class:`lora.LoRAConfig`). Returns a :class:`TrainResult`.
    ``allow_resume_changes``: let ``resume`` go on with settings or data that differ from the
    checkpoint's (a warning says the run is no longer bit-identical); otherwise that is a
    :class:`ResumeMismatch`. See :meth:`Trainer.train` for what else is raised.
    Under torchrun each process calls this: it joins the job's process group (and leaves it at the
    end if it made it); see :mod:`lora.finetune.distributed` and docs/scaling.md. Raises
    :class:`lora.finetune.distributed.DistributedSetupError` (a ValueError) for a launch that
    cannot work: ``fsdp`` without torchrun, CUDA asked for with no GPU.
    """
    training = (
        training_config
        if isinstance(training_config, TrainingConfig)
        else TrainingConfig.from_dict(training_config)
    )
    if not isinstance(peft_config, (LoRAConfig, dict)):
        raise TypeError(
            f"peft_config={peft_config!r}: expected a dict of LoRAConfig keys or a lora.LoRAConfig"
        )
    peft = peft_config if isinstance(peft_config, LoRAConfig) else LoRAConfig(**peft_config)
    dist = setup("cpu" if training.use_cpu else training.device, training.fsdp)

    def say(line: str) -> None:
        if dist.is_main and prints(training, "info"):
            (log or print)(line)

    trainer = None
    finished = False
    try:
        trainer = build_trainer(
            model_dir,
            train_file,
            training,
            peft,
            eval_file=eval_file,
            say=say,
            log=log,
            progress=progress,
            dist=dist,
            resume=resume,
        )
        trainer.allow_resume_changes = allow_resume_changes
        result = trainer.train(resume=resume)
        if merge:
            result.merged_dir = trainer.merge_and_save()
            say(f"merged model written to {result.merged_dir}")
        finished = True
        return result
    finally:
        if trainer is not None:
            trainer.release_lock()
        # The model goes before the group: an FSDP-sharded one holds it, and a finished job's
        # group is freed in dist.close(), not in the interpreter's teardown (DistContext.close).
        # A failed one only leaves it, at once: another rank may be gone, and torchrun is about
        # to stop this one (its error message is still to be printed).
        trainer = None
        dist.close(free=finished)
