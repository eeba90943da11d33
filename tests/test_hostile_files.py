"""Files from the internet (adapter configs, config.json, chat templates, weights, tokenizers) and
bad command-line arguments: each is refused quickly with one line naming the file or argument."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from tiny import ADAPTER_PHI3 as PHI3
from tiny import write_checkpoint

import lora
from lora._regex_guard import check_bounded_regex
from lora.data import Tokenizer
from lora.data import template as template_mod
from lora.data.template import ChatTemplate, ChatTemplateError, RenderLimits
from lora.finetune import TrainingConfig
from lora.finetune.__main__ import main as finetune_main
from lora.finetune.generate import main as generate_main
from lora.models import Phi3Config, Phi3ForCausalLM
from lora.models.checkpoint import CheckpointError

M = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("ckpt"))


def copy_ckpt(ckpt: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(ckpt, dest)
    return dest


# --- adapter_config.json regexes -----------------------------------------------------------------
def _adapter(tmp_path) -> Path:
    torch.manual_seed(0)
    model = lora.inject(Phi3ForCausalLM(Phi3Config(**PHI3)), {"r": 2, "target_modules": ["o_proj"]})
    return lora.save_adapter(model, tmp_path / "a")


@pytest.mark.parametrize(
    "key,value",
    [
        ("target_modules", "(.*.*)*X"),
        ("target_modules", "(a|a)*b"),
        ("rank_pattern", {"(x+x+)+y": 4}),
        ("alpha_pattern", {".*.*.*.*o_proj": 4}),
    ],
)
def test_a_backtracking_regex_in_an_adapter_config_is_refused_at_once(tmp_path, key, value):
    path = _adapter(tmp_path)
    body = json.loads((path / "adapter_config.json").read_text())
    body[key] = value
    (path / "adapter_config.json").write_text(json.dumps(body))
    torch.manual_seed(0)
    with pytest.raises(
        lora.AdapterError,
        match=r"adapter_config.json: .*refused, matching it could take "
        r"unbounded time",
    ):
        lora.load_adapter(Phi3ForCausalLM(Phi3Config(**PHI3)), path)


@pytest.mark.parametrize(
    "pattern",
    [
        "q_proj|v_proj",
        r".*\.(q|v)_proj",
        r"model\.layers\.\d+\.mlp\..*",
        r"model.layers.[0-9]+.self_attn.o_proj",
        "(?:.*\\.)?o_proj",
        r"layers\.(0|1)\.mlp",
    ],
)
def test_the_regexes_people_write_are_accepted(pattern):
    assert check_bounded_regex(pattern, "target_modules") == pattern


def test_a_regex_adapter_config_of_bounded_cost_still_loads(tmp_path):
    path = _adapter(tmp_path)
    body = json.loads((path / "adapter_config.json").read_text())
    body["target_modules"] = r".*\.o_proj"
    (path / "adapter_config.json").write_text(json.dumps(body))
    torch.manual_seed(0)
    model = lora.load_adapter(Phi3ForCausalLM(Phi3Config(**PHI3)), path)
    assert sum(1 for _ in lora.layers.lora_layers(model)) == 2


# --- config.json ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "change,exc,words",
    [
        (
            {"num_hidden_layers": 1_000_000},
            CheckpointError,
            "does not match the weights: num_hidden_layers=1000000, but the weights hold 2 layers",
        ),
        (
            {"vocab_size": 7},
            CheckpointError,
            "vocab_size=7, hidden_size=32, but model.embed_tokens.weight is",
        ),
        (
            {"intermediate_size": 16},
            CheckpointError,
            "intermediate_size=16, but model.layers.0.mlp.down_proj",
        ),
        ({"rms_norm_eps": "abc"}, ValueError, "rms_norm_eps='abc'; expected a finite number > 0"),
        ({"rope_theta": None}, ValueError, "rope_theta=None; expected a finite number"),
        (
            {"tie_word_embeddings": "no"},
            ValueError,
            "tie_word_embeddings='no'; expected true or false",
        ),
        ({"head_dim": 8.0}, ValueError, "head_dim=8.0; expected an int or null"),
        ({"eos_token_id": "x"}, ValueError, "eos_token_id='x'; expected an int, a list of ints"),
        ({"rope_scaling": [1]}, ValueError, "rope_scaling=[1]; expected a dict or null"),
    ],
)
def test_a_bad_config_json_is_named_before_the_model_is_built(ckpt, tmp_path, change, exc, words):
    d = copy_ckpt(ckpt, tmp_path / "m")
    body = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**body, **change}))
    with pytest.raises(exc) as info:
        Phi3ForCausalLM.from_pretrained(d)
    assert words in str(info.value) and "config.json" in str(info.value)


@pytest.mark.parametrize(
    "text,words",
    [("not json {", "not a JSON file"), ("[1, 2]", "got list"), ("[" * 100_000, "not a JSON file")],
)
def test_a_config_json_that_is_not_an_object_is_named(ckpt, tmp_path, text, words):
    d = copy_ckpt(ckpt, tmp_path / "m")
    (d / "config.json").write_text(text)
    with pytest.raises(ValueError, match=rf"config.json: .*{words}"):
        Phi3ForCausalLM.from_pretrained(d)


@pytest.mark.parametrize("damage", ["truncated", "random"])
def test_damaged_weights_are_named(ckpt, tmp_path, damage):
    d = copy_ckpt(ckpt, tmp_path / "m")
    raw = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(
        raw[: len(raw) // 2] if damage == "truncated" else bytes(range(256)) * 8
    )
    with pytest.raises(
        CheckpointError,
        match=r"model.safetensors: not a valid safetensors file, truncated "
        r"or corrupt",
    ):
        Phi3ForCausalLM.from_pretrained(d)


@pytest.mark.parametrize(
    "name,text,words",
    [
        ("tokenizer.json", '{"version": 1', "tokenizer.json' is not a readable tokenizer file"),
        ("tokenizer_config.json", "{oops", "tokenizer_config.json' is not a JSON file"),
        (
            "tokenizer_config.json",
            "[]",
            "tokenizer_config.json' holds a JSON list; expected an object",
        ),
    ],
)
def test_a_broken_tokenizer_file_is_named(ckpt, tmp_path, name, text, words):
    d = copy_ckpt(ckpt, tmp_path / "m")
    (d / name).write_text(text)
    with pytest.raises(ValueError, match=words):
        Tokenizer.from_pretrained(d)


# --- chat templates -------------------------------------------------------------------------------
ORIGIN = "the chat template in m/tokenizer_config.json"


@pytest.mark.parametrize(
    "source,words",
    [
        ("{{ 'a' * 10**8 }}", "'*' would build a sequence of 100000000 items"),
        (
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
            "range() calls yield more than 1000000 items in all",
        ),
        ("{% for i in range(10**9) %}{% endfor %}", "with the argument 1000000000"),
        ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "RecursionError"),
        ("{{ 'a'|center(10**9) }}", "the filter center with the argument 1000000000"),
        ("{{ '{:>999999999}'.format(1) }}", "a format width of 7 or more digits"),
        ("{{ '%999999999s' % 1 }}", "a format width of 7 or more digits"),
        ("{{ 2 ** 100000 }}", "'**' would build a"),
        (
            "{% set s = 'x' * 4000000 %}{% for i in range(10) %}{{ s }}{% endfor %}",
            "the rendered text exceeds 16777216 characters",
        ),
    ],
)
def test_a_runaway_chat_template_is_stopped_naming_the_template(source, words):
    with pytest.raises(ChatTemplateError) as info:
        ChatTemplate(source, origin=ORIGIN).render(M)
    assert str(info.value).startswith(f"{ORIGIN} was stopped: ") and words in str(info.value)


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs setitimer")
def test_a_chat_template_burning_cpu_is_stopped_by_the_time_bound(monkeypatch):
    monkeypatch.setattr(template_mod, "LIMITS", RenderLimits(max_cpu_seconds=0.2))
    source = "{% set s = 'ab' * 100000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}"
    with pytest.raises(
        ChatTemplateError, match=r"was stopped: rendering took more than 0.2 s of CPU time"
    ):
        ChatTemplate(source, origin=ORIGIN).render(M)
    assert signal.getsignal(signal.SIGVTALRM) in (signal.SIG_DFL, None)
    assert signal.getitimer(signal.ITIMER_VIRTUAL) == (0.0, 0.0)


def test_ordinary_templates_render_as_before():
    assert (
        ChatTemplate.phi3().render(M, add_generation_prompt=True)
        == "<|user|>\nhi<|end|>\n<|assistant|>\n"
    )
    src = (
        "{% for m in messages %}{{ '%-6s|' % m.role }}{{ '{:>4}'.format(m.content) }}{% endfor %}"
        "{{ 'ab' * 2 }}"
    )
    assert ChatTemplate(src).render(M) == "user  |  hiabab"


def test_a_template_from_a_checkpoint_names_its_file(ckpt, tmp_path):
    d = copy_ckpt(ckpt, tmp_path / "m")
    body = json.loads((d / "tokenizer_config.json").read_text())
    body["chat_template"] = "{{ 'a' * 10**9 }}"
    (d / "tokenizer_config.json").write_text(json.dumps(body))
    with pytest.raises(
        ChatTemplateError, match=rf"the chat template in {d / 'tokenizer_config.json'} was stopped"
    ):
        Tokenizer.from_pretrained(d).apply_chat_template(M)


# --- lora-generate: one line for every bad argument -----------------------------------------------
@pytest.mark.parametrize(
    "args,words",
    [
        (["--max-new-tokens", "-1"], "--max-new-tokens -1: expected an int >= 0"),
        (["--top-p", "5"], "--top-p 5.0: expected a number in (0, 1]"),
        (["--temperature", "-1"], "--temperature -1.0: expected 0 (greedy) or a finite number > 0"),
        (["--temperature", "nan"], "--temperature nan"),
        (["--top-k", "0"], "--top-k 0: expected an int >= 1"),
        (
            ["--adapter", "/nonexistent/adapter"],
            "--adapter /nonexistent/adapter: no such directory",
        ),
    ],
)
def test_lora_generate_bad_arguments_are_one_line(ckpt, capsys, args, words):
    rc = generate_main(["--model", str(ckpt), "--prompt", "hi"] + args)
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and words in err and err.startswith("lora-generate: ")


def test_lora_generate_missing_model_and_truncated_adapter(ckpt, tmp_path, capsys):
    assert generate_main(["--model", str(tmp_path / "none"), "--prompt", "hi"]) == 2
    assert "--model" in capsys.readouterr().err
    torch.manual_seed(0)
    model = Phi3ForCausalLM.from_pretrained(ckpt)
    lora.inject(model, {"r": 2, "target_modules": ["o_proj"]})
    adapter = lora.save_adapter(model, tmp_path / "a")
    raw = (adapter / "adapter_model.safetensors").read_bytes()
    (adapter / "adapter_model.safetensors").write_bytes(raw[:50])
    rc = generate_main(["--model", str(ckpt), "--adapter", str(adapter), "--prompt", "hi"])
    err = capsys.readouterr().err
    assert (
        rc == 2
        and err.count("\n") == 1
        and "adapter_model.safetensors: not a valid safetensors" in err
    )


# --- lora-finetune configs ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "body,words",
    [
        (
            {"training_config": "fast", "peft_config": {}},
            "training_config is a str ('fast'); expected an object",
        ),
        ({"training_config": 3, "peft_config": {}}, "training_config is a int"),
        ({"training_config": {}, "peft_config": ["r", 4]}, "peft_config is a list"),
        (
            {"training_config": {"gradient_checkpointing_kwargs": "yes"}, "peft_config": {"r": 2}},
            "gradient_checkpointing_kwargs='yes': expected an object",
        ),
        (
            {"training_config": {"seed": 2**70}, "peft_config": {"r": 2}},
            f"seed={2**70}: expected an int in [0, 2**63)",
        ),
    ],
)
def test_lora_finetune_bad_config_sections_are_one_line(tmp_path, capsys, body, words):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps(body))
    rc = finetune_main(
        [
            "--model",
            str(tmp_path),
            "--data",
            str(cfg),
            "--config",
            str(cfg),
            "--output",
            str(tmp_path / "out"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and words in err


def test_lora_finetune_a_config_nested_100000_deep_is_one_line(tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text("[" * 100_000 + "]" * 100_000)
    rc = finetune_main(["--model", str(tmp_path), "--data", str(cfg), "--config", str(cfg)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and f"--config {cfg}: cannot parse" in err


def test_training_config_output_dir_accepts_a_path(tmp_path):
    assert TrainingConfig(output_dir=tmp_path).output_dir == str(tmp_path)


# --- library calls that used to raise a traceback deep inside -------------------------------------
def test_inject_with_an_integer_lora_dtype_is_refused():
    with pytest.raises(TypeError, match=r"lora_dtype=torch.int64: expected a floating-point dtype"):
        lora.inject(
            torch.nn.Sequential(torch.nn.Linear(4, 4)),
            {"r": 2, "target_modules": ["0"]},
            lora_dtype=torch.int64,
        )


def test_save_adapter_of_a_meta_model_is_refused(tmp_path):
    with torch.device("meta"):
        model = Phi3ForCausalLM(Phi3Config(**PHI3))
    lora.inject(model, {"r": 2, "target_modules": ["o_proj"]})
    with pytest.raises(
        lora.AdapterError, match=r"save_adapter: parameter .* is on the meta device"
    ):
        lora.save_adapter(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()
