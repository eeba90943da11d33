"""Every Phi-3 recipe's training settings, as written: the strategies, the optimizers, precision,
how much a run prints, tensorboard, model-only checkpoints; and the progress bar's place."""

from __future__ import annotations

import dataclasses
import io
import json
import math
from pathlib import Path

import pytest
import torch
from tiny import TINY_PEFT, tiny_training

import lora
from lora.data import Tokenizer, prepare_chat_data
from lora.finetune import IGNORED_KEYS, Trainer, TrainingConfig
from lora.finetune.__main__ import main as cli_main
from lora.finetune.config import ALIASES, OPTIMIZERS, UNSUPPORTED_OPTIMIZERS
from lora.finetune.state import list_checkpoints
from lora.models import Phi3ForCausalLM

ROOT = Path(__file__).resolve().parent.parent
RECIPES = json.loads((Path(__file__).parent / "fixtures" / "phi3_sample_finetune.json").read_text())
PEFT = TINY_PEFT


def config(tmp_path, **over) -> dict:
    return tiny_training(tmp_path, **over)


def trainer(ckpt, data_file, cfg: dict, lines: list | None = None, **kwargs) -> Trainer:
    cfg = TrainingConfig.from_dict(cfg)
    torch.manual_seed(cfg.seed)
    tok = Tokenizer.from_pretrained(ckpt)
    eval_fraction = 0.0 if cfg.skips_evaluation else cfg.eval_fraction
    data = prepare_chat_data(
        data_file,
        tok,
        cfg.max_seq_length,
        eval_fraction=eval_fraction,
        seed=cfg.seed,
        packing=cfg.packing,
    )
    model = Phi3ForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16 if cfg.bf16 else None)
    lora.inject(model, lora.LoRAConfig(**PEFT))
    log = (lambda s: None) if lines is None else lines.append
    return Trainer(model, tok, data, cfg, log=log, **{"progress": False, **kwargs})


def rows(output_dir) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def steps_of(output_dir, key: str) -> list[int]:
    return [r["step"] for r in rows(output_dir) if key in r]


# --- the recipe file, as written ------------------------------------------------------------------
def _run_recipe(tmp_path, which: str, conversations: int | None) -> Path:
    from lora.demo import base_model_dir, train_file

    data = train_file()
    if conversations is not None:  # fewer conversations: fewer tokens per step, the same settings
        lines = Path(train_file()).read_text().splitlines()[:conversations]
        data = tmp_path / "chat.jsonl"
        data.write_text("\n".join(lines) + "\n")
    cfg = tmp_path / "recipe.json"
    cfg.write_text(
        json.dumps(
            {
                "training_config": {**RECIPES[which], **RECIPES["sft_trainer_kwargs"]},
                "peft_config": RECIPES["peft_config"],
            }
        )
    )
    out = tmp_path / "out"
    code = cli_main(
        [
            "--model",
            str(base_model_dir()),
            "--data",
            str(data),
            "--config",
            str(cfg),
            "--output",
            str(out),
            "--max-steps",
            "3",
        ]
    )
    assert code == 0
    return out


def test_the_model_card_recipe_runs_as_written_on_the_demo_model(tmp_path, capsys):
    out = _run_recipe(tmp_path, "training_config", conversations=16)
    printed = capsys.readouterr()
    assert steps_of(out, "loss") == [3]  # logging_steps 20 > 3 steps: the last step's row only
    assert steps_of(out, "eval_loss") == []  # do_eval: false
    assert "do_eval=false: no evaluation" in printed.out
    assert [s for s, _ in list_checkpoints(out)] == [3]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert "\r" not in printed.err  # not a terminal: no progress bar frames


@pytest.mark.slow
@pytest.mark.parametrize("which", ["training_config", "args_first_version"])
def test_both_recipe_versions_run_on_the_whole_demo_data(tmp_path, which):
    out = _run_recipe(tmp_path, which, conversations=None)
    assert steps_of(out, "loss") == [3] and steps_of(out, "eval_loss") == []


def test_the_recipe_files_dictionaries_are_the_shared_ones():
    shared = Path("/work/shared/recipes/phi3_sample_finetune.json")
    if not shared.is_file():
        pytest.skip("no shared recipe file on this machine")
    assert json.loads(shared.read_text()) == RECIPES


# --- strategies -----------------------------------------------------------------------------------
def test_save_strategy_no_writes_no_checkpoint_but_the_adapter(ckpt, data_file, tmp_path):
    result = trainer(
        ckpt, data_file, config(tmp_path, save_strategy="no", max_steps=5, save_steps=2)
    ).train()
    assert list_checkpoints(tmp_path / "out") == []
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()


def test_epoch_strategies_save_and_evaluate_at_each_epoch_end(ckpt, data_file, tmp_path):
    t = trainer(
        ckpt,
        data_file,
        config(
            tmp_path,
            save_strategy="epoch",
            eval_strategy="epoch",
            max_steps=-1,
            num_train_epochs=3,
            logging_strategy="epoch",
        ),
    )
    per_epoch = t.steps_per_epoch  # 32 training conversations / 4 = 8
    assert per_epoch == 8 and t.total_steps == 24
    t.train()
    assert [s for s, _ in list_checkpoints(tmp_path / "out")] == [8, 16, 24]
    assert steps_of(tmp_path / "out", "eval_loss") == [8, 16, 24]
    assert steps_of(tmp_path / "out", "loss") == [8, 16, 24]


def test_evaluation_strategy_is_the_old_name_of_eval_strategy(ckpt, data_file, tmp_path):
    t = trainer(
        ckpt, data_file, config(tmp_path, evaluation_strategy="steps", eval_steps=3, max_steps=7)
    )
    assert t.cfg.eval_strategy == "steps"
    t.train()
    assert steps_of(tmp_path / "out", "eval_loss") == [3, 6, 7]


def test_eval_steps_as_a_fraction_and_eval_strategy_steps_defaults_to_logging_steps(
    ckpt, data_file, tmp_path
):
    trainer(
        ckpt, data_file, config(tmp_path / "a", eval_strategy="steps", eval_steps=0.25, max_steps=8)
    ).train()
    assert steps_of(tmp_path / "a" / "out", "eval_loss") == [2, 4, 6, 8]  # ceil(0.25 * 8) = 2
    trainer(
        ckpt, data_file, config(tmp_path / "b", eval_strategy="steps", logging_steps=3, max_steps=7)
    ).train()
    assert steps_of(tmp_path / "b" / "out", "eval_loss") == [3, 6, 7]


def test_logging_and_save_steps_as_fractions(ckpt, data_file, tmp_path):
    trainer(
        ckpt, data_file, config(tmp_path, logging_steps=0.5, save_steps=0.3, max_steps=6)
    ).train()
    assert steps_of(tmp_path / "out", "loss") == [3, 6]
    assert [s for s, _ in list_checkpoints(tmp_path / "out")] == [2, 4, 6]


def test_eval_strategy_no_evaluates_only_at_the_end(ckpt, data_file, tmp_path):
    trainer(
        ckpt, data_file, config(tmp_path, eval_strategy="no", eval_steps=2, max_steps=6)
    ).train()
    assert steps_of(tmp_path / "out", "eval_loss") == [6]


def test_do_eval_false_skips_evaluation_and_says_so(ckpt, data_file, tmp_path):
    lines: list[str] = []
    t = trainer(ckpt, data_file, config(tmp_path, do_eval=False, eval_steps=2, max_steps=4), lines)
    assert len(t.data.eval) == 0  # nothing held out for an evaluation that never runs
    result = t.train()
    assert result.eval_loss is None and steps_of(tmp_path / "out", "eval_loss") == []
    assert "do_eval=false: no evaluation" in lines


def test_do_eval_false_with_eval_strategy_steps_evaluates_and_says_why(ckpt, data_file, tmp_path):
    lines: list[str] = []
    t = trainer(
        ckpt,
        data_file,
        config(tmp_path, do_eval=False, eval_strategy="steps", eval_steps=2, max_steps=4),
        lines,
    )
    t.train()
    assert steps_of(tmp_path / "out", "eval_loss") == [2, 4]
    assert any("eval_strategy='steps' turns it on" in line for line in lines)


def test_do_eval_true_without_eval_data_is_an_error(ckpt, data_file, tmp_path):
    with pytest.raises(ValueError, match="do_eval=true, but there is no eval data"):
        trainer(ckpt, data_file, config(tmp_path, do_eval=True, eval_fraction=0.0))


def test_logging_first_step_and_eval_on_start(ckpt, data_file, tmp_path):
    trainer(
        ckpt,
        data_file,
        config(tmp_path, logging_steps=4, logging_first_step=True, max_steps=8, eval_on_start=True),
    ).train()
    assert steps_of(tmp_path / "out", "loss") == [1, 4, 8]
    assert steps_of(tmp_path / "out", "eval_loss") == [0, 8]


def test_warmup_steps_below_one_is_a_ratio(ckpt, data_file, tmp_path):
    assert (
        trainer(ckpt, data_file, config(tmp_path, warmup_steps=0.25, max_steps=8)).warmup_steps == 2
    )
    assert trainer(ckpt, data_file, config(tmp_path, warmup_steps=3, max_steps=8)).warmup_steps == 3


# --- optimizers -----------------------------------------------------------------------------------
TORCH_CLASS = {
    "adamw_torch": "AdamW",
    "adamw_torch_fused": "AdamW",
    "adamw_hf": "AdamW",
    "paged_adamw_32bit": "AdamW",
    "sgd": "SGD",
    "adafactor": "Adafactor",
    "adagrad": "Adagrad",
    "rmsprop": "RMSprop",
}


@pytest.mark.parametrize("optim", list(OPTIMIZERS))
def test_each_supported_optim_runs_the_torch_optimizer_it_names(ckpt, data_file, tmp_path, optim):
    t = trainer(ckpt, data_file, config(tmp_path, optim=optim, max_steps=2, learning_rate=1e-2))
    assert type(t.optimizer).__name__ == TORCH_CLASS[optim]
    if optim == "adamw_torch_fused":
        assert t.optimizer.defaults["fused"]
    before = [p.detach().clone() for p in t.params]
    t.train()
    assert any(not torch.equal(a, p) for a, p in zip(before, t.params))  # it stepped
    assert all(math.isfinite(r["loss"]) for r in rows(tmp_path / "out") if "loss" in r)


def test_every_refused_optim_names_a_supported_one():
    for name, closest in UNSUPPORTED_OPTIMIZERS.items():
        assert closest in OPTIMIZERS, name
        with pytest.raises(ValueError, match=rf"optim='{name}'.*closest supported is '{closest}'"):
            TrainingConfig(optim=name)


# --- precision and checkpointing ------------------------------------------------------------------
def test_fp16_on_cpu_is_a_clear_error_recommending_bf16(ckpt, data_file, tmp_path):
    with pytest.raises(ValueError, match=r"fp16=true needs a CUDA GPU.*bf16=true"):
        trainer(ckpt, data_file, config(tmp_path, fp16=True, use_cpu=True))
    assert (
        cli_main(
            [
                "--model",
                str(ckpt),
                "--data",
                str(data_file),
                "--output",
                str(tmp_path / "o"),
                "--config",
                str(_write_config(tmp_path, {"fp16": True, "use_cpu": True})),
            ]
        )
        == 2
    )


def _write_config(tmp_path, training: dict) -> Path:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"training_config": training, "peft_config": PEFT}))
    return path


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 training needs CUDA")
def test_fp16_trains_on_cuda_with_a_loss_scaler_and_resumes_it(ckpt, data_file, tmp_path):
    from lora.finetune import finetune

    result = finetune(
        ckpt,
        data_file,
        config(tmp_path, fp16=True, max_steps=4, save_steps=2),
        PEFT,
        progress=False,
        log=lambda s: None,
    )
    assert all(math.isfinite(r["loss"]) for r in result.metrics if "loss" in r)
    state = json.loads((tmp_path / "out" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["grad_scaler"]["scale"] > 0


def test_gradient_checkpointing_either_kind_trains_bitwise_like_the_plain_loop(
    ckpt, data_file, tmp_path
):
    runs = {}
    for kind in ("plain", "reentrant", "non_reentrant"):
        over = (
            {}
            if kind == "plain"
            else {
                "gradient_checkpointing": True,
                "gradient_checkpointing_kwargs": {"use_reentrant": kind == "reentrant"},
            }
        )
        t = trainer(ckpt, data_file, config(tmp_path / kind, max_steps=3, **over))
        assert t.model.model.checkpoint_use_reentrant == (kind == "reentrant")
        embedded: list[torch.Tensor] = []
        t.model.model.embed_tokens.register_forward_hook(lambda m, a, y, e=embedded: e.append(y))
        t.train()
        # the frozen embedding's output needs no gradient in any kind (the reentrant one included)
        needs_grad = [e.requires_grad for e in embedded]
        assert needs_grad and not any(needs_grad), kind
        losses = {r["step"]: r["loss"] for r in rows(tmp_path / kind / "out") if "loss" in r}
        trained = {n: p.detach().clone() for n, p in t.model.named_parameters() if p.requires_grad}
        runs[kind] = losses, trained
    want_losses, want = runs["plain"]
    assert sorted(want_losses) == [1, 2, 3] and want
    for kind in ("reentrant", "non_reentrant"):  # recomputation replays dropout's RNG
        losses, trained = runs[kind]
        assert losses == want_losses, kind
        assert trained.keys() == want.keys()
        assert all(torch.equal(trained[n], want[n]) for n in want), kind


def test_activation_checkpointing_is_transformers_5s_name(tmp_path):
    cfg = TrainingConfig.from_dict(
        {
            "activation_checkpointing": True,
            "activation_checkpointing_kwargs": {"use_reentrant": True},
        }
    )
    assert cfg.gradient_checkpointing and cfg.use_reentrant


def test_save_only_model_checkpoints_cannot_be_resumed(ckpt, data_file, tmp_path):
    trainer(
        ckpt, data_file, config(tmp_path, save_only_model=True, max_steps=4, save_steps=2)
    ).train()
    for _, path in list_checkpoints(tmp_path / "out"):
        assert (path / "adapter_model.safetensors").is_file()
        assert not (path / "training_state.safetensors").exists()
    again = trainer(ckpt, data_file, config(tmp_path, save_only_model=True, max_steps=6))
    with pytest.raises(ValueError, match=r"checkpoint-4 was written with save_only_model=true"):
        again.train(resume=True)


def test_resume_from_checkpoint_key_resumes(ckpt, data_file, tmp_path):
    trainer(ckpt, data_file, config(tmp_path, max_steps=4, save_steps=2)).train()
    lines: list[str] = []
    t = trainer(
        ckpt,
        data_file,
        config(
            tmp_path, max_steps=6, resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2")
        ),
        lines,
    )
    t.train()
    assert any("resumed from" in line and "checkpoint-2" in line for line in lines)
    assert steps_of(tmp_path / "out", "loss") == [1, 2, 3, 4, 5, 6]


# --- what a run prints ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "level, setup, metrics",
    [
        ("passive", True, True),
        ("info", True, True),
        ("warning", False, True),
        ("error", False, False),
    ],
)
def test_log_level_sets_how_much_a_run_prints(ckpt, data_file, tmp_path, level, setup, metrics):
    lines: list[str] = []
    trainer(
        ckpt, data_file, config(tmp_path, log_level=level, max_steps=2, eval_steps=1), lines
    ).train()
    assert any(line.startswith("trainable params") for line in lines) == setup
    assert any(line.startswith("saved ") for line in lines) == setup
    assert any(line.startswith("step ") and "| loss" in line for line in lines) == metrics
    assert any("eval loss" in line for line in lines) == metrics
    assert len(rows(tmp_path / "out")) > 0  # metrics.jsonl whatever the level


def test_report_to_tensorboard_writes_event_files(ckpt, data_file, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer(
        ckpt, data_file, config(tmp_path, report_to="tensorboard", max_steps=3, eval_steps=2)
    ).train()
    runs = tmp_path / "out" / "runs"
    assert list(runs.glob("events.out.tfevents.*"))
    events = EventAccumulator(str(runs))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]
    assert [e.step for e in events.Scalars("eval/loss")] == [2, 3]


def test_report_to_tensorboard_without_the_package_says_what_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "tensorboard" else real(name, *a),
    )
    with pytest.raises(
        ValueError, match=r"report_to='tensorboard' needs the tensorboard package: pip install"
    ):
        TrainingConfig(report_to="tensorboard")
    assert TrainingConfig(report_to="all").report_targets() == []  # "all": whatever is installed
    assert TrainingConfig(report_to="none").report_targets() == []


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("terminal", [False, True])
def test_the_progress_bar_is_drawn_only_on_a_terminal(
    ckpt, data_file, tmp_path, monkeypatch, terminal
):
    stderr = _Terminal() if terminal else io.StringIO()
    monkeypatch.setattr("sys.stderr", stderr)
    lines: list[str] = []
    trainer(ckpt, data_file, config(tmp_path, max_steps=3), lines, progress=True).train()
    assert ("\r" in stderr.getvalue()) == terminal
    assert sum("| loss" in line for line in lines) == 3  # the step lines either way


def test_disable_tqdm_turns_the_bar_off_on_a_terminal(ckpt, data_file, tmp_path, monkeypatch):
    stderr = _Terminal()
    monkeypatch.setattr("sys.stderr", stderr)
    trainer(
        ckpt, data_file, config(tmp_path, max_steps=2, disable_tqdm=True), progress=True
    ).train()
    assert "\r" not in stderr.getvalue()


# --- every TrainingArguments key ------------------------------------------------------------------
def test_every_training_arguments_key_is_known_and_documented():
    transformers = pytest.importorskip("transformers")
    ours = {f.name for f in dataclasses.fields(TrainingConfig)}
    docs = (ROOT / "docs" / "finetune.md").read_text()
    for f in dataclasses.fields(transformers.TrainingArguments):
        assert f.name in ours or f.name in IGNORED_KEYS or f.name in ALIASES, f.name
        assert f"`{f.name}`" in docs, f.name
    for name in ours | set(IGNORED_KEYS) | set(ALIASES):
        assert f"`{name}`" in docs, name


def test_ignored_keys_accept_transformers_defaults():
    transformers = pytest.importorskip("transformers")
    for f in dataclasses.fields(transformers.TrainingArguments):
        if f.name in IGNORED_KEYS and IGNORED_KEYS[f.name] is not None:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            TrainingConfig.from_dict({f.name: default})  # the default value never asks for anything


def test_the_loss_scaler_path_trains_like_the_plain_loop_and_is_checkpointed(
    ckpt, data_file, tmp_path
):
    """fp16's loop (scale, unscale, clip, step, update), run on CPU with torch's CPU GradScaler: a
    power-of-two scale changes no fp32 gradient, so the losses equal the plain run's."""
    plain = trainer(ckpt, data_file, config(tmp_path / "p", max_steps=4, save_steps=2))
    plain.train()
    scaled = trainer(ckpt, data_file, config(tmp_path / "s", max_steps=4, save_steps=2))
    scaled.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaled.train()
    want, got = rows(tmp_path / "p" / "out"), rows(tmp_path / "s" / "out")
    for a, b in zip(want, got):
        if "loss" in a:
            assert math.isclose(a["loss"], b["loss"], rel_tol=1e-6), a["step"]
    state = json.loads((tmp_path / "s" / "out" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["grad_scaler"]["scale"] == 2.0**10
    again = trainer(ckpt, data_file, config(tmp_path / "s", max_steps=6, save_steps=2))
    again.scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    again.resume()
    assert again.scaler.get_scale() == 2.0**10  # restored from the checkpoint
