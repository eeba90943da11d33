"""Fine-tuning Phi-3 with LoRA on chat data: the training loop, checkpoints, the command lines.

    from lora.finetune import finetune
    finetune("Phi-3-mini-4k-instruct", "chat.jsonl", training_config, peft_config)

This package sees everything (models, data, layers, adapters); nothing below imports it.
"""

from .config import IGNORED_KEYS, TrainingConfig, load_configs
from .generate import generate_replies, load_chat_model
from .lock import OutputDirBusy
from .metrics import plot_metrics, read_metrics
from .pipeline import build_trainer, finetune
from .resume import ResumeMismatch
from .trainer import Trainer, TrainingError, TrainingInterrupted, TrainResult, lr_factor

__all__ = [
    "TrainingConfig",
    "IGNORED_KEYS",
    "Trainer",
    "TrainResult",
    "TrainingError",
    "TrainingInterrupted",
    "ResumeMismatch",
    "OutputDirBusy",
    "finetune",
    "build_trainer",
    "read_metrics",
    "plot_metrics",
    "load_configs",
    "lr_factor",
    "generate_replies",
    "load_chat_model",
]
