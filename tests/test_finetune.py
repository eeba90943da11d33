"""The fine-tuning job: configs, schedules, the loop, checkpoints, resume, merge, the command line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from killing import train_until_killed
from tiny import TINY_PEFT, chat_records, tiny_training

import lora
from lora.data import Tokenizer, prepare_chat_data
from lora.finetune import Trainer, TrainingConfig, TrainingError, finetune, lr_factor
from lora.finetune.__main__ import main as cli_main
from lora.finetune.state import list_checkpoints, write_checkpoint
from lora.models import Phi3ForCausalLM

PEFT = TINY_PEFT


def training(tmp_path, **over) -> dict:
    return tiny_training(tmp_path, **over)


def losses(output_dir) -> dict[int, float]:
    rows = [
        json.loads(line)
        for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()
        if line
    ]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


# --- configs ---------------------------------------------------------------------------------------
RECIPE = {  # sample_finetune.py from the Phi-3 model card, as written (plus what it passes to its trainer)
    "bf16": True,
    "do_eval": False,
    "learning_rate": 5.0e-06,
    "log_level": "info",
    "logging_steps": 20,
    "logging_strategy": "steps",
    "lr_scheduler_type": "cosine",
    "num_train_epochs": 1,
    "max_steps": -1,
    "output_dir": "./checkpoint_dir",
    "overwrite_output_dir": True,
    "per_device_eval_batch_size": 4,
    "per_device_train_batch_size": 4,
    "remove_unused_columns": True,
    "save_steps": 100,
    "save_total_limit": 1,
    "seed": 0,
    "gradient_checkpointing": True,
    "gradient_checkpointing_kwargs": {"use_reentrant": False},
    "gradient_accumulation_steps": 1,
    "warmup_ratio": 0.2,
    "max_seq_length": 2048,
    "packing": True,
}


def test_the_phi3_recipe_training_config_is_accepted_as_written():
    cfg = TrainingConfig.from_dict(RECIPE)
    assert (
        cfg.bf16
        and cfg.packing
        and cfg.lr_scheduler_type == "cosine"
        and cfg.max_seq_length == 2048
    )
    lora.LoRAConfig(**PEFT)


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"learning_rat": 1e-4}, r"unknown key 'learning_rat'"),
        ({"logging_strategy": "best"}, r"logging_strategy='best': expected one of 'no', 'steps'"),
        ({"save_strategy": "best"}, r"save_strategy='best'"),
        ({"eval_strategy": "sometimes"}, r"eval_strategy='sometimes'"),
        (
            {"evaluation_strategy": "no", "eval_strategy": "steps"},
            r"evaluation_strategy is another",
        ),
        ({"eval_steps": 1.5}, r"eval_steps=1.5: expected a positive int, or a float in \(0, 1\)"),
        (
            {"optim": "adamw_bnb_8bit"},
            r"optim='adamw_bnb_8bit'.*closest supported is 'adamw_torch'",
        ),
        ({"optim": "paged_adamw_8bit"}, r"optim='paged_adamw_8bit'.*closest supported is 'adamw_"),
        ({"optim": "lion_32bit"}, r"Lion.*closest supported is 'adamw_torch'"),
        ({"optim": "adamw_nonsense"}, r"optim='adamw_nonsense': unknown; supported: adamw_torch"),
        ({"fp16": True, "bf16": True}, r"choose one"),
        ({"log_level": "loud"}, r"log_level='loud'"),
        ({"report_to": "wandb"}, r"report_to='wandb'.*'none', 'tensorboard' or 'all'"),
        ({"report_to": ["tensorboard", "mlflow"]}, r"'mlflow' is not supported"),
        ({"push_to_hub": True}, r"push_to_hub=True: not supported \(nothing is uploaded"),
        ({"torch_compile": True}, r"torch_compile=True: not supported"),
        ({"lr_scheduler_type": "polynomial"}, r"lr_scheduler_type='polynomial'"),
        ({"per_device_train_batch_size": 0}, r"per_device_train_batch_size=0"),
        ({"warmup_ratio": 1.5}, r"warmup_ratio=1.5"),
        ({"gradient_checkpointing_kwargs": {"use_reentrant": "yes"}}, r"use_reentrant"),
        (
            {"gradient_checkpointing_kwargs": {"preserve_rng_state": False}},
            r"at most 'use_reentrant'",
        ),
        (
            {"gradient_checkpointing_layers": -1},
            r"gradient_checkpointing_layers=-1: expected how many decoder layers",
        ),
    ],
)
def test_bad_training_keys_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        TrainingConfig.from_dict(bad)


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant", "constant_with_warmup"])
def test_schedules_match_transformers(kind):
    transformers = pytest.importorskip("transformers")
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    sched = transformers.get_scheduler(kind, opt, num_warmup_steps=5, num_training_steps=30)
    for step in range(30):
        assert math.isclose(
            opt.param_groups[0]["lr"],
            lr_factor(step, 30, 5 if kind != "constant" else 0, kind),
            abs_tol=1e-9,
        ), (kind, step)
        opt.step()
        sched.step()


# --- the loop ----------------------------------------------------------------------------------------
def test_finetune_trains_logs_checkpoints_and_rotates(ckpt, data_file, tmp_path):
    cfg = training(tmp_path, max_steps=12, save_total_limit=2, eval_steps=6, learning_rate=2e-2)
    result = finetune(ckpt, data_file, cfg, PEFT, progress=False, log=lambda s: None)
    rows = [
        json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    ]
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 13))
    assert all(
        {"step", "loss", "learning_rate", "tokens_per_second"} <= r.keys() for r in train_rows
    )
    assert [r["step"] for r in eval_rows] == [6, 12] and all(r["eval_loss"] > 0 for r in eval_rows)
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]
    assert [s for s, _ in list_checkpoints(tmp_path / "out")] == [8, 12]  # save_total_limit=2
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    assert json.loads((result.adapter_dir / "adapter_config.json").read_text())["r"] == 4
    assert result.steps == 12 and result.eval_loss == eval_rows[-1]["eval_loss"]


def _trainer(ckpt, data_file, cfg_dict, log=lambda s: None, **kw):
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
    dtype = torch.bfloat16 if cfg.bf16 else None
    model = Phi3ForCausalLM.from_pretrained(ckpt, dtype=dtype, quantize=cfg.quantize)
    lora.inject(model, lora.LoRAConfig(**PEFT))
    return Trainer(model, tok, data, cfg, log=log, progress=False, **kw)


@pytest.mark.parametrize("fsdp", [True, False])
def test_the_heap_is_trimmed_after_every_step_under_fsdp_on_cpu_only(
    ckpt, data_file, tmp_path, monkeypatch, fsdp
):
    # FSDP's gathers fragment glibc's heap step after step on CPU (docs/scaling.md); a trim after
    # each optimizer step keeps a rank's memory flat. One-process and DDP runs are left alone.
    from lora.finetune import distributed

    calls = []
    monkeypatch.setattr(distributed, "trim_heap", lambda: calls.append(1) or True)
    cfg = training(tmp_path, max_steps=3, save_steps=100)
    _trainer(ckpt, data_file, cfg, dist=distributed.DistContext(fsdp=fsdp)).train()
    assert len(calls) == (3 if fsdp else 0)


@pytest.mark.parametrize(
    "checkpointing, bf16, trims", [(True, True, True), (False, False, True), (False, True, False)]
)
def test_a_run_trims_the_heap_between_layers(
    ckpt, data_file, tmp_path, monkeypatch, checkpointing, bf16, trims
):
    # lora-finetune's own path (from_pretrained, inject, Trainer) gets the model's trims between
    # decoder layers (lora.models.phi3, release_heap_every): under gradient checkpointing, or
    # without it in fp32, at least before the first layer's forward, the loss and the last
    # layer's backward in each of its 2 training steps; in bf16 without checkpointing none.
    import lora.models.phi3 as phi3

    calls = []
    monkeypatch.setattr(phi3, "trim_heap", lambda: calls.append(1) or True)
    cfg = training(
        tmp_path,
        max_steps=2,
        save_steps=100,
        gradient_checkpointing=checkpointing,
        bf16=bf16,
        do_eval=False,
    )
    _trainer(ckpt, data_file, cfg).train()
    assert len(calls) >= 2 * 3 if trims else calls == []


# A 4-bit base under activation checkpointing: the recomputation keeps the decoded weights for
# the backward that follows (lora.quant.keep_decoded_on_recompute); resuming stays exact.
QLORA_CHECKPOINTED = {"quantize": "nf4", "gradient_checkpointing": True}


@pytest.mark.parametrize("extra", [{}, QLORA_CHECKPOINTED], ids=["plain", "nf4-checkpointed"])
def test_resume_gives_bit_identical_losses_dropout_included(ckpt, data_file, tmp_path, extra):
    full = training(
        tmp_path / "a",
        max_steps=10,
        lr_scheduler_type="cosine",
        warmup_ratio=0.2,
        save_steps=4,
        gradient_accumulation_steps=2,
        **extra,
    )
    _trainer(ckpt, data_file, full).train()
    want = losses(tmp_path / "a" / "out")

    cut = training(
        tmp_path / "b",
        max_steps=10,
        lr_scheduler_type="cosine",
        warmup_ratio=0.2,
        save_steps=4,
        gradient_accumulation_steps=2,
        **extra,
    )
    # the process dies during step 7 (checkpoint 4 is the newest)
    train_until_killed(_trainer(ckpt, data_file, cut), 6 * 2)
    assert [s for s, _ in list_checkpoints(tmp_path / "b" / "out")] == [4]
    # a fresh process: a new model, new optimizer, the RNG somewhere else
    torch.manual_seed(12345)
    _trainer(ckpt, data_file, cut).train(resume=True)
    got = losses(tmp_path / "b" / "out")
    assert got.keys() == want.keys()
    for step in want:
        assert got[step] == want[step], step  # bit-identical


def _record_micro_batches(trainer) -> list[tuple[int, int]]:
    seen: list[tuple[int, int]] = []  # (optimizer step, micro-batch index) in the order used
    original = trainer._micro_batch

    def recording(index):
        seen.append((trainer.step, index))
        return original(index)

    trainer._micro_batch = recording
    return seen


def test_an_epoch_uses_every_micro_batch_when_accumulation_does_not_divide_them(
    ckpt, data_file, tmp_path
):
    # 32 training sequences in micro-batches of 5: 7 an epoch (the last of 2). Accumulating 2 per
    # step, an epoch is 4 steps, the last of one micro-batch, as in transformers' Trainer (which
    # counts ceil(7 / 2) update steps an epoch); no step takes micro-batches of two epochs.
    cfg = training(
        tmp_path,
        per_device_train_batch_size=5,
        gradient_accumulation_steps=2,
        max_steps=-1,
        num_train_epochs=2,
        save_strategy="no",
    )
    trainer = _trainer(ckpt, data_file, cfg)
    seen = _record_micro_batches(trainer)
    result = trainer.train()
    assert (trainer.micro_per_epoch, trainer.steps_per_epoch, result.steps) == (7, 4, 8)
    per_step: dict[int, list[int]] = {}
    for step, index in seen:
        per_step.setdefault(step, []).append(index)
    assert list(per_step.values()) == [[0, 1], [2, 3], [4, 5], [6], [7, 8], [9, 10], [11, 12], [13]]
    rows = [r for r in result.metrics if "loss" in r]
    assert [r["epoch"] for r in rows] == [k / 7 for k in (2, 4, 6, 7, 9, 11, 13, 14)]
    # train_loss is the mean step loss of the run (transformers' TrainOutput.training_loss)
    assert result.train_loss == pytest.approx(sum(r["loss"] for r in rows) / len(rows), rel=1e-12)


@pytest.mark.parametrize("batch, refused", [(5, True), (4, False)])
def test_a_checkpoint_from_before_the_epoch_layout_resumes_only_where_it_is_unchanged(
    ckpt, data_file, tmp_path, batch, refused
):
    # Before steps_per_epoch was recorded an epoch had floor(M / G) steps; with 7 micro-batches
    # and G = 2 that data order differs from here on, with 8 it is the same.
    cfg = training(
        tmp_path,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=2,
        max_steps=6,
        save_steps=2,
    )
    train_until_killed(_trainer(ckpt, data_file, cfg), 3 * 2)
    state_file = tmp_path / "out" / "checkpoint-2" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state.pop("steps_per_epoch") == 4
    state_file.write_text(json.dumps(state))
    resumed = _trainer(ckpt, data_file, cfg)
    if refused:
        with pytest.raises(lora.finetune.ResumeMismatch, match=r"epochs held 3 optimizer steps"):
            resumed.train(resume=True)
    else:
        assert resumed.train(resume=True).steps == 6


def test_resuming_with_more_steps_continues_the_same_run(ckpt, data_file, tmp_path):
    _trainer(ckpt, data_file, training(tmp_path / "long", max_steps=9, save_steps=100)).train()
    want = losses(tmp_path / "long" / "out")
    _trainer(ckpt, data_file, training(tmp_path / "short", max_steps=5, save_steps=100)).train()
    _trainer(ckpt, data_file, training(tmp_path / "short", max_steps=9, save_steps=100)).train(
        resume=True
    )
    got = losses(tmp_path / "short" / "out")
    assert got == want


def test_bias_all_with_a_saved_biased_head_trains_saves_resumes_and_loads(
    ckpt, data_file, tmp_path
):
    # Phi-3 has no bias anywhere: give it a head with one, so bias="all" and modules_to_save meet.
    peft = lora.LoRAConfig(**{**PEFT, "bias": "all", "modules_to_save": ["lm_head"]})

    def biased_head_model():
        model = Phi3ForCausalLM.from_pretrained(ckpt)
        head = torch.nn.Linear(*model.lm_head.weight.shape[::-1], bias=True)
        with torch.no_grad():
            head.weight.copy_(model.lm_head.weight)
            head.bias.copy_(torch.linspace(-0.5, 0.5, head.out_features))
        model.lm_head = head
        return model

    def trainer(root):
        cfg = TrainingConfig.from_dict(training(root, max_steps=4, save_steps=2))
        torch.manual_seed(cfg.seed)
        tok = Tokenizer.from_pretrained(ckpt)
        data = prepare_chat_data(data_file, tok, cfg.max_seq_length, eval_fraction=0.2, seed=0)
        return Trainer(
            biased_head_model(), tok, data, cfg, peft=peft, log=lambda s: None, progress=False
        )

    original = biased_head_model().lm_head.bias.detach().clone()
    whole = trainer(tmp_path / "a")
    result = whole.train()
    head = whole.model.lm_head
    assert not torch.equal(head.bias, original)  # the copy's bias trained
    torch.testing.assert_close(head.original_module.bias, original, rtol=0, atol=0)  # untouched
    # resume from the step-2 checkpoint in a fresh process: the same losses, the same adapter
    cut = trainer(tmp_path / "b")
    cut.train(resume=str(tmp_path / "a" / "out" / "checkpoint-2"))
    assert losses(tmp_path / "b" / "out") == {
        s: v for s, v in losses(tmp_path / "a" / "out").items() if s > 2
    }
    torch.testing.assert_close(cut.model.lm_head.bias, head.bias, rtol=0, atol=0)
    ids = torch.tensor([[1, 5, 9, 12, 40]])
    loaded = lora.load_adapter(biased_head_model(), result.adapter_dir).eval()
    whole.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, whole.model(ids).logits, rtol=0, atol=0)


def test_targets_inside_a_saved_layer_train_save_and_load(ckpt, data_file, tmp_path):
    # A decoder layer trained in full (its o_proj too, no LoRA there), LoRA on the other o_proj:
    # the run's adapter loads back (load_adapter refused it: the adapter was lost).
    peft = lora.LoRAConfig(
        **{**PEFT, "target_modules": ["o_proj"], "modules_to_save": ["layers.0"]}
    )
    cfg = TrainingConfig.from_dict(training(tmp_path, max_steps=2, save_steps=2))
    torch.manual_seed(cfg.seed)
    tok = Tokenizer.from_pretrained(ckpt)
    data = prepare_chat_data(data_file, tok, cfg.max_seq_length, eval_fraction=0.2, seed=0)
    model = Phi3ForCausalLM.from_pretrained(ckpt)
    with pytest.warns(lora.SavedTargetWarning, match=r"'model\.layers\.0' \(holds"):
        trainer = Trainer(model, tok, data, cfg, peft=peft, log=lambda s: None, progress=False)
    result = trainer.train()
    layer = trainer.model.model.layers[0]
    assert not torch.equal(  # the copy trained in full, the original stayed
        layer.modules_to_save["default"].self_attn.o_proj.weight,
        layer.original_module.self_attn.o_proj.weight,
    )
    ids = torch.tensor([[1, 5, 9, 12, 40]])
    loaded = lora.load_adapter(Phi3ForCausalLM.from_pretrained(ckpt), result.adapter_dir).eval()
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, trainer.model(ids).logits, rtol=0, atol=0)


def test_a_peft_config_adapting_only_saved_modules_fails_before_training(ckpt, data_file, tmp_path):
    peft = {**PEFT, "target_modules": ["lm_head"], "modules_to_save": ["lm_head"]}
    with pytest.raises(lora.InjectionError, match=r"nothing left to adapt"):
        finetune(ckpt, data_file, training(tmp_path), peft, progress=False, log=lambda s: None)
    assert not list_checkpoints(tmp_path / "out")


def test_a_fresh_run_never_deletes_an_earlier_one_unless_told(ckpt, data_file, tmp_path):
    _trainer(ckpt, data_file, training(tmp_path, max_steps=2)).train()
    with pytest.raises(
        ValueError, match=r"holds an earlier run \(adapter, checkpoint-2, metrics.jsonl\).*--resume"
    ):
        _trainer(ckpt, data_file, training(tmp_path, max_steps=3)).train()
    assert [s for s, _ in list_checkpoints(tmp_path / "out")] == [2]
    _trainer(ckpt, data_file, training(tmp_path, max_steps=3, overwrite_output_dir=True)).train()
    assert [s for s, _ in list_checkpoints(tmp_path / "out")] == [3]
    assert sorted(losses(tmp_path / "out")) == [1, 2, 3]


def test_a_fresh_run_into_an_earlier_one_is_refused_before_the_data_is_read(
    ckpt, data_file, tmp_path
):
    # The refusal costs no work: a missing data file is not even looked at (before, the data and
    # the model were prepared first, then the trainer refused).
    quiet = dict(progress=False, log=lambda s: None)
    finetune(ckpt, data_file, training(tmp_path, max_steps=1), PEFT, **quiet)
    with pytest.raises(ValueError, match=r"holds an earlier run \(adapter, checkpoint-1"):
        finetune(ckpt, tmp_path / "absent.jsonl", training(tmp_path, max_steps=2), PEFT, **quiet)
    with pytest.raises(FileNotFoundError):  # resuming expects the earlier run: the data is read
        finetune(ckpt, tmp_path / "absent.jsonl", training(tmp_path), PEFT, resume=True, **quiet)
    assert [s for s, _ in list_checkpoints(tmp_path / "out")] == [1]


def test_a_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(ckpt, data_file, tmp_path):
    trainer = _trainer(ckpt, data_file, training(tmp_path, max_steps=8, save_steps=2))
    forward = trainer._forward

    def poisoned(batch, num_items=None):
        out = forward(batch, num_items)
        if trainer.step == 4:
            out.loss = out.loss * float("nan")
        return out

    trainer._forward = poisoned
    with pytest.raises(TrainingError, match=r"loss is nan at step 5.*checkpoint-4"):
        trainer.train()
    assert [s for s, _ in list_checkpoints(tmp_path / "out")] == [2, 4]


def _fake_adapter(directory):
    (directory / "adapter_model.safetensors").write_bytes(b"x")
    (directory / "adapter_config.json").write_text("{}")


def test_a_checkpoint_interrupted_while_written_leaves_nothing_half_written(tmp_path):
    param = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([param])
    write_checkpoint(tmp_path, 1, opt, _fake_adapter, {})

    def crash(directory):
        (directory / "adapter_model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(tmp_path, 2, opt, crash, {})
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1]
    assert not any(p.name.startswith(".checkpoint") for p in tmp_path.iterdir())


def test_gradient_checkpointing_and_packing_train_like_the_plain_loop(ckpt, data_file, tmp_path):
    plain = _trainer(ckpt, data_file, training(tmp_path / "p", max_steps=3, packing=True))
    assert plain.data.packed and plain.collate(plain.data.train[:2])["attention_mask"].dim() == 4
    plain.train()
    checkpointed = _trainer(
        ckpt,
        data_file,
        training(tmp_path / "c", max_steps=3, packing=True, gradient_checkpointing=True),
    )
    assert checkpointed.model.gradient_checkpointing
    checkpointed.train()
    some = _trainer(  # only the first of the two decoder layers checkpointed
        ckpt,
        data_file,
        training(
            tmp_path / "s",
            max_steps=3,
            packing=True,
            gradient_checkpointing=True,
            gradient_checkpointing_layers=1,
        ),
    )
    assert some.model.gradient_checkpointing and some.model.model.checkpoint_layers == 1
    some.train()
    want = losses(tmp_path / "p" / "out")
    assert want.keys() == {1, 2, 3}
    for run in ("c", "s"):
        got = losses(tmp_path / run / "out")
        assert got.keys() == want.keys()
        for step in want:  # recomputation replays dropout's RNG, so the runs agree
            assert math.isclose(got[step], want[step], rel_tol=1e-5), (run, step)


def test_bf16_base_trains_fp32_adapters(ckpt, data_file, tmp_path):
    trainer = _trainer(ckpt, data_file, training(tmp_path, max_steps=2, bf16=True))
    trainer.train()
    layer = trainer.model.model.layers[0].self_attn.qkv_proj
    assert layer.weight.dtype == torch.bfloat16 and layer.lora_A.dtype == torch.float32
    assert torch.count_nonzero(layer.lora_B) > 0


def test_merge_writes_a_checkpoint_that_reloads_with_the_same_logits(ckpt, data_file, tmp_path):
    trainer = _trainer(ckpt, data_file, training(tmp_path, max_steps=3))
    trainer.train()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    trainer.model.eval()
    with torch.no_grad():
        want = trainer.model(ids).logits
    merged_dir = trainer.merge_and_save()
    again = Phi3ForCausalLM.from_pretrained(merged_dir)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, want, rtol=1e-5, atol=1e-5)
    assert (merged_dir / "tokenizer.json").is_file()
    transformers = pytest.importorskip("transformers")
    theirs = transformers.Phi3ForCausalLM.from_pretrained(
        merged_dir, attn_implementation="sdpa"
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, want, rtol=1e-5, atol=1e-5)


# --- the command line -------------------------------------------------------------------------------
def test_cli_runs_from_a_toml_config_and_flags_override_it(ckpt, data_file, tmp_path, capsys):
    config = tmp_path / "recipe.toml"
    config.write_text(
        "[training_config]\nlearning_rate = 0.01\nmax_steps = 50\nper_device_train_batch_size = 4\n"
        "logging_steps = 1\nsave_steps = 2\nmax_seq_length = 64\n"
        '[peft_config]\nr = 2\nlora_alpha = 4\ntarget_modules = ["qkv_proj[q,v]", "o_proj"]\n'
    )
    out = tmp_path / "run"
    code = cli_main(
        [
            "--model",
            str(ckpt),
            "--data",
            str(data_file),
            "--config",
            str(config),
            "--output",
            str(out),
            "--max-steps",
            "3",
            "--no-progress",
            "--merge",
        ]
    )
    assert code == 0
    assert max(losses(out)) == 3
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] in (2, 4) and (out / "merged" / "config.json").is_file()


def test_cli_reports_malformed_records_with_file_and_line(ckpt, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    good = "".join(json.dumps(r) + "\n" for r in chat_records(30))
    bad.write_text(
        json.dumps(chat_records(1)[0])
        + "\n{not json\n"
        + json.dumps({"messages": [{"role": "robot", "content": "hi"}]})
        + "\n"
        + good
    )
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"training_config": {"max_steps": 1}, "peft_config": PEFT}))
    code = cli_main(
        [
            "--model",
            str(ckpt),
            "--data",
            str(bad),
            "--config",
            str(config),
            "--output",
            str(tmp_path / "o"),
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert f"{bad}:2" in err and f"{bad}:3" in err and "robot" in err
    assert not (tmp_path / "o" / "metrics.jsonl").exists()


def test_cli_errors_are_one_clear_line(tmp_path, capsys):
    assert cli_main(["--model", str(tmp_path)]) == 2
    assert "--model and --data go together" in capsys.readouterr().err
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"training_config": {"learning_rat": 1}, "peft_config": PEFT}))
    assert cli_main(["--config", str(config)]) == 2
    assert "unknown key 'learning_rat'" in capsys.readouterr().err
    assert cli_main(["--config", str(tmp_path / "missing.toml")]) == 2
    assert "missing.toml: no such file" in capsys.readouterr().err


def test_cli_help_explains_each_flag(capsys):
    with pytest.raises(SystemExit):
        cli_main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--model", "--data", "--output", "--config", "--max-steps", "--resume", "--merge"):
        assert flag in text
