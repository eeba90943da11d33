"""lora.data: records and their errors, tokenizer, label masks, truncation, packing, batching."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from tiny import write_tokenizer

import lora.data as data
from lora.data import (
    IGNORE_INDEX,
    ChatTemplate,
    DataError,
    Example,
    Tokenizer,
    collate,
    load_conversations,
    pack_examples,
    prepare_chat_data,
    split_train_eval,
    tokenize_conversation,
)

CORPUS = [
    "the cat sat on the mat and the dog ran to the park",
    "hello world, how are you today? I am fine, thank you.",
    "Anna has 12 red apples and Tom has 3 blue balls.",
    "café naïve résumé 中文 emoji 🙂 tabs\tand\nnew lines",
]


def _write_tiny_checkpoint(directory: Path) -> Path:
    """tests/tiny.py's tokenizer over this file's corpus (accents, CJK, an emoji, tabs), digits
    split, with a generation config of three end tokens."""
    from tokenizers import Tokenizer as HFTokenizer

    write_tokenizer(directory, 400, corpus=CORPUS, split_digits=True)
    tok = HFTokenizer.from_file(str(directory / "tokenizer.json"))
    eos = [tok.token_to_id(t) for t in ("<|endoftext|>", "<|assistant|>", "<|end|>")]
    (directory / "generation_config.json").write_text(
        json.dumps({"eos_token_id": eos, "bos_token_id": 1})
    )
    return directory


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return _write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_ckpt"))


@pytest.fixture(scope="module")
def tokenizer(checkpoint) -> Tokenizer:
    return Tokenizer.from_pretrained(checkpoint)


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _chat(user: str = "hi", assistant: str = "hello", system: str | None = None) -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    return {
        "messages": messages
        + [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    }


# ---------------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------------


def test_jsonl_messages_records_load_and_ignore_extra_keys(tmp_path):
    record = {"prompt": "hi", "prompt_id": "abc", **_chat("hi", "hello", system="be kind")}
    record["messages"][1]["name"] = "ignored"
    path = _write_lines(tmp_path / "d.jsonl", [json.dumps(record), "", json.dumps(_chat("a", "b"))])
    convs, errors = load_conversations(path)
    assert errors == []
    assert [c.messages for c in convs] == [
        [
            {"role": "system", "content": "be kind"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
        ],
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
    ]
    assert [c.line for c in convs] == [1, 3]  # the blank line 2 is not a record


def test_alpaca_records_become_user_and_assistant_turns(tmp_path):
    path = _write_lines(
        tmp_path / "a.jsonl",
        [
            json.dumps({"instruction": "Translate", "input": "chat", "output": "cat"}),
            json.dumps({"instruction": "Say hi", "input": "", "output": "hi"}),
            json.dumps({"instruction": "Say hi", "output": "hi"}),
        ],
    )
    convs, _ = load_conversations(path)
    assert convs[0].messages == [
        {"role": "user", "content": "Translate\n\nchat"},
        {"role": "assistant", "content": "cat"},
    ]
    assert (
        convs[1].messages
        == convs[2].messages
        == [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]
    )


def test_json_list_records_are_accepted(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([_chat("a", "b"), {"instruction": "x", "output": "y"}], indent=2))
    convs, errors = load_conversations(path)
    assert len(convs) == 2 and errors == []
    assert [c.index for c in convs] == [0, 1]


BAD_LINES = [
    (
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}',
        None,
    ),
    ('{"messages": [{"role": "user", "content": "hi"}', "bad JSON"),
    (
        '{"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "yo"}]}',
        "'bot' is unknown",
    ),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
    (
        '{"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "yo"}]}',
        "is empty",
    ),
    (
        '{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "yo"}]}',
        "expected a string",
    ),
    ('{"messages": "hello"}', "expected a list"),
    ("[1, 2]", "expected an object"),
    ('{"text": "plain"}', "neither 'messages' nor"),
    ('{"instruction": "x", "output": ""}', "'output' is empty"),
    ('{"messages": [["user", "hi"]]}', "messages[0] is a JSON array"),
]


def test_malformed_records_raise_one_error_listing_every_file_and_line(tmp_path):
    path = _write_lines(tmp_path / "bad.jsonl", [line for line, _ in BAD_LINES])
    with pytest.raises(DataError) as info:
        load_conversations(path, on_error="raise")
    expected = [(i + 1, why) for i, (_, why) in enumerate(BAD_LINES) if why]
    assert [(e.line, e.path) for e in info.value.errors] == [(n, str(path)) for n, _ in expected]
    for error, (n, why) in zip(info.value.errors, expected):
        assert why in error.message
        assert f"{path}:{n}: " in str(info.value)  # the message itself lists file:line for each


def test_a_lone_surrogate_is_a_record_error_naming_file_line_and_turn(tmp_path):
    good = {"role": "user", "content": "hi"}
    bad = {"role": "assistant", "content": "half a pair: \ud83d!"}
    path = _write_lines(
        tmp_path / "s.jsonl",
        [
            json.dumps({"messages": [good, good | {"role": "assistant"}]}),
            json.dumps({"messages": [good, bad]}),
        ],
    )
    with pytest.raises(DataError) as info:
        load_conversations(path, on_error="raise")
    (error,) = info.value.errors
    assert (error.path, error.line) == (str(path), 2)
    assert "messages[1].content (assistant) holds a lone surrogate '\\ud83d'" in error.message
    assert f"{path}:2: " in str(info.value)


def test_skip_mode_drops_malformed_records_and_returns_them(tmp_path):
    path = _write_lines(tmp_path / "bad.jsonl", [line for line, _ in BAD_LINES])
    convs, errors = load_conversations(path, on_error="skip")
    assert len(convs) == 1
    assert len(errors) == sum(1 for _, why in BAD_LINES if why)


def test_json_list_errors_name_the_record_index_and_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(
        '[\n  {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},\n'
        '  {"messages": [{"role": "user", "content": "a"}]}\n]\n'
    )
    with pytest.raises(DataError, match=r"record 1 \(line 3\): no assistant turn") as info:
        load_conversations(path)
    assert info.value.errors[0].index == 1


def test_json_list_syntax_error_is_reported_with_its_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(
        '[\n {"instruction": "a", "output": "b"},\n {"instruction": "a", "output": }\n]'
    )
    convs, errors = load_conversations(path, on_error="skip")
    assert len(convs) == 1 and errors[0].line == 3 and "bad JSON" in errors[0].message


def test_no_valid_record_is_an_error_even_when_skipping(tmp_path):
    path = _write_lines(tmp_path / "bad.jsonl", ['{"text": 1}'])
    with pytest.raises(DataError, match="no valid record"):
        load_conversations(path, on_error="skip")


def test_bad_arguments_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match="on_error='ignore'"):
        load_conversations(tmp_path / "x.jsonl", on_error="ignore")
    with pytest.raises(FileNotFoundError, match="x.jsonl"):
        load_conversations(tmp_path / "x.jsonl")
    with pytest.raises(ValueError, match="eval_fraction=1.5"):
        split_train_eval([1, 2, 3], 1.5)


def test_eval_split_is_deterministic_disjoint_and_complete():
    items = list(range(100))
    train, evals = split_train_eval(items, 0.1, seed=3)
    assert (train, evals) == split_train_eval(items, 0.1, seed=3)
    assert len(evals) == 10 and sorted(train + evals) == items
    assert evals != split_train_eval(items, 0.1, seed=4)[1]
    assert split_train_eval(items, 0.0) == (items, [])


# ---------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------


def test_tokenizer_special_and_stop_ids_come_from_the_configs(tokenizer):
    eot, end, asst = (
        tokenizer.token_to_id(t) for t in ("<|endoftext|>", "<|end|>", "<|assistant|>")
    )
    assert (
        tokenizer.eos_token_id == eot
        and tokenizer.pad_token_id == eot
        and tokenizer.bos_token_id == 1
    )
    assert tokenizer.stop_token_ids == [eot, asst, end]
    assert "<|end|>" in tokenizer.stop_tokens


def test_tokenizer_round_trips_text_and_never_adds_special_tokens(tokenizer):
    text = "<|user|>\nhello 42 café 🙂<|end|>\n"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert ids[0] == tokenizer.token_to_id("<|user|>")  # no <s> in front
    assert tokenizer.token_to_id("<|end|>") in ids  # a special token in the text is one token


def test_tokenizer_save_pretrained_round_trips(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "saved")
    again = Tokenizer.from_pretrained(tmp_path / "saved")
    assert again.encode("hello world") == tokenizer.encode("hello world")
    assert again.chat_template.source == tokenizer.chat_template.source
    assert again.stop_token_ids == tokenizer.stop_token_ids


def test_tokenizer_rejects_a_config_token_missing_from_the_vocabulary(checkpoint, tmp_path):
    import shutil

    target = tmp_path / "ckpt"
    shutil.copytree(checkpoint, target)
    config = json.loads((target / "tokenizer_config.json").read_text())
    config["eos_token"] = "<|im_end|>"
    (target / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"eos_token='<\|im_end\|>' is not in the vocabulary"):
        Tokenizer.from_pretrained(target)


# ---------------------------------------------------------------------------------------------------
# Label masks
# ---------------------------------------------------------------------------------------------------

_text = (
    st.lists(
        st.sampled_from(
            list("abcdefghij klm\n\t.,!?0123456789éü中🙂") + ["<|end|>", "hello", " world"]
        ),
        min_size=1,
        max_size=30,
    )
    .map("".join)
    .filter(lambda s: s.strip())
)


@st.composite
def conversations(draw):
    messages = []
    if draw(st.booleans()):
        messages.append({"role": "system", "content": draw(_text)})
    for _ in range(draw(st.integers(1, 3))):
        messages.append({"role": "user", "content": draw(_text)})
        messages.append({"role": "assistant", "content": draw(_text)})
    if draw(st.booleans()):
        messages.append({"role": "user", "content": draw(_text)})
    return messages


# Phi-4-mini's template: Phi-3's format without the newlines.
PHI4_MINI_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and message['tools'] "
    "is not none %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + message['tools'] + "
    "'<|/tool|>' + '<|end|>' }}{% else %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
)


def _reference(messages, newline):
    """The Phi format built by hand, with the character span of each assistant content + <|end|>."""
    text, spans = "", []
    for m in messages:
        text += f"<|{m['role']}|>" + newline
        start = len(text)
        text += m["content"] + "<|end|>"
        if m["role"] == "assistant":
            spans.append((start, len(text)))
        text += newline
    return text + "<|endoftext|>", spans


@pytest.fixture(scope="module", params=["phi3", "phi4-mini"])
def template_case(request, checkpoint):
    tok = Tokenizer.from_pretrained(checkpoint)
    if request.param == "phi4-mini":
        tok.chat_template = ChatTemplate(PHI4_MINI_TEMPLATE, tok.chat_template.special_tokens)
    return tok, "\n" if request.param == "phi3" else ""


@given(conversations())
def test_labels_fall_only_inside_assistant_turns(template_case, messages):
    tokenizer, newline = template_case
    text, spans = _reference(messages, newline)
    ids, offsets = tokenizer.encode_with_offsets(text)
    out = tokenize_conversation(messages, tokenizer)
    assert out.text == text and out.input_ids == ids
    for token_id, label, (start, _end) in zip(ids, out.labels, offsets):
        inside = any(a <= start < b for a, b in spans)
        assert label == (token_id if inside else IGNORE_INDEX)
    # The role markers and the final <|endoftext|> are never labelled; each turn's <|end|> is.
    labelled = [x for x in out.labels if x != IGNORE_INDEX]
    for marker in ("<|user|>", "<|assistant|>", "<|system|>", "<|endoftext|>"):
        assert tokenizer.token_to_id(marker) not in labelled
    n_assistant = sum(m["role"] == "assistant" for m in messages)
    end_id = tokenizer.token_to_id("<|end|>")
    assert labelled.count(end_id) == n_assistant + sum(
        m["content"].count("<|end|>") for m in messages if m["role"] == "assistant"
    )


def test_labels_are_the_assistant_content_and_its_end_token(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Say hello"},
        {"role": "assistant", "content": "hello world"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "hello again"},
    ]
    out = tokenize_conversation(messages, tokenizer)
    runs, current = [], []
    for token_id, label in zip(out.input_ids, out.labels):
        if label != IGNORE_INDEX:
            assert label == token_id
            current.append(label)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    assert runs == ["hello world<|end|>", "hello again<|end|>"]


def test_end_token_is_labelled_when_the_tokenizer_strips_the_newline_after_it(checkpoint, tmp_path):
    # Phi-3's tokenizer.json declares its chat tokens with rstrip: "<|end|>\n" is one token whose
    # offsets run past the end of the assistant span.
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTokenizer

    backend = HFTokenizer.from_file(str(checkpoint / "tokenizer.json"))
    backend.add_special_tokens(
        [
            AddedToken(t, rstrip=True, normalized=False, special=True)
            for t in ("<|assistant|>", "<|end|>", "<|user|>")
        ]
    )
    tok = Tokenizer.from_pretrained(checkpoint)
    tok.backend = backend
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " hello world"}]
    out = tokenize_conversation(messages, tok)
    labelled = [x for x in out.labels if x != IGNORE_INDEX]
    assert tok.decode(labelled) == "hello world<|end|>"  # the leading space went to the header
    assert labelled[-1] == tok.token_to_id("<|end|>")


# ---------------------------------------------------------------------------------------------------
# Truncation, packing, batching
# ---------------------------------------------------------------------------------------------------


def test_truncation_cuts_from_the_right_and_drops_examples_left_without_labels(tmp_path, tokenizer):
    long_user = " ".join(["the cat sat on the mat"] * 20)
    path = _write_lines(
        tmp_path / "d.jsonl", [json.dumps(_chat("hi", "hello")), json.dumps(_chat(long_user, "ok"))]
    )
    result = prepare_chat_data(path, tokenizer, max_seq_length=32)
    assert result.train_stats.truncated == 1 and result.train_stats.dropped == 1
    assert len(result.train) == 1 and result.train_stats.dropped_sources == [f"{path}:2"]
    assert "1 dropped" in result.summary()
    full = tokenize_conversation(_chat(long_user, "long answer here " * 5)["messages"], tokenizer)
    kept = data.truncate(Example(full.input_ids, full.labels), 64)
    assert kept.input_ids == full.input_ids[:64] and kept.labels == full.labels[:64]


def test_prepare_reports_template_failures_as_record_errors(tmp_path, checkpoint):
    path = _write_lines(
        tmp_path / "d.jsonl", [json.dumps(_chat("hi", "hello")), json.dumps(_chat("boom", "x"))]
    )
    strict = ChatTemplate(
        "{% for m in messages %}{% if m['content'] == 'boom' %}{{ raise_exception('no boom') }}{% endif %}"
        "{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
    )
    tok = Tokenizer.from_pretrained(checkpoint)
    tok.chat_template = strict
    with pytest.raises(DataError, match=rf"{path}:2: chat template failed to render: no boom"):
        prepare_chat_data(path, tok, max_seq_length=64)
    result = prepare_chat_data(path, tok, max_seq_length=64, on_error="skip")
    assert len(result.train) == 1 and len(result.errors) == 1
    # Bad JSON and a conversation the template refuses are listed together, in one DataError.
    path.write_text(path.read_text() + "{not json\n")
    with pytest.raises(DataError) as info:
        prepare_chat_data(path, tok, max_seq_length=64, eval_fraction=0.5)
    assert sorted(e.line for e in info.value.errors) == [2, 3]


def test_prepare_holds_out_a_seeded_eval_split_or_reads_an_eval_file(tmp_path, tokenizer):
    lines = [json.dumps(_chat(f"question {i}", f"answer {i}")) for i in range(40)]
    path = _write_lines(tmp_path / "d.jsonl", lines)
    a = prepare_chat_data(path, tokenizer, max_seq_length=64, eval_fraction=0.25, seed=1)
    b = prepare_chat_data(path, tokenizer, max_seq_length=64, eval_fraction=0.25, seed=1)
    assert len(a.eval) == 10 and len(a.train) == 30
    assert [e.input_ids for e in a.eval] == [e.input_ids for e in b.eval]
    eval_path = _write_lines(tmp_path / "e.jsonl", lines[:5])
    c = prepare_chat_data(path, tokenizer, max_seq_length=64, eval_file=eval_path)
    assert len(c.eval) == 5 and len(c.train) == 40
    with pytest.raises(ValueError, match="not both"):
        prepare_chat_data(
            path, tokenizer, max_seq_length=64, eval_file=eval_path, eval_fraction=0.1
        )


@st.composite
def example_lists(draw):
    n = draw(st.integers(1, 12))
    examples = []
    for i in range(n):
        length = draw(st.integers(1, 16))
        ids = [1000 * (i + 1) + t for t in range(length)]  # unique ids: each token is traceable
        mask = draw(st.lists(st.booleans(), min_size=length, max_size=length))
        examples.append(Example(ids, [x if keep else IGNORE_INDEX for x, keep in zip(ids, mask)]))
    return examples, draw(st.integers(16, 40))


@given(example_lists())
def test_packing_keeps_every_token_once_with_its_label_and_restarts_positions(args):
    examples, max_len = args
    packed = pack_examples(examples, max_len)
    pieces = []
    for seq in packed:
        assert len(seq) <= max_len
        for s in range(seq.num_conversations):
            idx = [t for t, sid in enumerate(seq.segment_ids) if sid == s]
            assert idx == list(range(idx[0], idx[0] + len(idx)))  # contiguous
            assert [seq.position_ids[t] for t in idx] == list(range(len(idx)))
            pieces.append(([seq.input_ids[t] for t in idx], [seq.labels[t] for t in idx]))
    assert sorted(pieces) == sorted((e.input_ids, e.labels) for e in examples)


@given(example_lists(), st.integers(1, 4))
def test_packed_mask_allows_attention_only_within_one_conversation(args, batch_size):
    examples, max_len = args
    packed = pack_examples(examples, max_len)[:batch_size]
    batch = collate(packed, pad_token_id=0, packed=True)
    mask = batch["attention_mask"]
    B, S = batch["input_ids"].shape
    assert mask.shape == (B, 1, S, S) and mask.dtype == torch.bool
    for b, seq in enumerate(packed):
        segments = seq.segment_ids + [-1] * (S - len(seq))  # -1: padding
        for i in range(S):
            for j in range(S):
                assert bool(mask[b, 0, i, j]) == (segments[i] == segments[j])
        assert batch["labels"][b, len(seq) :].eq(IGNORE_INDEX).all()
        assert batch["position_ids"][b, : len(seq)].tolist() == seq.position_ids


def test_packed_mask_with_causal_attention_equals_attending_each_conversation_alone():
    torch.manual_seed(0)
    lengths = [5, 3, 4]
    seq = pack_examples([Example(list(range(n)), list(range(n))) for n in lengths], 16)
    assert len(seq) == 1
    batch = collate(
        seq, pad_token_id=0, packed=True, pad_to_multiple_of=16
    )  # 12 tokens + 4 of padding
    S = batch["input_ids"].shape[1]
    assert S == 16
    q, k, v = (torch.randn(1, 2, S, 8) for _ in range(3))
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=batch["attention_mask"] & causal)
    assert torch.isfinite(out).all()  # padding rows attend padding, never an empty row
    start = 0
    for n in lengths:
        sl = slice(start, start + n)
        alone = F.scaled_dot_product_attention(
            q[:, :, sl], k[:, :, sl], v[:, :, sl], is_causal=True
        )
        torch.testing.assert_close(out[:, :, sl], alone)
        start += n


def test_unpacked_batches_get_a_2d_mask_and_right_padding():
    batch = collate([Example([5, 6, 7], [-100, 6, 7]), Example([8], [8])], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]
    packed = pack_examples([Example([1], [1]), Example([2], [2])], 4)
    with pytest.raises(ValueError, match="packed=False"):
        collate(packed, pad_token_id=0, packed=False)


def test_prepare_with_packing_feeds_a_dataloader(tmp_path, tokenizer):
    lines = [
        json.dumps(_chat(f"question {i}", f"answer {i}", system="be kind" if i % 3 else None))
        for i in range(30)
    ]
    path = _write_lines(tmp_path / "d.jsonl", lines)
    plain = prepare_chat_data(path, tokenizer, max_seq_length=96)
    packed = prepare_chat_data(path, tokenizer, max_seq_length=96, packing=True)
    assert packed.train_stats.sequences < plain.train_stats.examples == 30
    assert sum(e.num_labels for e in packed.train) == sum(e.num_labels for e in plain.train)
    loader = torch.utils.data.DataLoader(packed.train, batch_size=4, collate_fn=packed.collate_fn())
    batch = next(iter(loader))
    assert set(batch) == {"input_ids", "labels", "attention_mask", "position_ids"}
    assert batch["attention_mask"].dim() == 4
