"""The batched encoder of prepared data (lora.data.prepared.BatchEncoder) is the reference one
(labels from the tokens' offsets) on every tokenizer: the ids-only label path where its table
applies (byte-level BPE without a normalizer, SentencePiece-style Llama/Phi-3 tokenizers), the
offsets path elsewhere; and the overlapped pipeline keeps the order of results and errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lora.data.prepared as P
from lora.data import PHI3_CHAT_TEMPLATE, DataError, Tokenizer, prepare_chat_data
from lora.data.prepared import BatchEncoder, SpanFinder, TokenBytes, _labels_from_offsets
from tests.tiny import CORPUS, PHI3_SPECIALS, write_tokenizer

_CHAT = ["<|assistant|>", "<|end|>", "<|user|>", "<|system|>"]


def _byte_level(
    directory: Path, *, digits=False, rstrip=False, lstrip=False, post=None, split=False
) -> Path:
    """A small byte-level BPE (the demo's kind), with optional variations."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    tok = HFTokenizer(models.BPE())
    steps = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=not split)]
    if split:  # Llama-3's way: a Split that isolates its matches, then a ByteLevel without regex
        steps.insert(0, pre_tokenizers.Split(r"\s+|\w+|[^\s\w]+", behavior="isolated"))
    if digits:
        steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=360,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    tok.add_special_tokens([t for t in PHI3_SPECIALS if t not in _CHAT])
    tok.add_special_tokens(
        [AddedToken(t, rstrip=rstrip, lstrip=lstrip, normalized=False) for t in _CHAT]
    )
    if post is not None:
        tok.post_processor = post
    return _save(tok, directory)


def _sentencepiece(directory: Path, normalized_user=False) -> Path:
    """A Llama/Phi-3-style tokenizer: Prepend("▁") + Replace(" ", "▁") normalizer, no
    pre-tokenizer, BPE with byte_fallback over <0xNN> tokens, chat tokens with rstrip."""
    from tokenizers import AddedToken, decoders, models, normalizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    tok = HFTokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    spec["model"].update(byte_fallback=True, fuse_unk=True)
    tok = HFTokenizer.from_str(json.dumps(spec))
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    tok.add_special_tokens([t for t in PHI3_SPECIALS if t not in _CHAT])
    tok.add_special_tokens(
        [AddedToken(t, rstrip=True, normalized=normalized_user and t == "<|user|>") for t in _CHAT]
    )
    return _save(tok, directory)


def _save(tok, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {"eos_token": "<|endoftext|>", "chat_template": PHI3_CHAT_TEMPLATE}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def _post(kind: str):
    from tokenizers import processors

    if kind == "template":
        return processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return processors.ByteLevel(trim_offsets=kind == "trim")


_KINDS = {
    # name: (build, does the ids-only table apply)
    "tiny": (lambda d: write_tokenizer(d), True),
    "digits": (lambda d: _byte_level(d, digits=True), True),
    "split": (lambda d: _byte_level(d, split=True), True),
    "post-bytelevel": (lambda d: _byte_level(d, post=_post("keep")), True),
    "post-template": (lambda d: _byte_level(d, post=_post("template")), True),
    "rstrip": (lambda d: _byte_level(d, rstrip=True), True),
    "lstrip": (lambda d: _byte_level(d, lstrip=True), True),  # per text: offsets where one occurs
    "post-trim": (lambda d: _byte_level(d, post=_post("trim")), False),
    "sentencepiece": (_sentencepiece, True),
    "sentencepiece-normalized": (lambda d: _sentencepiece(d, normalized_user=True), True),
}


@pytest.fixture(scope="module")
def tokenizers_by_kind(tmp_path_factory) -> dict[str, Tokenizer]:
    out = {}
    for name, (build, _) in _KINDS.items():
        out[name] = Tokenizer.from_pretrained(build(tmp_path_factory.mktemp(name)))
    from lora.demo import base_model_dir, ensure_assets

    ensure_assets(log=lambda *_: None)
    out["demo"] = Tokenizer.from_pretrained(base_model_dir())
    return out


def test_the_table_applies_exactly_where_its_proof_holds(tokenizers_by_kind):
    for name, (_, applies) in {**_KINDS, "demo": (None, True)}.items():
        table = TokenBytes.for_backend(tokenizers_by_kind[name].backend)
        assert (table is not None) == applies, name
    # rstrip chat tokens take the whitespace after them, found in the text; lstrip ones (and
    # normalized ones in the SentencePiece family) are unknown: texts holding them use offsets
    for name in ("rstrip", "sentencepiece"):
        tok = tokenizers_by_kind[name]
        table = TokenBytes.for_backend(tok.backend)
        assert table.rstrip[tok.token_to_id("<|end|>")] == b"<|end|>"
        assert table.lengths[tok.token_to_id("<|endoftext|>")] == len("<|endoftext|>")
    for name, token in (("lstrip", "<|end|>"), ("sentencepiece-normalized", "<|user|>")):
        tok = tokenizers_by_kind[name]
        assert TokenBytes.for_backend(tok.backend).lengths[tok.token_to_id(token)] == -1


_piece = st.sampled_from(
    list("ab c\n\t.<|>end0123")
    + ["<|end|>", "<|user|>", "<|endoftext|>", "<s>", "é", "🙂"]
    + ["中文", "naïve", "cat", " dog", "  ", "\u00a0", "\U0001f9d1\u200d\U0001f373", "\r\n"]
)
_text = st.lists(_piece, max_size=14).map("".join)


@st.composite
def _text_and_spans(draw):
    """A text and sorted, disjoint, non-empty character spans (at its ends too)."""
    text = draw(_text)
    cuts = sorted(set(draw(st.lists(st.integers(0, len(text)), max_size=6))))
    if draw(st.booleans()):
        cuts = sorted(set(cuts) | {0, len(text)})
    spans = [(a, b) for a, b in zip(cuts[0::2], cuts[1::2]) if b > a]
    return text, spans


def _offsets_reference(texts, spans, tokenizer):
    """The reference: encode_batch (offsets tracked), labels from the offsets."""
    encodings = tokenizer.backend.encode_batch(texts, add_special_tokens=False)
    return _labels_from_offsets(encodings, spans)


def _same(name, tokenizer, texts, spans):
    encoder = BatchEncoder(tokenizer)
    encodings = encoder.encode(texts)
    got = encoder.labels(texts, spans, encodings)
    want = _offsets_reference(texts, spans, tokenizer)
    assert len(got) == len(want)
    for (ids, mask), (ids0, mask0) in zip(got, want):
        assert ids.dtype == ids0.dtype and mask.dtype == mask0.dtype
        assert np.array_equal(ids, ids0) and np.array_equal(mask, mask0)
    if encoder.table is None:
        return
    # and the ids-only path did it, but where a text holds a token it cannot place
    for text, sp, enc in zip(texts, spans, encodings):
        unknown = {"lstrip": _CHAT, "sentencepiece-normalized": ["<|user|>"]}.get(name, [])
        if not any(t in text for t in unknown):
            assert encoder.table.labels(text, sp, np.array(enc.ids, dtype=np.int32)) is not None


@settings(max_examples=60, deadline=None)
@given(st.lists(_text_and_spans(), min_size=1, max_size=6))
def test_encoder_equals_the_offsets_reference_on_any_text_and_spans(tokenizers_by_kind, batch):
    texts, spans = [t for t, _ in batch], [s for _, s in batch]
    for name, tokenizer in tokenizers_by_kind.items():
        _same(name, tokenizer, texts, spans)


_content = st.lists(_piece, max_size=8).map("".join)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(_content, _content), min_size=1, max_size=3),
    st.sampled_from([None, "", "be brief 🙂"]),
)
def test_encoder_equals_the_reference_on_rendered_conversations(tokenizers_by_kind, turns, system):
    # empty assistant turns, special tokens and multi-byte characters inside contents
    messages = [] if system is None else [{"role": "system", "content": system}]
    for user, assistant in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    for name, tokenizer in tokenizers_by_kind.items():
        text, spans = SpanFinder(tokenizer.chat_template, tokenizer.stop_tokens)(messages)
        # and the same text ending at an assistant span's end (a template without a closing tail)
        cut = spans[-1][1] if spans else len(text)
        _same(name, tokenizer, [text, text[:cut]], [spans, spans])


@pytest.mark.parametrize("kind", ["demo", "rstrip", "sentencepiece"])
def test_the_ids_only_path_is_taken_on_chat_text(tokenizers_by_kind, monkeypatch, kind):
    tokenizer = tokenizers_by_kind[kind]
    encoder = BatchEncoder(tokenizer)
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi é 🙂 \u00a0 x"},
        {"role": "assistant", "content": " the  cat\n"},
    ]
    texts = [tokenizer.chat_template.render(messages)]
    calls = []
    monkeypatch.setattr(P, "_labels_from_offsets", lambda *a: calls.append(a) or [])
    ((ids, mask),) = encoder.labels(texts, [[(0, 3)]], encoder.encode(texts))
    assert not calls and len(ids) == len(mask) > 0


def _records(n):
    out = []
    for i in range(n):
        user = "boom" if i % 7 == 3 else f"question {i} é " * (1 + 6 * (i % 5 == 2))
        answer = "" if i % 11 == 5 else f"answer {i} 🙂 " * (1 + i % 4)  # "": a record error
        out.append(
            {
                "messages": [
                    {"role": "user", "content": user},
                    {"role": "assistant", "content": answer},
                ]
            }
        )
    return out


@pytest.mark.parametrize("kind", ["tiny", "sentencepiece", "lstrip", "post-trim"])
def test_the_overlapped_pipeline_keeps_results_and_errors_in_order(
    tokenizers_by_kind, tmp_path, monkeypatch, kind
):
    from lora.data import ChatTemplate

    base = tokenizers_by_kind[kind]
    strict = ChatTemplate(
        "{% for m in messages %}{% if m['content'] == 'boom' %}"
        "{{ raise_exception('no boom') }}{% endif %}{% endfor %}" + PHI3_CHAT_TEMPLATE,
        base.chat_template.special_tokens,
    )
    tokenizer = Tokenizer(base.backend, base.config, chat_template=strict)
    path = tmp_path / "d.jsonl"
    rows = [json.dumps(r) for r in _records(40)]
    rows[17] = "{not json"
    path.write_text("\n".join(rows) + "\n")

    def run(batch):
        monkeypatch.setattr(P, "CONVERSATIONS_PER_BATCH", batch)
        data = prepare_chat_data(path, tokenizer, 24, on_error="skip", packing=False)
        return [(e.input_ids, e.labels) for e in data.train], data

    serial, data = run(10_000)  # one batch: nothing overlaps
    for batch in (1, 3, 8):
        overlapped, other = run(batch)
        assert overlapped == serial
        assert [(e.line, e.message) for e in other.errors] == [
            (e.line, e.message) for e in data.errors
        ]
        assert other.train_stats == data.train_stats
    # the record errors (empty answers, bad JSON), then the template's, each in file order
    template = [i + 1 for i in range(40) if i % 7 == 3 and i % 11 != 5 and i != 17]
    assert [e.line for e in data.errors] == [6, 17, 18, 28, 39] + template
    assert data.train_stats.dropped > 0 and data.train_stats.truncated > 0
    with pytest.raises(DataError, match="no boom"):
        monkeypatch.setattr(P, "CONVERSATIONS_PER_BATCH", 3)
        prepare_chat_data(path, tokenizer, 24)
