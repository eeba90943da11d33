"""``lora-finetune`` / ``python -m lora.finetune``: fine-tune Phi-3 with LoRA on a chat dataset."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from ..data import DataError
from .config import load_configs
from .distributed import TORCHRUN_STOP, lost_rank_message
from .pipeline import finetune
from .trainer import TrainingError, TrainingInterrupted, sigterm_as_interrupt

EPILOG = """\
examples:
  lora-finetune                                   # the embedded demo: no download, ~3 minutes on 2 CPU cores
  lora-finetune --model Phi-3-mini-4k-instruct --data chat.jsonl --output out --config recipe.json
  lora-finetune ... --resume                      # continue from the newest complete checkpoint in --output
  lora-finetune ... --merge                       # also write out/merged, a full checkpoint directory
  torchrun --standalone --nproc_per_node=2 -m lora.finetune ...         # data-parallel
  torchrun --standalone --nproc_per_node=8 -m lora.finetune ... --fsdp  # base sharded (FSDP2)
  lora-finetune ... --quantize nf4                # QLoRA: the frozen base in 4 bits (docs/qlora.md)

The config file (JSON or TOML) has two sections, as in the Phi-3 fine-tuning recipe:
  {"training_config": {"learning_rate": 5e-6, "per_device_train_batch_size": 4, ...},
   "peft_config": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear", ...}}
Flags given on the command line override the file. See docs/finetune.md and docs/scaling.md.
"""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="lora-finetune",
        description="Fine-tune a Phi-3 checkpoint with LoRA on a chat-instruct dataset. "
        "With neither --model nor --data, runs the embedded demo.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--model",
        metavar="DIR",
        help="Phi-3 checkpoint directory: config.json, model.safetensors "
        "(or shards + index), tokenizer.json, tokenizer_config.json with the chat template",
    )
    ap.add_argument(
        "--data",
        metavar="FILE",
        nargs="+",
        help="training data: files, directories, globs or DIR:SPLIT "
        "(e.g. ultrachat_200k:train_sft); JSONL/JSON/parquet/save_to_disk; 'messages' conversations "
        "(roles system/user/assistant), ShareGPT 'conversations' or alpaca records",
    )
    ap.add_argument(
        "--eval-data",
        metavar="FILE",
        nargs="+",
        help="held-out data, same forms; default: eval_fraction of --data",
    )
    ap.add_argument(
        "--output",
        metavar="DIR",
        help="where checkpoints, metrics.jsonl, the adapter (and merged model) "
        "go; overrides training_config.output_dir",
    )
    ap.add_argument(
        "--config",
        metavar="FILE",
        help="JSON or TOML file with 'training_config' and 'peft_config' sections",
    )
    ap.add_argument(
        "--max-steps",
        type=int,
        metavar="N",
        help="optimizer steps to train (overrides num_train_epochs)",
    )
    ap.add_argument("--learning-rate", type=float, metavar="LR", help="peak learning rate")
    ap.add_argument("--seed", type=int, help="seed for data order, initialisation and dropout")
    ap.add_argument(
        "--bf16",
        action="store_true",
        default=None,
        help="base weights in bfloat16 (LoRA stays fp32)",
    )
    ap.add_argument(
        "--quantize",
        choices=["nf4"],
        help="store the frozen base's Linear weights in 4 bits "
        "(NF4, as QLoRA), quantised as the checkpoint is read; see docs/qlora.md",
    )
    ap.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest complete checkpoint in the "
        "output directory (same losses as an uninterrupted run)",
    )
    ap.add_argument(
        "--allow-resume-changes",
        action="store_true",
        help="let --resume go on with "
        "settings or data that differ from the checkpoint's (by default refused, "
        "naming each difference); the run is then no longer bit-identical to an "
        "uninterrupted one",
    )
    ap.add_argument(
        "--overwrite",
        action="store_true",
        default=None,
        help="start over in an output directory "
        "that holds an earlier run, removing its checkpoints (overwrite_output_dir)",
    )
    ap.add_argument(
        "--merge",
        action="store_true",
        help="after training, also write a merged full model "
        "(OUTPUT/merged) that Phi3ForCausalLM.from_pretrained and transformers read",
    )
    ap.add_argument(
        "--on-error",
        choices=["raise", "skip"],
        help="malformed records: stop before training and list "
        "them (raise, the default) or leave them out and report how many (skip)",
    )
    ap.add_argument(
        "--device",
        metavar="DEV",
        help="auto (CUDA when there is a GPU, the default), cpu, cuda or cuda:N; "
        "under torchrun cuda means each rank's cuda:LOCAL_RANK",
    )
    ap.add_argument(
        "--fsdp",
        action="store_true",
        default=None,
        help="under torchrun: shard the frozen base across the processes with FSDP2, "
        "one unit per decoder layer (training_config fsdp); see docs/scaling.md",
    )
    ap.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar, even on a "
        "terminal (elsewhere only the step lines are printed anyway)",
    )
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with sigterm_as_interrupt():  # SIGTERM while loading is an interrupt too, not a silent death
        return _main(args)


def _main(args) -> int:
    training: dict = {}
    try:
        training, peft = load_configs(args.config) if args.config else ({}, {})
        overrides = {
            "output_dir": args.output,
            "max_steps": args.max_steps,
            "learning_rate": args.learning_rate,
            "seed": args.seed,
            "bf16": args.bf16,
            "on_error": args.on_error,
            "overwrite_output_dir": args.overwrite,
            "device": args.device,
            "fsdp": args.fsdp,
            "quantize": args.quantize,
        }
        training.update({k: v for k, v in overrides.items() if v is not None})
        if args.model is None and args.data is None:
            from ..demo.run import run_demo

            if "WORLD_SIZE" in os.environ:
                raise ValueError(
                    "the embedded demo runs in one process: run `lora-finetune` "
                    "without torchrun, or give --model and --data to train under it"
                )
            run_demo(
                training, peft, resume=args.resume, merge=args.merge, progress=not args.no_progress
            )
            return 0
        if args.model is None or args.data is None:
            raise ValueError(
                "--model and --data go together (give neither to run the embedded demo)"
            )
        if not peft:
            raise ValueError(
                "no peft_config: give --config FILE with a 'peft_config' section "
                "(r, lora_alpha, lora_dropout, target_modules, ...)"
            )
        data = args.data[0] if len(args.data) == 1 else args.data
        eval_data = (
            args.eval_data[0] if args.eval_data and len(args.eval_data) == 1 else args.eval_data
        )
        result = finetune(
            args.model,
            data,
            training,
            peft,
            eval_file=eval_data,
            resume=args.resume,
            merge=args.merge,
            progress=not args.no_progress,
            allow_resume_changes=args.allow_resume_changes,
        )
        if _rank() == 0:
            print(f"adapter: {result.adapter_dir}")
            if result.merged_dir:
                print(f"merged model: {result.merged_dir}")
        return 0
    except DataError as e:
        print(f"{_prog()}: the data has problems; nothing was trained:\n{e}", file=sys.stderr)
        return 2
    except TrainingInterrupted as e:
        print(
            f"{_prog()}: {e}{TORCHRUN_STOP if 'WORLD_SIZE' in os.environ else ''}", file=sys.stderr
        )
        return 130
    except KeyboardInterrupt:
        print(
            "lora-finetune: interrupted before training started; nothing was written",
            file=sys.stderr,
        )
        return 130
    except (ValueError, TypeError, FileNotFoundError, ImportError, TrainingError) as e:
        print(f"{_prog()}: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        lost = lost_rank_message(e, training.get("output_dir", "lora-output"))
        if lost is None:
            raise
        print(f"{_prog()}: {lost}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"{_prog()}: {_os_error(e)}", file=sys.stderr)
        return 2


def _os_error(e: OSError) -> str:
    where = f"{e.filename}: " if e.filename else ""
    return f"{where}{e.strerror or e}"


def _rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def _prog() -> str:
    # Under torchrun every rank prints its own errors: say which one this is.
    return f"lora-finetune (rank {_rank()})" if "WORLD_SIZE" in os.environ else "lora-finetune"


if __name__ == "__main__":
    sys.exit(main())
