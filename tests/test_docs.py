"""The docs, kept honest: their Python blocks run on a tiny Phi-3, their option tables name what
the config dataclasses hold (and the defaults they hold), their flags are the commands' flags.

A block is found by a line it holds (``BLOCKS``), not by its position, so adding a block to a page
does not shift the others. A block runs as written in a directory holding a tiny checkpoint under
the names the docs use (``Phi-3-mini-4k-instruct``, ``path/to/Phi-3-mini-4k-instruct``) and the
files they read; ``... train ...`` placeholder lines are no-ops, and a setup gives the names a
block takes from its page's prose (``model``, ``ids``, ``training_config``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import warnings
from pathlib import Path

import pytest
import torch
from tiny import TINY_PEFT, chat_records, tiny_training, write_checkpoint, write_jsonl
from torch import nn

import lora
from lora.finetune.config import ALIASES, IGNORED_KEYS, OPTIMIZERS, TrainingConfig

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def code_blocks(page: str) -> list[str]:
    return [m.group(2) for m in FENCE.finditer((ROOT / page).read_text())]


def block(page: str, holding: str) -> str:
    found = [b for b in code_blocks(page) if holding in b]
    assert len(found) == 1, f"{page}: {len(found)} code blocks hold {holding!r}; expected one"
    # "... train ..." stands for the reader's own code
    return re.sub(r"^(\s*)\.\.\.\s+\S[^\n]*\.\.\.\s*$", r"\1pass", found[0], flags=re.M)


# --- the setups: what a block takes from its page's prose --------------------------------------


def _phi3(ns):
    from lora.models import Phi3ForCausalLM

    ns["Phi3ForCausalLM"] = Phi3ForCausalLM
    ns["model"] = Phi3ForCausalLM.from_pretrained("Phi-3-mini-4k-instruct")
    ns["model2"] = Phi3ForCausalLM.from_pretrained("Phi-3-mini-4k-instruct")
    ns["ids"] = ns["input_ids"] = torch.tensor([[1, 5, 7, 9], [1, 4, 6, 8]] * 2)
    ns["mask"] = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]] * 2)
    ns["path"] = "Phi-3-mini-4k-instruct"


def _readme(ns):
    ns["model"] = nn.Sequential()
    ns["model"].fc = nn.Linear(768, 768)


def _layers(ns):
    ns["model"] = nn.Sequential(lora.Linear(8, 8, r=2))
    torch.save(ns["model"].state_dict(), "pretrained.pt")


def _fused(ns):
    ns["model"] = nn.Sequential()
    ns["model"].c_attn = nn.Linear(768, 3 * 768)


def _two_adapters(ns):
    from lora.models import Phi3ForCausalLM

    for name, targets in (("chat", ["qkv_proj", "o_proj"]), ("sql", ["o_proj", "down_proj"])):
        m = Phi3ForCausalLM.from_pretrained("Phi-3-mini-4k-instruct")
        lora.inject(m, lora.LoRAConfig(r=2, target_modules=targets, init_lora_weights=False))
        lora.save_adapter(m, f"adapters/{name}")
    _phi3(ns)


def _mixed(ns):
    _two_adapters(ns)
    lora.load_adapter(ns["model"], "adapters/chat")
    lora.load_adapter(ns["model"], "adapters/sql", adapter_name="sql")


def _finetune(ns):
    ns["training_config"] = tiny_training(".", max_steps=2, save_steps=2)
    ns["peft_config"] = dict(TINY_PEFT)


def _lora_pt(ns):
    _phi3(ns)
    lora.inject(ns["model"], lora.LoRAConfig(r=2, target_modules=["o_proj"]))
    torch.save(lora.lora_state_dict(ns["model"]), "lora.pt")


# (page, a line of the block, setup, text replacements: a GPU-only argument run on the CPU)
BLOCKS = [
    ("README.md", "lora.mark_only_lora_as_trainable(model)", _readme, {}),
    ("docs/layers.md", 'torch.load("pretrained.pt"', _layers, {}),
    ("docs/surgery.md", "lora.print_trainable_parameters(model)", _phi3, {}),
    ("docs/surgery.md", 'model.lm_head.modules_to_save["default"]', _phi3, {}),
    ("docs/surgery.md", '"gate_up_proj[up]"])', _phi3, {}),
    ("docs/surgery.md", "model.fused_splits = ", _fused, {}),
    ("docs/phi3.md", 'device="cuda"', _phi3, {'device="cuda"': 'device="cpu"'}),
    ("docs/phi3.md", "out.loss, out.logits", _phi3, {}),
    ("docs/phi3.md", "position_ids_from_mask(mask))", _phi3, {}),
    ("docs/phi3.md", "sequences = model.generate(", _phi3, {}),
    ("docs/phi3.md", "model.gradient_checkpointing_enable()", _phi3, {}),
    ("docs/phi3.md", "max_shard_size=", _phi3, {}),
    ("docs/phi3.md", 'merged.save_pretrained("merged/")', _phi3, {}),
    ("docs/adapters.md", 'lora.load_adapter(fresh, "out/adapter")', _phi3, {}),
    ("docs/adapters.md", 'model.load_state_dict(torch.load("lora.pt"', _lora_pt, {}),
    ("docs/adapters.md", "lora.add_weighted_adapter(model", _two_adapters, {}),
    ("docs/adapters.md", "with lora.mixed_batch(model", _mixed, {}),
    ("docs/data.md", "prepare_chat_data(\n", _phi3, {}),
    ("docs/qlora.md", 'quantize="nf4")\nlora.inject', _phi3, {}),
    ("docs/qlora.md", "original_module.down_proj.weight", _phi3, {}),
    ("docs/qlora.md", "NF4 -> compute dtype", _phi3, {}),
    ("docs/finetune.md", "result = finetune(", _finetune, {}),
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("docs") / "Phi-3-mini-4k-instruct")


@pytest.mark.parametrize(
    "page, holding, setup, replace",
    BLOCKS,
    ids=[f"{p}:{h.splitlines()[0][:40]}" for p, h, _, _ in BLOCKS],
)
def test_a_docs_python_block_runs_as_written(
    page, holding, setup, replace, checkpoint, tmp_path, monkeypatch
):
    src = block(page, holding)
    for old, new in replace.items():
        src = src.replace(old, new)
    (tmp_path / "Phi-3-mini-4k-instruct").symlink_to(checkpoint)
    (tmp_path / "path" / "to").mkdir(parents=True)
    (tmp_path / "path" / "to" / "Phi-3-mini-4k-instruct").symlink_to(checkpoint)
    for name in ("train.jsonl", "chat.jsonl"):
        write_jsonl(tmp_path / name, chat_records(24))
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    ns: dict = {"torch": torch, "lora": lora}
    setup(ns)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a block as written should not warn either
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        with contextlib.redirect_stdout(io.StringIO()):
            exec(compile(src, f"{page}:{holding}", "exec"), ns)


# --- option tables against the dataclasses -----------------------------------------------------


def section(page: str, heading: str) -> str:
    text = (ROOT / page).read_text()
    start = text.index(heading + "\n")
    level = heading.split(" ")[0]
    rest = text[start + len(heading) :]
    end = re.search(rf"^{'#' * len(level)} ", rest, re.M)
    return rest[: end.start()] if end else rest


def table_rows(text: str, header: str) -> list[list[str]]:
    """The rows (cells) of the table whose header line starts with ``header``."""
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[at + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split(" | ")])
    return rows


def names(cell: str) -> list[str]:
    return re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", cell)


def doc_value(text: str):
    text = text.strip().strip("`")
    if text in ("null", "None", ""):
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text.strip('"')


def same(doc, actual) -> bool:
    if isinstance(actual, bool) or isinstance(doc, bool) or doc is None or actual is None:
        return doc == actual and type(doc) is type(actual)
    if isinstance(actual, (int, float)) and isinstance(doc, (int, float)):
        return float(doc) == float(actual)
    return doc == actual


TRAINING = section("docs/finetune.md", "### training_config keys")
FIELDS = {f.name: f for f in dataclasses.fields(TrainingConfig)}


def field_default(name: str):
    f = FIELDS[name]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]


def test_finetune_md_training_config_table_names_every_field_with_its_default():
    documented = {}
    for row in table_rows(TRAINING, "| key | default |"):
        keys = names(row[0])
        if keys[0] in ALIASES:
            assert ALIASES[keys[0]] in FIELDS, keys
            continue
        defaults = re.split(r" / |, (?![^{]*})", row[1]) if len(keys) > 1 else [row[1]]
        assert len(defaults) == len(keys), f"row {row[0]}: {len(keys)} keys, defaults {row[1]!r}"
        documented.update(zip(keys, defaults))
    assert set(documented) == set(FIELDS), (
        f"in the table, not in TrainingConfig: {sorted(set(documented) - set(FIELDS))}; "
        f"in TrainingConfig, not in the table: {sorted(set(FIELDS) - set(documented))}"
    )
    wrong = {
        k: (v, field_default(k))
        for k, v in documented.items()
        if not same(doc_value(v), field_default(k))
    }
    assert not wrong, f"defaults the table states otherwise than TrainingConfig: {wrong}"


def test_finetune_md_lists_every_ignored_key_with_the_values_it_accepts():
    any_value = section("docs/finetune.md", "### training_config keys")
    paragraph = any_value[any_value.index("**Accepted with any value") :]
    paragraph = paragraph[: paragraph.index("\n\n")]
    documented_any = set(names(paragraph))
    expected_any = {k for k, v in IGNORED_KEYS.items() if v is None}
    assert documented_any == expected_any, (
        f"named as accepted with any value, but not: {sorted(documented_any - expected_any)}; "
        f"not named: {sorted(expected_any - documented_any)}"
    )
    documented = {}
    for row in table_rows(TRAINING, "| key | accepted |"):
        keys = names(row[0])
        values = re.split(r", ", row[1])
        values = values * len(keys) if len(values) == 1 else values  # one value for all
        assert len(values) == len(keys), row
        documented.update(zip(keys, values))
    expected = {k: v for k, v in IGNORED_KEYS.items() if v is not None}
    assert set(documented) == set(expected), (
        f"in the table, not accepted at one value: {sorted(set(documented) - set(expected))}; "
        f"not in the table: {sorted(set(expected) - set(documented))}"
    )
    wrong = {
        k: (v, expected[k])
        for k, v in documented.items()
        if not any(same(doc_value(v), a) for a in expected[k])  # type: ignore[union-attr]
    }
    assert not wrong, f"accepted values the table states otherwise: {wrong}"


def test_finetune_md_optim_table_is_the_optimizers_supported():
    documented = [k for row in table_rows(TRAINING, "| `optim` | runs |") for k in names(row[0])]
    assert sorted(documented) == sorted(OPTIMIZERS)


def test_surgery_md_loraconfig_table_names_every_field():
    text = section("docs/surgery.md", "## `LoRAConfig`")
    rows = table_rows(text, "| key | default | meaning |")
    documented = {k for row in rows for k in names(row[0])}
    fields = {f.name: f for f in dataclasses.fields(lora.LoRAConfig)}
    assert documented == set(fields), (
        f"in the table, not in LoRAConfig: {sorted(documented - set(fields))}; "
        f"in LoRAConfig, not in the table: {sorted(set(fields) - documented)}"
    )
    # the defaults column is the dataclass's: "none" for a string, {} for an empty dict
    for row in rows:
        for k in names(row[0]):
            f = fields[k]
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
            shown = f'"{default}"' if isinstance(default, str) else str(default)
            assert row[1].startswith(shown), (k, row[1], shown)


# --- command-line flags ------------------------------------------------------------------------

# torchrun's own flags and the benchmark scripts' flags, which the pages also show
OTHER_FLAGS = {
    "--standalone",
    "--nproc_per_node",
    "--nnodes",
    "--node_rank",
    "--rdzv_backend",
    "--rdzv_endpoint",
    "--rdzv_id",
    "--no-python",
    "--help",
    "--floor",  # benchmark flags named in prose about them
    "--base",
    "--layers",
    "--rounds",
}


def command_flags() -> set[str]:
    from lora.finetune import __main__ as finetune_cli
    from lora.finetune import evaluate, generate

    flags = {o for p in (finetune_cli.build_parser(), evaluate.build_parser()) for o in _options(p)}
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        generate.main(["--help"])
    return flags | set(re.findall(r"--[a-z][a-z0-9-]*", out.getvalue()))


def _options(parser) -> set[str]:
    return {o for action in parser._actions for o in action.option_strings}


@pytest.mark.parametrize("page", ["README.md", "docs/finetune.md", "docs/data.md", "docs/qlora.md"])
def test_every_flag_a_page_names_is_a_flag_of_the_commands(page):
    # the benchmark scripts' flags are theirs: a line or `span` naming a benchmark is left out
    text = (ROOT / page).read_text()
    text = re.sub(r"`[^`\n]*bench[^`\n]*`|^.*bench.*$", "", text, flags=re.M)
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*[a-z0-9]", text))
    unknown = sorted(named - command_flags() - OTHER_FLAGS)
    assert not unknown, f"{page} names flags no command has: {unknown}"


def test_the_training_configs_a_page_shows_load():
    recipe = json.loads(block("docs/finetune.md", '"training_config": {'))
    TrainingConfig.from_dict(recipe["training_config"])
    lora.LoRAConfig(**recipe["peft_config"])
    assert os.fspath(TrainingConfig().output_dir) == "lora-output"
