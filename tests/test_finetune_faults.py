"""Nothing lost, nothing silent: faults injected into the fine-tuning job at exact points.

Each test gives the input or the fault, the exact outcome (error class and the words that name the
problem) and, for faults, that nothing written earlier is lost. A kill is simulated by raising from
:func:`lora.finetune.state.crash_point` (or a hooked method) without any cleanup running, which
leaves the disk as ``kill -9`` at that point would; no test relies on timing.
"""

from __future__ import annotations

import errno
import json
import os
import signal
from pathlib import Path

import pytest
import torch
from killing import Killed, train_until_killed
from tiny import TINY_PEFT, chat_records, tiny_training, write_jsonl

import lora
from lora.data import Tokenizer, prepare_chat_data
from lora.finetune import Trainer, TrainingConfig, TrainingError
from lora.finetune import state as state_mod
from lora.finetune.__main__ import main as cli_main
from lora.finetune.lock import OutputDirBusy, OutputDirLock
from lora.finetune.resume import ResumeMismatch
from lora.finetune.state import list_checkpoints, recover_checkpoints
from lora.finetune.trainer import TrainingInterrupted
from lora.models import Phi3ForCausalLM

PEFT = TINY_PEFT
TIMING = ("tokens_per_second", "elapsed", "memory_mb")  # measured, so never equal run to run


def training(root, **over) -> dict:
    return tiny_training(root, **over)


def make_trainer(ckpt, data_file, cfg_dict, peft=None, lines=None) -> Trainer:
    cfg = TrainingConfig.from_dict(cfg_dict)
    torch.manual_seed(cfg.seed)
    tok = Tokenizer.from_pretrained(ckpt)
    data = prepare_chat_data(
        data_file,
        tok,
        cfg.max_seq_length,
        eval_fraction=cfg.eval_fraction,
        seed=cfg.seed,
        packing=cfg.packing,
    )
    model = Phi3ForCausalLM.from_pretrained(ckpt)
    lora.inject(model, lora.LoRAConfig(**(peft or PEFT)))
    trainer = Trainer(
        model,
        tok,
        data,
        cfg,
        log=(lines.append if lines is not None else lambda s: None),
        progress=False,
    )
    trainer.train_files = data_file
    return trainer


def rows(output_dir) -> list[dict]:
    text = (Path(output_dir) / "metrics.jsonl").read_text()
    assert text.endswith("\n")
    return [
        {k: v for k, v in json.loads(line).items() if k not in TIMING} for line in text.splitlines()
    ]


def leftovers(output_dir) -> list[str]:
    return sorted(p.name for p in Path(output_dir).iterdir() if p.name.startswith(".checkpoint"))


def kill_at(monkeypatch, point: str, before=None):
    def crash(name):
        if name == point:
            if before is not None:
                before()
            raise Killed(name)

    monkeypatch.setattr(state_mod, "crash_point", crash)


# --- the checkpoint swap and the rotation ---------------------------------------------------------
@pytest.mark.parametrize("point", ["swap:old-moved", "swap:new-placed"])
def test_a_kill_inside_the_checkpoint_swap_is_recovered_at_the_next_start(
    ckpt, data_file, tmp_path, monkeypatch, point
):
    cfg = training(tmp_path, max_steps=4, save_steps=2, save_total_limit=1)
    make_trainer(ckpt, data_file, cfg).train()
    out = tmp_path / "out"
    want = rows(out)
    adapter_before = (out / "checkpoint-4" / "adapter_model.safetensors").read_bytes()
    # a resumed, finished run saves step 4 again: checkpoint-4 is swapped for a new copy
    kill_at(monkeypatch, point)
    with pytest.raises(Killed):
        make_trainer(ckpt, data_file, cfg).train(resume=True)
    monkeypatch.undo()
    if point == "swap:old-moved":
        assert not (out / "checkpoint-4").exists() and ".checkpoint-4.old" in leftovers(out)
    lines: list[str] = []
    result = make_trainer(ckpt, data_file, cfg, lines=lines).train(resume=True)
    assert result.steps == 4
    assert not any("step 0" in line for line in lines)
    assert any(
        line.startswith("resumed from") and "checkpoint-4 at step 4" in line for line in lines
    )
    if point == "swap:old-moved":
        assert any("recovered checkpoint-4 from .checkpoint-4." in line for line in lines)
    assert [s for s, _ in list_checkpoints(out)] == [4] and leftovers(out) == []
    assert (out / "checkpoint-4" / "adapter_model.safetensors").read_bytes() == adapter_before
    assert rows(out) == want


@pytest.mark.slow
def test_a_real_process_killed_between_the_renames_loses_nothing(ckpt, data_file, tmp_path):
    import subprocess
    import sys

    cfg = tmp_path / "c.json"
    train = training(tmp_path, max_steps=4, save_steps=2, save_total_limit=1)
    cfg.write_text(json.dumps({"training_config": train, "peft_config": PEFT}))
    args = [
        sys.executable,
        "-m",
        "lora.finetune",
        "--model",
        str(ckpt),
        "--data",
        str(data_file),
        "--config",
        str(cfg),
        "--no-progress",
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    assert subprocess.run(args, env=env, capture_output=True, timeout=300).returncode == 0
    out = tmp_path / "out"
    want = rows(out)
    killed = subprocess.run(
        args + ["--resume"],
        env={**env, "LORA_CRASH_AT": "swap:old-moved"},
        capture_output=True,
        timeout=300,
    )
    assert killed.returncode == 137 and not (out / "checkpoint-4").exists()
    done = subprocess.run(args + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "recovered checkpoint-4 from .checkpoint-4." in done.stdout
    assert (
        [s for s, _ in list_checkpoints(out)] == [4] and leftovers(out) == [] and rows(out) == want
    )


def test_only_a_complete_tmp_left_by_a_kill_becomes_the_checkpoint(
    ckpt, data_file, tmp_path, monkeypatch
):
    cfg = training(tmp_path, max_steps=4, save_steps=2, save_total_limit=1)
    make_trainer(ckpt, data_file, cfg).train()
    out = tmp_path / "out"
    kill_at(monkeypatch, "swap:old-moved")
    with pytest.raises(Killed):
        make_trainer(ckpt, data_file, cfg).train(resume=True)
    # the worst case the issue saw: the old copy gone as well, only the new .tmp is left
    import shutil

    shutil.rmtree(out / ".checkpoint-4.old")
    assert [p for p in leftovers(out) if p.endswith(".tmp")]
    actions = recover_checkpoints(out)
    assert len(actions) == 1 and "recovered checkpoint-4 from .checkpoint-4." in actions[0]
    assert [s for s, _ in list_checkpoints(out)] == [4] and leftovers(out) == []


def test_incomplete_temporaries_are_swept_and_never_promoted(tmp_path):
    (tmp_path / ".checkpoint-3.abc.tmp").mkdir()
    (tmp_path / ".checkpoint-3.abc.tmp" / "adapter_model.safetensors").write_bytes(b"half")
    (tmp_path / ".metrics.jsonl.x1.tmp").write_text("{")
    assert recover_checkpoints(tmp_path) == []
    assert list(tmp_path.iterdir()) == []


def test_a_kill_inside_rotation_never_leaves_a_half_deleted_checkpoint_under_its_name(
    ckpt, data_file, tmp_path, monkeypatch
):
    cfg = training(tmp_path, max_steps=6, save_steps=2, save_total_limit=1)
    out = tmp_path / "out"

    def half_delete():  # rmtree got as far as the weights
        (out / ".checkpoint-2.deleting" / "adapter_model.safetensors").unlink()

    kill_at(monkeypatch, "rotate:renamed", before=half_delete)
    with pytest.raises(Killed):
        make_trainer(ckpt, data_file, cfg).train()
    monkeypatch.undo()
    assert [s for s, _ in list_checkpoints(out)] == [4]
    assert not (out / "checkpoint-2").exists()  # renamed away first: no incomplete checkpoint-2
    make_trainer(ckpt, data_file, cfg).train(resume=True)
    assert [s for s, _ in list_checkpoints(out)] == [6] and leftovers(out) == []
    make_trainer(ckpt, data_file, training(tmp_path / "ref", max_steps=6, save_steps=2)).train()
    assert rows(out) == rows(tmp_path / "ref" / "out")


def test_a_checkpoint_missing_a_file_does_not_count(tmp_path):
    param = torch.nn.Parameter(torch.ones(2))

    def adapter(d):
        (d / "adapter_model.safetensors").write_bytes(b"x")
        (d / "adapter_config.json").write_text("{}")

    state_mod.write_checkpoint(tmp_path, 11, torch.optim.AdamW([param]), adapter, {})
    state_mod.write_checkpoint(tmp_path, 12, torch.optim.AdamW([param]), adapter, {})
    (tmp_path / "checkpoint-12" / "adapter_model.safetensors").unlink()
    assert [s for s, _ in list_checkpoints(tmp_path)] == [11]
    assert (
        "checkpoint-12 is incomplete (missing adapter_model.safetensors)"
        in recover_checkpoints(tmp_path)[0]
    )


# --- one run per output directory -----------------------------------------------------------------
def test_a_second_run_on_a_locked_output_dir_refuses_naming_the_holder(ckpt, data_file, tmp_path):
    make_trainer(ckpt, data_file, training(tmp_path, max_steps=2)).train()
    out = tmp_path / "out"

    def snapshot():
        return {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != ".lora-run.lock"}

    before = snapshot()
    with OutputDirLock.acquire(out):  # another run, live
        for over in ({}, {"overwrite_output_dir": True}):
            with pytest.raises(
                OutputDirBusy,
                match=rf"output_dir '{out}' is in use by another run "
                rf"\(pid {os.getpid()}\)",
            ):
                make_trainer(ckpt, data_file, training(tmp_path, max_steps=3, **over)).train()
        with pytest.raises(OutputDirBusy, match=r"in use by another run"):
            make_trainer(ckpt, data_file, training(tmp_path, max_steps=3)).train(resume=True)
    assert snapshot() == before  # nothing touched
    make_trainer(ckpt, data_file, training(tmp_path, max_steps=3)).train(resume=True)  # free again
    assert [s for s, _ in list_checkpoints(out)] == [2, 3]


def _cli_without_inputs(tmp_path, output, *extra: str) -> int:
    """lora-finetune on a model and data that do not exist, writing to ``output``: whatever it
    refuses about the output has to come before it looks for them."""
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"training_config": {}, "peft_config": PEFT}))
    args = ["--model", str(tmp_path / "no-model"), "--data", str(tmp_path / "no.jsonl")]
    return cli_main([*args, "--output", str(output), "--config", str(cfg), *extra])


def test_the_cli_refuses_a_locked_output_dir_before_loading_anything(tmp_path, capsys):
    out = tmp_path / "out"
    with OutputDirLock.acquire(out):
        rc = _cli_without_inputs(tmp_path, out, "--no-progress")
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and f"(pid {os.getpid()})" in err


# --- --resume with nothing to resume --------------------------------------------------------------
def test_resume_with_no_checkpoint_is_an_error_saying_what_it_found(ckpt, data_file, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"nothing to resume in .*the directory is empty"):
        make_trainer(ckpt, data_file, training(tmp_path)).train(resume=True)
    (out / "adapter").mkdir()
    (out / "adapter" / "adapter_model.safetensors").write_bytes(b"mine")
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
    with pytest.raises(ValueError, match=r"no complete checkpoint-N, only adapter/, metrics.jsonl"):
        make_trainer(ckpt, data_file, training(tmp_path)).train(resume=True)
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == b"mine"
    assert (out / "metrics.jsonl").read_text() == '{"step": 1, "loss": 3.0}\n'


# --- metrics.jsonl --------------------------------------------------------------------------------
def test_a_metrics_row_cut_by_a_kill_is_dropped_and_never_appended_to(ckpt, data_file, tmp_path):
    make_trainer(ckpt, data_file, training(tmp_path / "ref")).train()
    cfg = training(tmp_path)
    train_until_killed(make_trainer(ckpt, data_file, cfg), 6)
    out = tmp_path / "out"
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 2.1')  # killed while writing a row
    make_trainer(ckpt, data_file, cfg).train(resume=True)
    assert rows(out) == rows(tmp_path / "ref" / "out")


def test_a_metrics_file_cut_at_the_checkpoints_own_step_resumes(ckpt, data_file, tmp_path):
    cfg = training(tmp_path, max_steps=4)
    make_trainer(ckpt, data_file, cfg).train()
    out = tmp_path / "out"
    want = rows(out)
    path = out / "metrics.jsonl"
    path.write_text(path.read_text() + '{"step": 4, "eval')
    make_trainer(ckpt, data_file, cfg).train(resume=True)
    assert rows(out) == want


def test_a_damaged_metrics_row_inside_the_file_is_named(ckpt, data_file, tmp_path):
    cfg = training(tmp_path, max_steps=4)
    make_trainer(ckpt, data_file, cfg).train()
    path = tmp_path / "out" / "metrics.jsonl"
    lines = path.read_text().splitlines()
    lines[1] = "garbage"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a metrics row \('garbage'\)"):
        make_trainer(ckpt, data_file, cfg).train(resume=True)


# --- metrics after kill-and-resume equal the uninterrupted run's ----------------------------------
def test_a_logging_window_spanning_the_kill_averages_the_same_steps(ckpt, data_file, tmp_path):
    ref = training(tmp_path / "ref", max_steps=9, logging_steps=3, save_steps=4)
    make_trainer(ckpt, data_file, ref).train()
    cfg = training(tmp_path, max_steps=9, logging_steps=3, save_steps=4)
    # dies during step 6: checkpoint-4 holds step 4 of the window 4..6
    train_until_killed(make_trainer(ckpt, data_file, cfg), 5)
    make_trainer(ckpt, data_file, cfg).train(resume=True)
    got, want = rows(tmp_path / "out"), rows(tmp_path / "ref" / "out")
    assert [r["step"] for r in got] == [3, 6, 9, 9]
    assert got == want


def test_a_kill_between_the_final_checkpoint_and_the_adapter_logs_no_second_eval_row(
    ckpt, data_file, tmp_path
):
    cfg = training(tmp_path, max_steps=4)
    make_trainer(ckpt, data_file, training(tmp_path / "ref", max_steps=4)).train()
    trainer = make_trainer(ckpt, data_file, cfg)
    write = trainer._write_adapter

    def dying(directory):
        if directory.name == "adapter":
            raise Killed()
        write(directory)

    trainer._write_adapter = dying
    with pytest.raises(Killed):
        trainer.train()
    result = make_trainer(ckpt, data_file, cfg).train(resume=True)
    got = rows(tmp_path / "out")
    assert [r["step"] for r in got if "eval_loss" in r] == [4]
    assert got == rows(tmp_path / "ref" / "out")
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()


# --- --resume refuses what it cannot honour -------------------------------------------------------
@pytest.mark.parametrize(
    "change,words",
    [
        ({"learning_rate": 2e-2}, "training_config learning_rate was 0.01, now 0.02"),
        ({"seed": 1}, "training_config seed was 0, now 1"),
        (
            {"per_device_train_batch_size": 2},
            "training_config per_device_train_batch_size was 4, now 2",
        ),
        (
            {"gradient_accumulation_steps": 2},
            "training_config gradient_accumulation_steps was 1, now 2",
        ),
        (
            {"max_steps": 3},
            "the run would end at step 3 (max_steps/num_train_epochs), before the "
            "checkpoint's step 4",
        ),
    ],
)
def test_resume_refuses_a_changed_setting_naming_old_and_new(
    ckpt, data_file, tmp_path, change, words
):
    make_trainer(ckpt, data_file, training(tmp_path, max_steps=4)).train()
    before = rows(tmp_path / "out")
    with pytest.raises(ResumeMismatch) as info:
        make_trainer(ckpt, data_file, training(tmp_path, **{"max_steps": 6, **change})).train(
            resume=True
        )
    assert words in str(info.value) and "--allow-resume-changes" in str(info.value)
    assert rows(tmp_path / "out") == before and [
        s for s, _ in list_checkpoints(tmp_path / "out")
    ] == [4]


def test_resume_refuses_other_data_and_another_peft_config(ckpt, data_file, tmp_path):
    make_trainer(ckpt, data_file, training(tmp_path, max_steps=4)).train()
    other = write_jsonl(tmp_path / "other.jsonl", chat_records(40, seed=7))
    with pytest.raises(
        ResumeMismatch,
        match=r"the training data differs: was .*chat.jsonl \(\d+ bytes, "
        r"sha256 [0-9a-f]{12}\).*now .*other.jsonl",
    ):
        make_trainer(ckpt, other, training(tmp_path, max_steps=6)).train(resume=True)
    with pytest.raises(ResumeMismatch, match=r"peft_config r was 4, now 8"):
        make_trainer(ckpt, data_file, training(tmp_path, max_steps=6), peft={**PEFT, "r": 8}).train(
            resume=True
        )


def test_resume_allows_logging_eval_save_and_a_longer_run(ckpt, data_file, tmp_path):
    make_trainer(ckpt, data_file, training(tmp_path, max_steps=4)).train()
    cfg = training(
        tmp_path,
        max_steps=6,
        logging_steps=2,
        save_steps=3,
        eval_steps=5,
        save_total_limit=2,
        per_device_eval_batch_size=2,
    )
    assert make_trainer(ckpt, data_file, cfg).train(resume=True).steps == 6


def test_allow_resume_changes_goes_on_with_a_warning(ckpt, data_file, tmp_path):
    make_trainer(ckpt, data_file, training(tmp_path, max_steps=4)).train()
    lines: list[str] = []
    trainer = make_trainer(
        ckpt, data_file, training(tmp_path, max_steps=5, learning_rate=2e-2), lines=lines
    )
    trainer.allow_resume_changes = True
    assert trainer.train(resume=True).steps == 5
    assert any(
        line.startswith("warning: resuming")
        and "learning_rate was 0.01, now 0.02" in line
        and "no longer bit-identical" in line
        for line in lines
    )


# --- a diverged or stalled run stops --------------------------------------------------------------
def test_a_gradient_norm_stuck_at_zero_stops_the_run(ckpt, data_file, tmp_path):
    trainer = make_trainer(
        ckpt, data_file, training(tmp_path, max_steps=20, logging_steps=3, save_steps=2)
    )
    forward = trainer._forward

    def collapsed(batch, num_items=None):
        out = forward(batch, num_items)
        if trainer.step >= 4:
            out.loss = out.loss * 0.0 + 5.0  # a constant loss: no gradient reaches the adapter
        return out

    trainer._forward = collapsed
    with pytest.raises(
        TrainingError,
        match=r"gradient norm has been exactly 0 for 3 consecutive steps "
        r"\(loss 5\).* at step 7: stopping.*checkpoint-6",
    ):
        trainer.train()


def test_a_loss_jumping_far_above_its_running_mean_stops_the_run(ckpt, data_file, tmp_path):
    trainer = make_trainer(ckpt, data_file, training(tmp_path, max_steps=20, save_steps=4))
    forward = trainer._forward

    def exploding(batch, num_items=None):
        out = forward(batch, num_items)
        if trainer.step == 9:
            out.loss = out.loss * 100.0
        return out

    trainer._forward = exploding
    with pytest.raises(
        TrainingError,
        match=r"the loss jumped to .*x its running mean .* at step 10: "
        r"stopping.*checkpoint-8",
    ):
        trainer.train()
    assert [s for s, _ in list_checkpoints(tmp_path / "out")] == [4, 8]


def test_a_huge_learning_rate_does_not_finish_silently(ckpt, data_file, tmp_path):
    trainer = make_trainer(
        ckpt,
        data_file,
        training(tmp_path, max_steps=30, learning_rate=1e6, logging_steps=5, save_steps=100),
    )
    with pytest.raises(TrainingError, match=r"stopping"):
        trainer.train()


# --- interrupts and a full disk -------------------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_sigint_and_sigterm_name_the_step_and_the_last_checkpoint(ckpt, data_file, tmp_path, sig):
    # Python's own SIGINT handler, as in a terminal: a shell starts background jobs with SIGINT
    # ignored, and SIGINT reaches the trainer only as Python's KeyboardInterrupt.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _interrupt_at_step_5(ckpt, data_file, tmp_path, sig)
    finally:
        signal.signal(signal.SIGINT, previous)


def _interrupt_at_step_5(ckpt, data_file, tmp_path, sig):
    trainer = make_trainer(ckpt, data_file, training(tmp_path, max_steps=8, save_steps=2))
    original = trainer._micro_batch

    def signalled(index):
        if index == 5:
            os.kill(os.getpid(), sig)
        return original(index)

    trainer._micro_batch = signalled
    with pytest.raises(
        TrainingInterrupted,
        match=r"^interrupted at step 5; last complete checkpoint "
        r".*checkpoint-4; continue with --resume$",
    ):
        trainer.train()
    assert [s for s, _ in list_checkpoints(tmp_path / "out")] == [2, 4]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or sig == signal.SIGINT


def test_the_cli_exits_130_on_sigterm_with_one_line(ckpt, data_file, tmp_path, capsys, monkeypatch):
    original = Trainer._micro_batch

    def signalled(self, index):
        if index == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, index)

    monkeypatch.setattr(Trainer, "_micro_batch", signalled)
    cfg = tmp_path / "c.json"
    cfg.write_text(
        json.dumps({"training_config": training(tmp_path, save_steps=2), "peft_config": PEFT})
    )
    rc = cli_main(
        ["--model", str(ckpt), "--data", str(data_file), "--config", str(cfg), "--no-progress"]
    )
    err = capsys.readouterr().err
    assert rc == 130
    assert (
        err.strip()
        .splitlines()[-1]
        .endswith(
            f"interrupted at step 3; last complete checkpoint {tmp_path / 'out' / 'checkpoint-2'}; "
            "continue with --resume"
        )
    )


def test_a_full_disk_names_the_last_complete_checkpoint_and_keeps_it(
    ckpt, data_file, tmp_path, monkeypatch
):
    trainer = make_trainer(ckpt, data_file, training(tmp_path, max_steps=8, save_steps=2))
    save = state_mod.atomic_save_safetensors

    def filling(tensors, path, *a, **k):
        if trainer.step >= 4:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return save(tensors, path, *a, **k)

    monkeypatch.setattr(state_mod, "atomic_save_safetensors", filling)
    with pytest.raises(
        TrainingError,
        match=r"no space left on device writing to .* at step 4; the last "
        r"complete checkpoint is .*checkpoint-2;",
    ):
        trainer.train()
    out = tmp_path / "out"
    assert [s for s, _ in list_checkpoints(out)] == [2] and leftovers(out) == []


# --- the output directory is checked before any work ----------------------------------------------
def test_an_output_that_is_a_file_is_refused_before_the_model_loads(tmp_path, capsys):
    out = tmp_path / "out"
    out.write_text("not a dir")
    rc = _cli_without_inputs(tmp_path, out)
    err = capsys.readouterr().err
    assert (
        rc == 2 and err == f"lora-finetune: --output '{out}' is an existing file, not a directory\n"
    )


def test_an_output_that_cannot_be_created_is_refused(tmp_path, capsys):
    parent = tmp_path / "file"
    parent.write_text("x")
    rc = _cli_without_inputs(tmp_path, parent / "out")
    err = capsys.readouterr().err
    assert rc == 2 and "cannot create the directory" in err and err.count("\n") == 1


def test_the_demo_refuses_a_locked_output_dir_before_loading_anything(tmp_path, monkeypatch):
    from lora.demo import run
    from lora.finetune import pipeline

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(pipeline, "_build", no_loading)
    out = tmp_path / "out"
    with OutputDirLock.acquire(out):
        with pytest.raises(OutputDirBusy, match=rf"\(pid {os.getpid()}\)"):
            run.run_demo({"output_dir": str(out)}, log=lambda s: None)
