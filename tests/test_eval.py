"""lora-eval: loss and perplexity on assistant tokens, base and base + adapter, exact match."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lora.finetune.evaluate import EvalRow, evaluate, main, markdown_table


@pytest.fixture(scope="module")
def demo():
    from lora.demo import base_model_dir, ensure_assets, eval_file

    ensure_assets(log=lambda *_: None)
    return str(base_model_dir()), str(eval_file())


def test_base_loss_equals_the_trainers_eval_loss(demo, tmp_path):
    from lora import LoRAConfig, inject
    from lora.data import Tokenizer, prepare_chat_data
    from lora.finetune import TrainingConfig
    from lora.finetune.trainer import Trainer
    from lora.models import Phi3ForCausalLM

    model_dir, data = demo
    tokenizer = Tokenizer.from_pretrained(model_dir)
    prepared = prepare_chat_data(data, tokenizer, 128, eval_file=data)
    model = inject(
        Phi3ForCausalLM.from_pretrained(model_dir), LoRAConfig(r=4, target_modules=["qkv_proj"])
    )
    trainer = Trainer(
        model,
        tokenizer,
        prepared,
        TrainingConfig(
            output_dir=str(tmp_path / "run"), max_seq_length=128, per_device_eval_batch_size=8
        ),
        progress=False,
    )
    expected = trainer.evaluate()
    report = evaluate(model_dir, data, max_seq_length=128, batch_size=8, log=lambda *_: None)
    (base,) = report["rows"]
    # bf16 through different modules (a zero LoRA over qkv_proj, the plain model): rounding noise,
    # 2e-8 with torch's kernels, 3e-7 through lora._matmul's fp32 route (loss 5.91; bf16 eps 8e-3)
    assert base["loss"] == pytest.approx(expected, rel=1e-5)
    assert base["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    assert (
        report["conversations"] == 200
        and report["assistant_tokens"] == prepared.eval_stats.labelled_tokens
    )


def _adapter(model_dir, directory):
    from lora import LoRAConfig, inject
    from lora.adapters import save_adapter
    from lora.models import Phi3ForCausalLM

    model = inject(
        Phi3ForCausalLM.from_pretrained(model_dir), LoRAConfig(r=4, target_modules=["o_proj"])
    )
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    save_adapter(model, directory)
    return str(directory)


def test_cli_side_by_side_with_exact_match_and_reports(demo, tmp_path, capsys):
    model_dir, data = demo
    adapter = _adapter(model_dir, tmp_path / "adapter")
    out = tmp_path / "report"
    assert (
        main(
            [
                "--model",
                model_dir,
                "--adapter",
                adapter,
                "--data",
                data,
                "--generate",
                "4",
                "--max-seq-length",
                "128",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads((out / "eval_report.json").read_text())
    base, tuned = report["rows"]
    assert base["name"] == "base" and tuned["name"].startswith("base+adapter")
    assert base["loss"] != tuned["loss"] and tuned["perplexity"] == pytest.approx(
        math.exp(tuned["loss"])
    )
    assert base["generated"] == tuned["generated"] == 4
    assert all(0.0 <= r["exact_match"] <= 1.0 for r in report["rows"])
    table = (out / "eval_report.md").read_text()
    assert "| model | loss | perplexity | exact match |" in table and table.count("\n| base") == 2
    assert table.strip() in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "{tmp}/nowhere", "--data", "{data}"], "no config.json"),
        (["--model", "{model}", "--data", "{tmp}/missing.jsonl"], "does not exist"),
        (["--model", "{model}", "--data", "{tmp}/bad.jsonl"], "bad.jsonl:2: bad JSON"),
        (["--model", "{model}", "--data", "{data}", "--generate", "-1"], "--generate -1"),
        (["--model", "{model}", "--data", "{data}", "--adapter", "{tmp}/no-adapter"], "--adapter"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(demo, tmp_path, capsys, argv, message):
    model_dir, data = demo
    good = (
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "one"}]}'
    )
    (tmp_path / "bad.jsonl").write_text(good + "\nnot json\n")
    argv = [a.format(tmp=tmp_path, data=data, model=model_dir) for a in argv]
    assert main(argv + ["--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lora-eval: ") and message in err and "\n" not in err
    assert not (tmp_path / "out" / "eval_report.json").exists()


@pytest.mark.parametrize(
    "prediction, reference, expected",
    [
        ("It is forty-three.", "it is  forty-three", 1.0),
        ("It is forty-three", "It is forty-four.", 0.0),
        ("  yes ", "Yes.", 1.0),
        ("", ".", 1.0),
        ("a.b", "a b", 0.0),
        ("It is forty-three..", "It is forty-three", 0.0),
    ],
)
def test_exact_match_ignores_case_spacing_and_one_final_full_stop(prediction, reference, expected):
    from lora.demo import skill
    from lora.finetune.evaluate import score

    assert score(prediction, reference) == expected
    assert skill.score is score  # the demo scores with lora-eval's rule, not a copy of it


def test_markdown_table_columns():
    rows = [EvalRow("base", 2.0), EvalRow("tuned", None)]
    table = markdown_table(rows)
    assert (
        "exact match" not in table
        and "| base | 2.0000 | 7.39 |" in table
        and "| tuned | n/a | n/a |" in table
    )
    assert "| 50.0% |" in markdown_table([EvalRow("base", 1.0, exact_match=0.5)])
