"""The embedded default: ``lora-finetune`` with no ``--model`` and no ``--data``.

It fine-tunes the small Phi-3 checkpoint that ships in :mod:`lora.demo` (pretrained with this
project's own code on its bundled stories) to answer "what number comes after X?" with X in words
(see :mod:`lora.demo.skill`), a skill the base model lacks, and shows held-out loss and exact-match
score before and after, with a few generations side by side.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from ..config import LoRAConfig
from ..finetune.config import TrainingConfig
from ..finetune.evaluate import EvalRow, exact_match, markdown_table
from ..finetune.pipeline import build_trainer
from ..finetune.trainer import TrainResult
from ..surgery import trainable_parameters

__all__ = ["DEMO_TRAINING_CONFIG", "DEMO_PEFT_CONFIG", "run_demo"]

# The two dictionaries, as in the Phi-3 fine-tuning recipe, sized for 2 CPU cores and ~2 minutes.
DEMO_TRAINING_CONFIG = {
    "output_dir": "runs/demo",
    "overwrite_output_dir": True,  # each `make demo` starts over
    "learning_rate": 3e-3,
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 50,
    "gradient_accumulation_steps": 1,
    "max_steps": 400,
    "lr_scheduler_type": "cosine",
    "warmup_ratio": 0.05,
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,
    "logging_steps": 20,
    "eval_steps": 200,
    "save_steps": 200,
    "save_total_limit": 2,
    "seed": 0,
    "bf16": False,
    "gradient_checkpointing": False,
    "max_seq_length": 128,
    "packing": False,
}
DEMO_PEFT_CONFIG = {
    "r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.05,
    "bias": "none",
    "task_type": "CAUSAL_LM",
    "target_modules": "all-linear",
    "modules_to_save": None,
}
SCORED_PROMPTS = 100  # held-out prompts scored by exact match (greedy generation)
SHOWN_PROMPTS = 5


def run_demo(
    training_config: dict | None = None,
    peft_config: dict | None = None,
    resume: bool = False,
    merge: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Run the demo; ``training_config``/``peft_config`` entries override the demo's own."""
    from . import base_model_dir, ensure_assets, eval_file, train_file
    from .skill import SKILL

    t0 = time.perf_counter()
    ensure_assets(log=log)
    training = TrainingConfig.from_dict({**DEMO_TRAINING_CONFIG, **(training_config or {})})
    peft = LoRAConfig(**{**DEMO_PEFT_CONFIG, **(peft_config or {})})
    model_dir = base_model_dir()
    log(f"== lora-finetune demo: base model {model_dir}")
    log(f"   the skill to learn: {SKILL}")
    # The same pipeline as lora-finetune; the trainer's own lines go through tqdm (log=None).
    trainer = build_trainer(
        model_dir,
        train_file(),
        training,
        peft,
        eval_file=eval_file(),
        say=log,
        progress=progress,
        resume=resume,
    )
    try:  # build_trainer locked the output directory; it stays locked until the demo is done
        return _evaluate_train_report(trainer, peft, resume, merge, log, t0)
    finally:
        trainer.release_lock()


def _evaluate_train_report(trainer, peft, resume, merge, log, t0) -> TrainResult:
    from . import eval_file
    from .skill import EXAMPLE_PROMPT, MAX_NEW_TOKENS, eval_pairs

    model, tokenizer = trainer.model, trainer.tokenizer
    trainable, total = trainable_parameters(model)
    log(
        f"LoRA r={peft.r} alpha={peft.lora_alpha} on {peft.target_modules}: "
        f"{trainable:,} trainable parameters of {total:,} ({100 * trainable / total:.2f}%)"
    )

    pairs = eval_pairs(eval_file())[:SCORED_PROMPTS]
    before_loss = trainer.evaluate()
    before_score, before_replies = exact_match(
        model, tokenizer, pairs, batch_size=50, max_new_tokens=MAX_NEW_TOKENS
    )
    log(
        f"before: held-out loss {before_loss:.4f}, exact match {100 * before_score:.1f}% on {len(pairs)} held-out prompts"
    )

    result = trainer.train(resume=resume)

    # do_eval=false (e.g. a recipe given with --config) skips the loop's evaluation, not the demo's
    after_loss = result.eval_loss if result.eval_loss is not None else trainer.evaluate()
    after_score, after_replies = exact_match(
        model, tokenizer, pairs, batch_size=50, max_new_tokens=MAX_NEW_TOKENS
    )
    log("")
    log("== results on held-out prompts (numbers never seen in training)")
    log(
        markdown_table(
            [
                EvalRow("base", before_loss, exact_match=before_score),
                EvalRow("base+LoRA", after_loss, exact_match=after_score),
            ]
        )
    )  # lora-eval's table
    log("")
    log("== generations (greedy)")
    for (messages, ref), b, a in list(zip(pairs, before_replies, after_replies))[:SHOWN_PROMPTS]:
        log(f"prompt:    {messages[-1]['content']}")
        log(f"  expected:  {ref}")
        log(f"  base:      {_short(b)}")
        log(f"  base+LoRA: {_short(a)}")
    if merge:
        result.merged_dir = trainer.merge_and_save()
    log("")
    log(
        f"adapter:      {result.adapter_dir}  (PEFT format: adapter_config.json + adapter_model.safetensors)"
    )
    log(
        f"checkpoints:  {', '.join(p.name for p in sorted(Path(result.output_dir).glob('checkpoint-*')))}"
    )
    log(f"metrics:      {Path(result.output_dir) / 'metrics.jsonl'}")
    if result.plot:
        log(f"loss curve:   {result.plot}")
    if result.merged_dir:
        log(f"merged model: {result.merged_dir}")
    log(f'chat with it: lora-generate --adapter {result.adapter_dir} --prompt "{EXAMPLE_PROMPT}"')
    log(f"done in {time.perf_counter() - t0:.0f} s")
    return result


def _short(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"
