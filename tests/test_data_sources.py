"""Data as users have it: parquet (ultrachat's layout), ShareGPT, directories, globs, splits,
save_to_disk directories; the batched pipeline's equivalence with the exact one; the cache."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lora.data import (
    PHI3_CHAT_TEMPLATE,
    ChatTemplate,
    DataError,
    Tokenizer,
    load_conversations,
    prepare_chat_data,
    tokenize_conversation,
)
from lora.data.labels import IGNORE_INDEX
from lora.data.packing import Example, pack_examples
from lora.data.prepared import SpanFinder, first_fit
from lora.data.sources import resolve_data_files
from tests.tiny import chat_records, write_jsonl, write_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    return Tokenizer.from_pretrained(write_tokenizer(tmp_path_factory.mktemp("tok")))


def _ultrachat_rows(records):
    return [
        {
            "prompt": r["messages"][-2]["content"] if len(r["messages"]) > 1 else "",
            "prompt_id": f"{i:064x}",
            "messages": r["messages"],
        }
        for i, r in enumerate(records)
    ]


def _write_ultrachat_parquet(path: Path, records) -> Path:
    """ultrachat_200k's exact schema: prompt, prompt_id (strings),
    messages: list<struct<content, role>>."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    schema = pa.schema(
        [
            ("prompt", pa.string()),
            ("prompt_id", pa.string()),
            ("messages", pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))),
        ]
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.Table.from_pylist(_ultrachat_rows(records), schema=schema), path, row_group_size=7
    )
    return path


def _messages(convs):
    return [c.messages for c in convs]


# ---- parquet -------------------------------------------------------------------------------------


def test_parquet_round_trip_in_ultrachats_layout_with_splits(tmp_path):
    train, test = chat_records(30, seed=1), chat_records(9, seed=2)
    root = tmp_path / "ultrachat_200k"
    _write_ultrachat_parquet(root / "data" / "train_sft-00000-of-00002-aa.parquet", train[:20])
    _write_ultrachat_parquet(root / "data" / "train_sft-00001-of-00002-bb.parquet", train[20:])
    _write_ultrachat_parquet(root / "data" / "test_sft-00000-of-00001-cc.parquet", test)
    convs, _ = load_conversations(f"{root}:train_sft")
    assert _messages(convs) == [r["messages"] for r in train]
    assert convs[25].path.endswith("train_sft-00001-of-00002-bb.parquet") and convs[25].index == 5
    convs, _ = load_conversations(f"{root}:test_sft")
    assert _messages(convs) == [r["messages"] for r in test]
    with pytest.raises(ValueError, match="holds the splits test_sft, train_sft"):
        load_conversations(root)
    with pytest.raises(ValueError, match="no split 'validation'"):
        load_conversations(f"{root}:validation")


def test_parquet_malformed_rows_are_reported_with_file_and_row(tmp_path):
    records = chat_records(5)
    records[3] = {
        "messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]
    }
    path = _write_ultrachat_parquet(tmp_path / "d.parquet", records)
    with pytest.raises(DataError) as info:
        load_conversations(path)
    (error,) = info.value.errors
    assert (error.path, error.index) == (str(path), 3) and "robot" in error.message
    assert f"{path}: record 3" in str(info.value)


def test_parquet_without_pyarrow_names_the_extra(tmp_path, monkeypatch):
    path = tmp_path / "d.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(ImportError, match=r"pip install lora\[data\]"):
        load_conversations(path)


def test_parquet_without_a_record_column_is_a_clear_error(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a", "b"]}), tmp_path / "t.parquet")
    with pytest.raises(ValueError, match="columns text; expected 'messages'"):
        load_conversations(tmp_path / "t.parquet")


# ---- ShareGPT ------------------------------------------------------------------------------------


def _sharegpt(records):
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    return [
        {
            "id": str(i),
            "conversations": [
                {"from": names[m["role"]], "value": m["content"]} for m in r["messages"]
            ],
        }
        for i, r in enumerate(records)
    ]


def test_sharegpt_round_trip_jsonl_and_parquet(tmp_path):
    records = chat_records(12, seed=3)
    convs, _ = load_conversations(write_jsonl(tmp_path / "s.jsonl", _sharegpt(records)))
    assert _messages(convs) == [r["messages"] for r in records]
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(_sharegpt(records)), tmp_path / "s.parquet")
    convs, _ = load_conversations(tmp_path / "s.parquet")
    assert _messages(convs) == [r["messages"] for r in records]


def test_sharegpt_bad_turns_name_file_and_line(tmp_path):
    rows = _sharegpt(chat_records(3))
    rows[1]["conversations"][0]["from"] = "bing"
    del rows[2]["conversations"][1]["value"]
    path = write_jsonl(tmp_path / "s.jsonl", rows)
    with pytest.raises(DataError) as info:
        load_conversations(path)
    assert [(e.line, e.path) for e in info.value.errors] == [(2, str(path)), (3, str(path))]
    assert "conversations[0].from='bing' is unknown" in info.value.errors[0].message
    assert "has no 'value'" in info.value.errors[1].message


# ---- directories, globs, save_to_disk ------------------------------------------------------------


def test_directory_and_glob_forms(tmp_path):
    a, b = chat_records(4, seed=4), chat_records(5, seed=5)
    (tmp_path / "shards").mkdir()
    write_jsonl(tmp_path / "shards" / "part-b.jsonl", b)
    write_jsonl(tmp_path / "shards" / "part-a.jsonl", a)
    (tmp_path / "shards" / "notes.txt").write_text("not data")
    (tmp_path / "shards" / ".hidden.jsonl").write_text("{bad json\n")
    want = [r["messages"] for r in a + b]
    assert _messages(load_conversations(tmp_path / "shards")[0]) == want
    assert _messages(load_conversations(str(tmp_path / "shards" / "part-*.jsonl"))[0]) == want
    assert _messages(load_conversations(str(tmp_path / "**" / "*.jsonl"))[0]) == want
    # several specs keep their order; a file named twice is read once
    files = resolve_data_files(
        [tmp_path / "shards" / "part-b.jsonl", str(tmp_path / "shards" / "*.jsonl")]
    )
    assert [f.path.name for f in files] == ["part-b.jsonl", "part-a.jsonl"]
    with pytest.raises(FileNotFoundError, match="matches no file"):
        load_conversations(str(tmp_path / "nothing-*.jsonl"))
    # subdirectories named like splits are splits; others are just part of the data
    for sub, records in (("train", a), ("test/2024", b)):
        (tmp_path / "bysplit" / sub).mkdir(parents=True)
        write_jsonl(tmp_path / "bysplit" / sub / "x.jsonl", records)
    test_split = load_conversations(f"{tmp_path / 'bysplit'}:test")[0]
    assert _messages(test_split) == [r["messages"] for r in b]
    with pytest.raises(ValueError, match="holds the splits test, train"):
        load_conversations(tmp_path / "bysplit")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no data file"):
        load_conversations(tmp_path / "empty")


def test_save_to_disk_directories(tmp_path):
    datasets = pytest.importorskip("datasets")
    train, test = chat_records(8, seed=6), chat_records(3, seed=7)
    ds = datasets.Dataset.from_list(_ultrachat_rows(train))
    ds.save_to_disk(str(tmp_path / "single"))
    assert _messages(load_conversations(tmp_path / "single")[0]) == [r["messages"] for r in train]
    dd = datasets.DatasetDict(
        {"train_sft": ds, "test_sft": datasets.Dataset.from_list(_ultrachat_rows(test))}
    )
    dd.save_to_disk(str(tmp_path / "dict"))
    assert _messages(load_conversations(f"{tmp_path / 'dict'}:test_sft")[0]) == [
        r["messages"] for r in test
    ]
    with pytest.raises(ValueError, match="holds the splits"):
        load_conversations(tmp_path / "dict")


# ---- the batched pipeline is the exact one -------------------------------------------------------

_piece = st.sampled_from(list("ab c\n.<|>end") + ["<|end|>", "<|user|>", "é", "🙂", "cat", " dog"])
_text = st.lists(_piece, min_size=1, max_size=12).map("".join).filter(lambda t: t.strip())


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(_text, _text), min_size=1, max_size=3), st.booleans(), st.integers(4, 60))
def test_prepare_chat_data_equals_tokenize_conversation(
    tokenizer, tmp_path_factory, turns, system, max_len
):
    messages = [{"role": "system", "content": "be brief"}] if system else []
    for user, assistant in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    path = write_jsonl(tmp_path_factory.mktemp("eq") / "d.jsonl", [{"messages": messages}] * 2)
    exact = tokenize_conversation(messages, tokenizer)
    ids, labels = exact.input_ids[:max_len], exact.labels[:max_len]
    try:
        data = prepare_chat_data(path, tokenizer, max_len, eval_fraction=0.5)
    except DataError:
        assert all(x == IGNORE_INDEX for x in labels)  # dropped: nothing to learn within max_len
        return
    for ex in list(data.train) + list(data.eval):
        assert (ex.input_ids, ex.labels) == (ids, labels)


def test_span_finder_falls_back_when_the_template_rewrites_contents(tokenizer):
    trimming = ChatTemplate(
        PHI3_CHAT_TEMPLATE.replace("message['content']", "(message['content'] | trim)"),
        tokenizer.chat_template.special_tokens,
    )
    finder = SpanFinder(trimming, tokenizer.stop_tokens)
    from lora.data.labels import assistant_spans

    for content in ("  padded  ", "plain"):
        messages = [{"role": "user", "content": "hi "}, {"role": "assistant", "content": content}]
        assert finder(messages) == assistant_spans(messages, trimming, tokenizer.stop_tokens)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 10), max_size=40), st.integers(10, 14))
def test_first_fit_is_first_fit(lengths, capacity):
    bins, free = [], []
    for i, n in enumerate(lengths):  # the textbook scan
        for b, room in enumerate(free):
            if n <= room:
                bins[b].append(i)
                free[b] -= n
                break
        else:
            bins.append([i])
            free.append(capacity - n)
    assert first_fit(lengths, capacity) == bins
    examples = [Example([1] * n, [1] * n) for n in lengths]
    packed = pack_examples(examples, capacity)
    assert [e.num_conversations for e in packed] == [len(b) for b in bins]


def test_packed_data_matches_packing_the_examples(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", chat_records(40, seed=8))
    plain = prepare_chat_data(path, tokenizer, 64, eval_fraction=0.2, seed=3)
    packed = prepare_chat_data(path, tokenizer, 64, eval_fraction=0.2, seed=3, packing=True)
    import random

    train = list(plain.train)
    random.Random(3).shuffle(train)
    assert [(e.input_ids, e.labels, e.position_ids, e.segment_ids) for e in packed.train] == [
        (e.input_ids, e.labels, e.position_ids, e.segment_ids) for e in pack_examples(train, 64)
    ]
    assert packed.train_stats.sequences == len(packed.train) < plain.train_stats.sequences


# ---- the cache -----------------------------------------------------------------------------------


def _flat(data):
    return [(e.input_ids, e.labels) for e in list(data.train) + list(data.eval)]


def _prepare(path, tokenizer, cache, lines, max_len=64):
    return prepare_chat_data(
        path, tokenizer, max_len, eval_fraction=0.25, cache_dir=cache, log=lines.append
    )


def test_cache_hit_and_invalidation_on_each_key(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", chat_records(20, seed=9))
    cache, lines = tmp_path / "cache", []
    first = _prepare(path, tokenizer, cache, lines)
    assert lines == [] and len(list(cache.glob("prepared-*"))) == 1
    second = _prepare(path, tokenizer, cache, lines)
    assert lines[-1].startswith("prepared data from the cache") and _flat(second) == _flat(first)
    assert second.summary() == first.summary()

    lines.clear()  # max_seq_length
    short = _prepare(path, tokenizer, cache, lines, max_len=12)
    assert lines == [] and _flat(short) != _flat(first)
    lines.clear()  # the data
    write_jsonl(path, chat_records(20, seed=10))
    changed = _prepare(path, tokenizer, cache, lines)
    assert lines == [] and _flat(changed) != _flat(first)
    lines.clear()  # the template
    other = Tokenizer(
        tokenizer.backend,
        tokenizer.config,
        tokenizer.generation_config,
        ChatTemplate(
            PHI3_CHAT_TEMPLATE.replace("<|user|>\n", "<|user|>"),
            tokenizer.chat_template.special_tokens,
        ),
    )
    templated = _prepare(path, other, cache, lines)
    assert lines == [] and _flat(templated) != _flat(changed)
    lines.clear()  # the tokenizer
    from tokenizers import Tokenizer as HFTokenizer

    backend = HFTokenizer.from_str(tokenizer.backend.to_str())
    backend.add_tokens(["cat dog"])
    retok = _prepare(
        path, Tokenizer(backend, tokenizer.config, tokenizer.generation_config), cache, lines
    )
    assert lines == []
    assert len(list(cache.glob("prepared-*"))) == 1  # older prepared data is removed
    assert _prepare(
        path, Tokenizer(backend, tokenizer.config, tokenizer.generation_config), cache, lines
    ) and lines[-1].startswith("prepared data from the cache")
    assert _flat(retok) == _flat(
        prepare_chat_data(
            path,
            Tokenizer(backend, tokenizer.config, tokenizer.generation_config),
            64,
            eval_fraction=0.25,
        )
    )


@pytest.mark.parametrize("damage", ["truncate", "flip", "manifest", "members"])
def test_a_corrupt_cache_is_rebuilt_never_trusted(tokenizer, tmp_path, damage):
    path = write_jsonl(tmp_path / "d.jsonl", chat_records(20, seed=11))
    cache, lines = tmp_path / "cache", []
    good = _flat(_prepare(path, tokenizer, cache, lines))
    (built,) = cache.glob("prepared-*")
    tokens = built / "tokens.bin"
    if damage == "truncate":
        tokens.write_bytes(tokens.read_bytes()[:-4])
    elif damage == "flip":
        raw = bytearray(tokens.read_bytes())
        raw[8] ^= 0x01
        tokens.write_bytes(bytes(raw))
    elif damage == "manifest":
        (built / "manifest.json").write_text('{"key": ')
    else:  # consistent hash, inconsistent structure: the manifest is rewritten to match
        import hashlib

        members = built / "train_members.bin"
        members.write_bytes(np.full(len(members.read_bytes()) // 8, 10**6, dtype="<i8").tobytes())
        meta = json.loads((built / "manifest.json").read_text())
        meta["arrays"]["train_members"]["sha256"] = hashlib.sha256(members.read_bytes()).hexdigest()
        (built / "manifest.json").write_text(json.dumps(meta))
    again = _prepare(path, tokenizer, cache, lines)
    assert len(lines) == 1 and "unusable" in lines[0] and "rebuilding" in lines[0]
    assert _flat(again) == good
    lines.clear()
    assert _flat(_prepare(path, tokenizer, cache, lines)) == good and "from the cache" in lines[0]


def test_a_build_left_by_a_killed_process_is_removed_and_a_live_ones_kept(tokenizer, tmp_path):
    import subprocess

    path = write_jsonl(tmp_path / "d.jsonl", chat_records(8, seed=3))
    cache = tmp_path / "cache"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    stale = cache / f".building-0123456789abcdef01234567-{int(dead.stdout)}"
    live = cache / f".building-76543210fedcba9876543210-{os.getppid()}"
    for d in (stale, live):
        d.mkdir(parents=True)
        (d / "tokens.bin").write_bytes(b"\0" * 64)
    assert _flat(_prepare(path, tokenizer, cache, []))
    assert not stale.exists()  # SIGKILL runs no cleanup: the next build removes it
    assert (live / "tokens.bin").exists()  # another process may still be writing it
    assert [p.name for p in cache.glob(".building-*")] == [live.name]


def test_finetune_keeps_prepared_data_next_to_the_output_and_reuses_it(tmp_path):
    from lora.finetune import finetune
    from tests.tiny import write_checkpoint

    ckpt = write_checkpoint(tmp_path / "ckpt")
    data = write_jsonl(tmp_path / "d.jsonl", chat_records(24, seed=12))
    training = {
        "output_dir": str(tmp_path / "out"),
        "max_steps": 1,
        "max_seq_length": 64,
        "per_device_train_batch_size": 4,
        "eval_fraction": 0.25,
        "save_steps": 100,
    }
    peft = {"r": 2, "lora_alpha": 4, "target_modules": ["qkv_proj"]}
    first: list[str] = []
    finetune(ckpt, data, training, peft, progress=False, log=first.append)
    assert len(list((tmp_path / "out" / "data_cache").glob("prepared-*"))) == 1
    assert not any("from the cache" in line for line in first)
    again: list[str] = []
    finetune(
        ckpt,
        data,
        {**training, "overwrite_output_dir": True},
        peft,
        progress=False,
        log=again.append,
    )
    assert any(line.startswith("prepared data from the cache") for line in again)
    assert len(list((tmp_path / "out" / "data_cache").glob("prepared-*"))) == 1


def test_example_array_hash_follows_the_sequences(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", chat_records(16, seed=13))
    a = prepare_chat_data(path, tokenizer, 64, eval_fraction=0.25)
    b = prepare_chat_data(path, tokenizer, 64, eval_fraction=0.25, cache_dir=tmp_path / "c")
    c = prepare_chat_data(path, tokenizer, 64, eval_fraction=0.25, cache_dir=tmp_path / "c")
    assert a.train.content_sha256() == b.train.content_sha256() == c.train.content_sha256()
    assert a.train.content_sha256() != a.eval.content_sha256()
    packed = prepare_chat_data(path, tokenizer, 64, eval_fraction=0.25, packing=True)
    assert packed.train.content_sha256() != a.train.content_sha256()


def test_resume_fingerprints_take_directories_and_globs(tmp_path):
    from lora.finetune.resume import file_fingerprints

    (tmp_path / "d").mkdir()
    files = [write_jsonl(tmp_path / "d" / f"{n}.jsonl", chat_records(2, seed=n)) for n in (1, 2)]
    assert file_fingerprints(tmp_path / "d") == file_fingerprints(files)
    assert file_fingerprints(str(tmp_path / "d" / "*.jsonl")) == file_fingerprints(files)
    assert [f["path"] for f in file_fingerprints(files)] == [str(p.resolve()) for p in files]
