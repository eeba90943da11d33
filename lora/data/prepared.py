"""Chat data at scale: batched tokenization into flat numpy arrays, fast first-fit packing, and the
on-disk cache of prepared data.

Tokens of every kept conversation (already truncated to ``max_seq_length``) live in one flat
``int32`` array, its loss mask in one ``uint8`` array, and ``offsets[k]:offsets[k + 1]`` delimits
conversation ``k``. A split (train or eval) is a list of *sequences*, each a list of member
conversations (one, or several when packed): :class:`ExampleArray` builds each
:class:`~lora.data.Example` when it is indexed, so 200,000 conversations cost ~5 bytes a token, not
Python lists.

Tokenizing is a pipeline with one batch in flight (:func:`tokenize_files`): the Rust batch call
encodes batch ``k`` in a worker thread while this one labels batch ``k-1`` and renders ``k+1``.
:class:`BatchEncoder` labels from the token ids alone where :class:`TokenBytes` proves it exact
(byte-level and SentencePiece-style BPE), else from the tokens' offsets
(:func:`_labels_from_offsets`, the reference).

The cache is a directory ``prepared-<key>`` under the cache directory: raw little-endian arrays
(``*.bin``) and ``manifest.json`` (the key, the dtype, length and SHA-256 of each array, the split
stats and the skipped records). Nothing is unpickled. The key hashes the data files' fingerprint
(resolved path, size, mtime and a hash of the content: all of it under 64 MiB, else the first and
last MiB), the tokenizer (its ``tokenizer.json`` and special/stop tokens), the chat template source,
``max_seq_length``, and the split/packing/on_error options. A cache whose manifest, sizes, hashes or
structure do not check out is rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import re
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .labels import IGNORE_INDEX, assistant_spans
from .packing import Example
from .records import Conversation, RecordError
from .template import ChatTemplateError

__all__ = [
    "BatchEncoder",
    "ExampleArray",
    "first_fit",
    "SpanFinder",
    "TokenBytes",
    "cache_key",
    "CACHE_VERSION",
]

CACHE_VERSION = 1
CONVERSATIONS_PER_BATCH = (
    512  # rendered, then tokenized by one encode_batch call (parallel in Rust)
)
_SENTINEL = "\ue000{}\ue001"  # private-use characters: stand-ins for contents in a skeleton render
_FULL_HASH_LIMIT = 64 << 20
_EDGE_HASH = 1 << 20


# --------------------------------------------------------------------------------------------------
# Spans of assistant turns, fast
# --------------------------------------------------------------------------------------------------


class SpanFinder:
    """``(text, spans)`` of :func:`lora.data.labels.assistant_spans`, with one template render per
    conversation instead of ``1 + 2 * assistant turns``.

    For each sequence of roles, a *skeleton* conversation (contents replaced by unique stand-ins)
    is rendered and its spans found the exact way. A real conversation's text is then the skeleton
    with the contents put back, and its spans shift by the contents' lengths. That is checked on
    every conversation: its own render must equal the reassembled skeleton, otherwise (a template
    that trims or rewrites contents, say) the exact method runs.
    """

    def __init__(self, template, stop_strings: Sequence[str] = ()):
        self.template = template
        self.stops = list(stop_strings)
        self._skeletons: dict[tuple[str, ...], tuple | None] = {}

    def _skeleton(self, roles: tuple[str, ...]):
        fake = [{"role": r, "content": _SENTINEL.format(i)} for i, r in enumerate(roles)]
        try:
            text, spans = assistant_spans(fake, self.template, self.stops)
        except ChatTemplateError:
            return None
        literals, slots, pos = [], [], 0
        for i in range(len(roles)):
            mark = _SENTINEL.format(i)
            at = text.find(mark, pos)
            if at < 0 or text.find(mark, at + 1) >= 0:
                return None  # a content dropped or repeated: not a plain substitution
            literals.append(text[pos:at])
            slots.append((at, at + len(mark)))
            pos = at + len(mark)
        literals.append(text[pos:])
        bounds = []  # each span boundary as (slots before it, offset into the following literal)
        for b in (x for span in spans for x in span):
            k = sum(1 for _, end in slots if end <= b)
            if any(start < b < end for start, end in slots):
                return None
            bounds.append((k, b - (slots[k - 1][1] if k else 0)))
        return literals, bounds

    def __call__(self, messages: Sequence[dict]) -> tuple[str, list[tuple[int, int]]]:
        """Raises ChatTemplateError as :func:`~lora.data.labels.assistant_spans` does."""
        text = self.template.render(messages, add_generation_prompt=False)
        roles = tuple(m["role"] for m in messages)
        if roles not in self._skeletons:
            self._skeletons[roles] = self._skeleton(roles)
        skeleton = self._skeletons[roles]
        if skeleton is not None:
            literals, bounds = skeleton
            contents = [m["content"] for m in messages]
            pieces = [None] * (2 * len(contents) + 1)
            pieces[0::2], pieces[1::2] = literals, contents
            if "".join(pieces) == text:
                # where literal k starts in the real text
                starts = list(itertools.accumulate(len(p) for p in pieces))[1::2]
                flat = [(starts[k - 1] if k else 0) + r for k, r in bounds]
                return text, list(zip(flat[0::2], flat[1::2]))
        return assistant_spans(messages, self.template, self.stops)


def _labels_from_offsets(encodings, spans):
    """``(ids int32, mask bool)`` per encoding; the mask is where a token's first character lies
    inside a span (and the token is not empty), as :func:`~lora.data.labels.labels_from_spans`.

    The reference way, from the tokens' character offsets (``encode_batch``, not its ``_fast``
    form): it holds for every tokenizer. :class:`BatchEncoder` uses it where :class:`TokenBytes`
    does not apply."""
    out = []
    for enc, sp in zip(encodings, spans):
        ids = np.array(enc.ids, dtype=np.int32)
        offsets = enc.offsets
        flat = np.fromiter(
            itertools.chain.from_iterable(offsets), dtype=np.int64, count=2 * len(offsets)
        )
        starts, ends = flat[0::2], flat[1::2]
        inside = (
            np.searchsorted(np.asarray(sp, dtype=np.int64).reshape(-1), starts, side="right") & 1
        )
        out.append((ids, inside.astype(bool) & (ends > starts)))
    return out


def _steps(step, key: str) -> list[dict] | None:
    """The steps of a pre-tokenizer/post-processor (a ``Sequence`` flattened), None if unreadable."""
    if step is None:
        return []
    if not isinstance(step, dict):
        return None
    if step.get("type") != "Sequence":
        return [step]
    out: list[dict] = []
    for inner in step.get(key) or []:
        steps = _steps(inner, key)
        if steps is None:
            return None
        out += steps
    return out


_KEEPING_SPLITS = ("Isolated", "MergedWithPrevious", "MergedWithNext", "Contiguous")


def _splits_only(step: dict) -> bool:
    """A pre-tokenizer step that only cuts the text, keeping every character."""
    kind = step.get("type")
    if kind == "ByteLevel":
        return step.get("add_prefix_space") is False
    return kind == "Digits" or (kind == "Split" and step.get("behavior") in _KEEPING_SPLITS)


def _keeps_offsets(step: dict) -> bool:
    """A post-processor step that, without special tokens, changes neither ids nor offsets."""
    kind = step.get("type")
    if kind == "ByteLevel":
        return step.get("trim_offsets") is False
    return kind == "TemplateProcessing"


# Rust's char::is_whitespace (Unicode White_Space), which an added token's rstrip swallows, in UTF-8
_WHITESPACE = re.compile(
    rb"(?:[\t-\r ]|\xc2[\x85\xa0]|\xe1\x9a\x80|\xe2\x80[\x80-\x8a\xa8\xa9\xaf]|\xe2\x81\x9f"
    rb"|\xe3\x80\x80)*"
)
_SPM_NORMALIZER = {
    "type": "Sequence",
    "normalizers": [
        {"type": "Prepend", "prepend": "\u2581"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
    ],
}


class TokenBytes:
    """The label mask from token ids alone, where that is provably exact: a table of how many
    UTF-8 bytes of the text each token id covers.

    Two families of ``tokenizer.json`` qualify, both with no truncation or padding, post-processor
    steps that add nothing without special tokens (none, ``ByteLevel`` without ``trim_offsets``,
    ``TemplateProcessing``), and a BPE model without dropout, subword prefix or suffix that can
    never meet an unknown character:

    - *byte-level* (GPT-2, Llama-3, Qwen, the demo): no normalizer; pre-tokenizer steps that only
      cut the text (one ``ByteLevel`` without a prefix space, ``Digits``, a ``Split`` that keeps its
      matches); all 256 characters of the byte-level alphabet in the vocabulary. The text is cut
      into added tokens and pieces, each piece re-spelt one alphabet character a byte, and BPE
      splits it into vocabulary strings that concatenate back to it: a vocabulary token covers one
      byte per character of its string.
    - *SentencePiece-style* (Llama-2, Phi-3): the normalizer ``Prepend("▁")`` then
      ``Replace(" ", "▁")``, no pre-tokenizer, ``byte_fallback`` with all 256 ``<0xNN>`` tokens and
      ``▁`` in the vocabulary. Each piece between added tokens becomes ``▁`` + the piece with its
      spaces as ``▁``, and BPE splits that: a vocabulary token covers the bytes of its string with
      ``▁`` read as a space, a ``<0xNN>`` token one byte, and the first token of a piece (which
      starts with the prepended ``▁``, aligned to the piece's first character) one byte less. A
      text holding a literal ``▁`` is ambiguous: it takes the offsets path.

    An added token covers its content, plus with ``rstrip`` the whitespace after it (found in the
    text; its content is checked there). One that is ``lstrip``, or normalized in the
    SentencePiece family, is unknown (-1). Token ``t`` starts at byte ``sum(bytes[ids[:t]])``. A text
    with an unknown token, or whose byte total is not exactly the text's, takes the offsets path
    (:func:`_labels_from_offsets`).

    Why it is the offsets path's mask: a token's character offsets start in the character that
    holds its first byte (a character split over byte tokens gives each of them its offsets; a
    piece's lone prepended ``▁`` has its first character's), and span boundaries are character
    boundaries, so a token's first byte lies in a span exactly when its first character does. A
    byte-level token is empty exactly when it covers no byte; a SentencePiece-style one never is
    (its lone ``▁`` covers the first character). A property test compares the two paths on both
    families and their variations.
    """

    def __init__(self, lengths, added, rstrip, spm: bool, piece_start=None):
        self.lengths = lengths  # (V,) int64 bytes covered, -1 unknown (rstrip: the content's)
        self.added = added  # (V,) bool: an added token (a piece ends before it)
        self.rstrip = rstrip  # {id: content bytes} of the added tokens with rstrip
        self.spm = spm
        self.piece_start = piece_start  # (V,) bool: the string starts with "▁" (SentencePiece)

    @classmethod
    def for_backend(cls, backend) -> TokenBytes | None:
        """The table of a ``tokenizers.Tokenizer``, or None where the labels need offsets."""
        from tokenizers import pre_tokenizers

        try:
            spec = json.loads(backend.to_str())
        except ValueError:
            return None
        model = spec.get("model") or {}
        pre = _steps(spec.get("pre_tokenizer"), "pretokenizers")
        post = _steps(spec.get("post_processor"), "processors")
        if (
            spec.get("truncation") is not None
            or spec.get("padding") is not None
            or pre is None
            or post is None
            or not all(_keeps_offsets(s) for s in post)
            or model.get("type") != "BPE"
            or model.get("dropout") is not None
            or model.get("continuing_subword_prefix")
            or model.get("end_of_word_suffix")
            or not isinstance(model.get("vocab"), dict)
        ):
            return None
        vocab: dict[str, int] = model["vocab"]
        byte_tokens = {f"<0x{b:02X}>" for b in range(256)}
        if spec.get("normalizer") is None:
            spm = False
            alphabet = set(pre_tokenizers.ByteLevel.alphabet())
            if (
                sum(s.get("type") == "ByteLevel" for s in pre) != 1
                or not all(_splits_only(s) for s in pre)
                or not alphabet <= vocab.keys()
            ):
                return None
        elif spec.get("normalizer") == _SPM_NORMALIZER:
            spm = True
            if (
                pre
                or model.get("byte_fallback") is not True
                or not byte_tokens <= vocab.keys()
                or "\u2581" not in vocab
            ):
                return None
        else:
            return None
        added = spec.get("added_tokens") or []
        size = max([*vocab.values(), *(int(t["id"]) for t in added)]) + 1
        lengths = np.full(size, -1, dtype=np.int64)
        piece_start = np.zeros(size, dtype=bool)
        for token, i in vocab.items():
            if spm:
                n = 1 if token in byte_tokens else len(token.replace("\u2581", " ").encode())
                lengths[i] = n
                piece_start[i] = token.startswith("\u2581")
            elif alphabet.issuperset(token):
                lengths[i] = len(token)
        in_vocab = set(vocab.values())
        is_added = np.zeros(size, dtype=bool)
        rstrip: dict[int, bytes] = {}
        for t in added:
            i, content = int(t["id"]), t["content"].encode("utf-8")
            n = len(content)
            known = (
                n > 0
                and not t.get("lstrip")
                and not (spm and t.get("normalized"))
                and (i not in in_vocab or lengths[i] == n)
            )
            lengths[i] = n if known else -1
            is_added[i] = True
            if known and t.get("rstrip"):
                rstrip[i] = content
        return cls(lengths, is_added, rstrip, spm, piece_start if spm else None)

    def labels(self, text: str, spans: list[tuple[int, int]], ids: np.ndarray):
        """The mask of ``ids`` (the encoding of ``text``), or None where this table cannot say."""
        n = len(ids)
        if not n:
            return np.zeros(0, dtype=bool) if not text else None
        if int(ids.max()) >= len(self.lengths) or (self.spm and "\u2581" in text):
            return None
        lengths = self.lengths[ids]
        if int(lengths.min()) < 0:
            return None
        if self.spm:  # the first token of each piece holds the prepended "▁": no byte of the text
            added = self.added[ids]
            first = ~added
            first[1:] &= added[:-1]
            if not self.piece_start[ids[first]].all():
                return None
            lengths[first] -= 1
        data = None
        if self.rstrip:
            where = [
                t for t in np.flatnonzero(self.added[ids]).tolist() if int(ids[t]) in self.rstrip
            ]
            if where:
                data = text.encode("utf-8")
                ends = np.cumsum(lengths)
                grow = 0
                for t in where:
                    content = self.rstrip[int(ids[t])]
                    end = int(ends[t]) + grow
                    if data[end - len(content) : end] != content:
                        return None
                    extra = _WHITESPACE.match(data, end).end() - end
                    lengths[t] += extra
                    grow += extra
        ends = np.cumsum(lengths)
        bounds = [b for span in spans for b in span]
        if text.isascii():  # O(1) in CPython: then bytes are characters
            total = len(text)
        else:
            total, at, pos = 0, 0, []
            for b in bounds:
                total += len(text[at:b].encode("utf-8"))
                pos.append(total)
                at = b
            total += len(text[at:].encode("utf-8"))
            bounds = pos
        if int(ends[-1]) != total:
            return None
        starts = ends - lengths
        inside = np.searchsorted(np.asarray(bounds, dtype=np.int64), starts, side="right") & 1
        return inside.astype(bool) if self.spm else inside.astype(bool) & (lengths > 0)


class BatchEncoder:
    """Token ids and the label mask of batches of rendered texts, equal to the offsets
    way (:func:`_labels_from_offsets` over ``encode_batch``).

    :meth:`encode` is the Rust batch call (it releases the GIL: it may run in another thread while
    this one post-processes the previous batch); :meth:`labels` turns its encodings into
    ``(ids int32, mask bool)``. Where :class:`TokenBytes` applies, the encodings come from
    ``encode_batch_fast`` (no offsets tracked) and the mask from the ids; otherwise, and for any
    text the table cannot place, from the offsets.
    """

    def __init__(self, tokenizer):
        self.backend = tokenizer.backend
        self.table = TokenBytes.for_backend(self.backend)
        fast = getattr(self.backend, "encode_batch_fast", None)
        self._encode = fast if self.table is not None and fast is not None else None

    def encode(self, texts: list[str]):
        if self._encode is not None:
            return self._encode(texts, add_special_tokens=False)
        return self.backend.encode_batch(texts, add_special_tokens=False)

    def labels(self, texts: list[str], spans: list[list[tuple[int, int]]], encodings):
        if self.table is None:
            return _labels_from_offsets(encodings, spans)
        out: list = []
        redo: list[int] = []
        for k, (text, sp, enc) in enumerate(zip(texts, spans, encodings)):
            ids = np.array(enc.ids, dtype=np.int32)
            mask = self.table.labels(text, sp, ids)
            if mask is None:
                redo.append(k)
            out.append((ids, mask))
        if redo:
            again = self.backend.encode_batch([texts[k] for k in redo], add_special_tokens=False)
            for k, pair in zip(redo, _labels_from_offsets(again, [spans[k] for k in redo])):
                out[k] = pair
        return out


# --------------------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------------------


def first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit bin packing in the given order, in ``O(n log n)``: item ``i`` goes into the first
    bin (in opening order) with ``capacity - used >= lengths[i]``. Returns each bin's item indices.

    Raises:
        ValueError: an item is longer than ``capacity``.
    """
    n = len(lengths)
    size = 1
    while size < max(n, 1):
        size *= 2
    # A max-tree of free room over bins; bins not opened yet have full room, and since opened bins
    # come first, the leftmost bin with room is exactly first fit's choice.
    tree = [capacity] * (2 * size)
    bins: list[list[int]] = []
    for i, length in enumerate(lengths):
        if length > capacity:
            raise ValueError(f"item {i} has length {length}; expected at most capacity={capacity}")
        node = 1
        while node < size:
            node = 2 * node if tree[2 * node] >= length else 2 * node + 1
        b = node - size
        if b == len(bins):
            bins.append([])
        bins[b].append(i)
        tree[node] -= length
        node //= 2
        while node:
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
            node //= 2
    return bins


# --------------------------------------------------------------------------------------------------
# Examples backed by arrays
# --------------------------------------------------------------------------------------------------


class ExampleArray(Sequence):
    """A sequence of :class:`~lora.data.Example` over flat arrays (see the module docstring).

    Args:
        tokens: ``(T,)`` int token ids of all conversations.
        mask: ``(T,)`` bool/uint8, 1 where the loss applies.
        offsets: ``(N + 1,)`` int64, conversation ``k`` is ``tokens[offsets[k]:offsets[k + 1]]``.
        members: ``(M,)`` int64 conversation indices; ``member_offsets`` ``(S + 1,)`` int64:
            sequence ``s`` packs ``members[member_offsets[s]:member_offsets[s + 1]]``, in order.
    """

    def __init__(self, tokens, mask, offsets, members, member_offsets):
        self.tokens, self.mask, self.offsets = tokens, mask, offsets
        self.members, self.member_offsets = members, member_offsets

    def __len__(self) -> int:
        return len(self.member_offsets) - 1

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        n = len(self)
        i = int(index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {index} out of range for {n} examples")
        members = self.members[self.member_offsets[i] : self.member_offsets[i + 1]]
        parts = [(int(self.offsets[k]), int(self.offsets[k + 1])) for k in members]
        ids = np.concatenate([self.tokens[a:b] for a, b in parts])
        mask = np.concatenate([self.mask[a:b] for a, b in parts]).astype(bool)
        labels = np.where(mask, ids, IGNORE_INDEX).tolist()
        if len(parts) == 1:
            return Example(ids.tolist(), labels)
        positions = np.concatenate([np.arange(b - a) for a, b in parts]).tolist()
        segments = np.concatenate([np.full(b - a, s) for s, (a, b) in enumerate(parts)]).tolist()
        return Example(ids.tolist(), labels, positions, segments)

    def __iter__(self) -> Iterator[Example]:
        for i in range(len(self)):
            yield self[i]

    def content_sha256(self) -> str:
        """SHA-256 over every sequence's member conversations (their token ids, loss mask and
        length), in order: equal exactly when the sequences (ids, labels, positions, segments)
        are. Reads the arrays in place, without building examples."""
        h = hashlib.sha256()
        offsets, members, bounds = self.offsets, self.members, self.member_offsets
        for s in range(len(self)):
            for k in members[bounds[s] : bounds[s + 1]]:
                a, b = int(offsets[k]), int(offsets[k + 1])
                h.update(np.int64(b - a).tobytes())
                h.update(np.ascontiguousarray(self.tokens[a:b], dtype="<i4").data)
                h.update(np.ascontiguousarray(self.mask[a:b], dtype="u1").data)
            h.update(b"\n")
        return h.hexdigest()

    def lengths(self) -> np.ndarray:
        """``(S,)`` int64 token count of each sequence."""
        conv = np.diff(self.offsets)
        return (
            np.add.reduceat(conv[self.members], self.member_offsets[:-1]) if len(self) else conv[:0]
        )

    def __repr__(self) -> str:
        return f"ExampleArray({len(self)} sequences, {int(self.lengths().sum())} tokens)"


# --------------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------------


class _Sink:
    """Where tokens and masks go as they are made: lists in memory, or raw files on disk."""

    def __init__(self, directory: Path | None):
        self.directory = directory
        self.count = 0
        if directory is None:
            self._ids: list[np.ndarray] = []
            self._mask: list[np.ndarray] = []
        else:
            self._files = {
                "tokens": open(directory / "tokens.bin", "wb"),
                "mask": open(directory / "mask.bin", "wb"),
            }

    def add(self, ids: np.ndarray, mask: np.ndarray) -> None:
        self.count += len(ids)
        if self.directory is None:
            self._ids.append(ids)
            self._mask.append(mask.astype(np.uint8))
        else:
            self._files["tokens"].write(ids.astype("<i4").tobytes())
            self._files["mask"].write(mask.astype(np.uint8).tobytes())

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        if self.directory is None:
            ids = np.concatenate(self._ids) if self._ids else np.zeros(0, np.int32)
            mask = np.concatenate(self._mask) if self._mask else np.zeros(0, np.uint8)
            self._ids = self._mask = []
            return ids, mask
        for f in self._files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()
        return (
            _map(self.directory / "tokens.bin", "<i4", self.count),
            _map(self.directory / "mask.bin", "u1", self.count),
        )


def _map(path: Path, dtype: str, count: int) -> np.ndarray:
    if count == 0:
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


@dataclass
class _Built:
    """What the tokenizing pass found, per valid conversation (in file order, train then eval)."""

    tokens: np.ndarray
    mask: np.ndarray
    offsets: np.ndarray  # (examples + 1,)
    example_of: np.ndarray  # (conversations,) example index, -1 (template error), -2 (dropped)
    truncated: np.ndarray  # (conversations,) bool
    n_train: int  # conversations from the train files; the rest came from the eval files
    parse_errors: list[RecordError] = field(default_factory=list)
    template_errors: dict[int, RecordError] = field(default_factory=dict)
    dropped_sources: dict[int, str] = field(default_factory=dict)
    labels: np.ndarray | None = None  # (examples,) int64 labelled tokens of each kept one

    def labels_per_example(self) -> np.ndarray:
        """``(examples,)`` int64: labelled tokens of each kept conversation (>= 1 token each)."""
        return self.labels


def _progress_bar(progress: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(
        desc=desc, unit=" conv", disable=not (progress and sys.stderr.isatty()), leave=False
    )


def tokenize_files(
    groups, tokenizer, max_seq_length: int, directory: Path | None = None, progress: bool = False
) -> _Built:
    """Read, render, tokenize, label and truncate every conversation of ``groups`` (a list of
    lists of :class:`~lora.data.sources.DataFile`: the train files, then the eval files), in
    batches of :data:`CONVERSATIONS_PER_BATCH`, the tokenizer's batch call doing each batch.

    Raises:
        DataError: a group has no valid record at all.
    """
    from .records import DataError, iter_conversations

    finder = SpanFinder(tokenizer.chat_template, tokenizer.stop_tokens)
    encoder = BatchEncoder(tokenizer)
    sink = _Sink(directory)
    lengths: list[int] = []
    n_labels: list[int] = []  # counted here: a reduceat over the mask would cast it to int64
    example_of: list[int] = []
    truncated: list[bool] = []
    built = _Built(None, None, None, None, None, 0)
    pending: list[tuple[int, Conversation]] = []
    # One batch in flight: batch k's encode_batch runs in `pool` (the Rust call releases the GIL)
    # while this thread labels and stores batch k-1, then reads and renders batch k+1. At most two
    # batches of encodings are alive.
    in_flight: list = []  # [(future, texts, spans, where, count)], at most one

    def render():
        """Render ``pending`` (template errors recorded in order), submit its encode, and store the
        batch before it."""
        if not pending:
            return
        texts, spans, where = [], [], []
        for pos, conv in pending:
            try:
                text, sp = finder(conv.messages)
            except ChatTemplateError as e:
                built.template_errors[pos] = conv.error(str(e))
                example_of[pos] = -1
                continue
            texts.append(text)
            spans.append(sp)
            where.append((pos, conv))
        batch = (texts, spans, where, len(pending))
        pending.clear()
        prev = in_flight.pop() if in_flight else None
        done = prev[0].result() if prev is not None else None  # batch k-1 encoded
        in_flight.append((pool.submit(encoder.encode, texts), *batch))  # batch k starts
        if prev is not None:
            store(done, *prev[1:])  # batch k-1 labelled while batch k encodes

    def drain():
        """Label and store the batch in flight, if any."""
        if in_flight:
            future, *rest = in_flight.pop()
            store(future.result(), *rest)

    def store(encodings, texts, spans, where, count):
        for (pos, conv), (ids, mask) in zip(where, encoder.labels(texts, spans, encodings)):
            if len(ids) > max_seq_length:
                truncated[pos] = True
                ids, mask = ids[:max_seq_length], mask[:max_seq_length]
            if not mask.any():
                example_of[pos] = -2
                built.dropped_sources[pos] = conv.source
                continue
            example_of[pos] = len(lengths)
            lengths.append(len(ids))
            n_labels.append(int(np.count_nonzero(mask)))
            sink.add(ids, mask)
        bar.update(count)

    with _progress_bar(progress, "preparing data") as bar, ThreadPoolExecutor(1) as pool:
        try:
            for g, files in enumerate(groups):
                before = len(example_of)
                for item in iter_conversations(files):
                    if isinstance(item, RecordError):
                        built.parse_errors.append(item)
                        continue
                    pending.append((len(example_of), item))
                    example_of.append(-1)
                    truncated.append(False)
                    if len(pending) >= CONVERSATIONS_PER_BATCH:
                        render()
                render()
                drain()
                if len(example_of) == before:
                    names = ", ".join(str(f) for f in files)
                    errors = [e for e in built.parse_errors if e.path in {str(f) for f in files}]
                    raise DataError(errors, f"no valid record in {names}")
                if g == 0:
                    built.n_train = len(example_of)
        finally:
            for future, *_ in in_flight:
                future.cancel()
    built.tokens, built.mask = sink.finish()
    built.offsets = np.concatenate([[0], np.cumsum(np.asarray(lengths, dtype=np.int64))]).astype(
        np.int64
    )
    built.labels = np.asarray(n_labels, dtype=np.int64)
    built.example_of = np.asarray(example_of, dtype=np.int64)
    built.truncated = np.asarray(truncated, dtype=bool)
    return built


def split_stats(built: _Built, positions: Sequence[int]):
    """:class:`~lora.data.SplitStats` of the conversations at ``positions`` (before packing)."""
    from .dataset import SplitStats

    pos = np.asarray(positions, dtype=np.int64)
    ex = built.example_of[pos] if len(pos) else np.zeros(0, np.int64)
    kept = ex[ex >= 0]
    lengths = np.diff(built.offsets)
    stats = SplitStats()
    stats.conversations = int((ex != -1).sum())
    stats.truncated = int(built.truncated[pos].sum()) if len(pos) else 0
    stats.dropped = int((ex == -2).sum())
    stats.examples = stats.sequences = int(len(kept))
    stats.tokens = int(lengths[kept].sum())
    if len(kept):
        stats.labelled_tokens = int(built.labels_per_example()[kept].sum())
    stats.dropped_sources = [
        built.dropped_sources[int(p)] for p in pos if int(p) in built.dropped_sources
    ]
    return stats, kept


def make_split(
    built: _Built, kept: np.ndarray, packing: bool, max_seq_length: int, shuffle_seed: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """``(members, member_offsets)`` of one split: one conversation per sequence, or first-fit
    packed (after a seeded shuffle when ``shuffle_seed`` is not None, as prepare_chat_data does)."""
    if not packing:
        return kept.astype(np.int64), np.arange(len(kept) + 1, dtype=np.int64)
    order = list(kept.tolist())
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    lengths = np.diff(built.offsets)[order].tolist() if order else []
    bins = first_fit(lengths, max_seq_length)
    members = np.asarray([order[i] for b in bins for i in b], dtype=np.int64)
    member_offsets = np.concatenate(
        [[0], np.cumsum([len(b) for b in bins], dtype=np.int64)]
    ).astype(np.int64)
    return members, member_offsets


# --------------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------------


def _file_fingerprint(path: Path) -> dict:
    st = path.stat()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if st.st_size <= _FULL_HASH_LIMIT:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        else:  # a large file: its edges, with size and mtime for the rest
            h.update(f.read(_EDGE_HASH))
            f.seek(st.st_size - _EDGE_HASH)
            h.update(f.read(_EDGE_HASH))
    return {
        "path": str(path.resolve()),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "sha256": h.hexdigest(),
    }


def cache_key(groups, tokenizer, options: dict) -> tuple[str, dict]:
    """``(key, parts)``: the hex key of prepared data and what it hashes (see the module doc)."""
    tok = hashlib.sha256(tokenizer.backend.to_str().encode("utf-8"))
    tok.update(
        json.dumps(
            {
                "special": tokenizer.special_tokens,
                "stops": tokenizer.stop_tokens,
                "pad": tokenizer.pad_token_id,
            },
            sort_keys=True,
        ).encode("utf-8")
    )
    parts = {
        "version": CACHE_VERSION,
        "data": [[_file_fingerprint(f.path) | {"kind": f.kind} for f in files] for files in groups],
        "tokenizer": tok.hexdigest(),
        "template": hashlib.sha256(tokenizer.chat_template.source.encode("utf-8")).hexdigest(),
        "template_tokens": tokenizer.chat_template.special_tokens,
        **options,
    }
    key = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode("utf-8")).hexdigest()
    return key, parts


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_ARRAY_DTYPES = {
    "tokens": "<i4",
    "mask": "u1",
    "offsets": "<i8",
    "train_members": "<i8",
    "train_member_offsets": "<i8",
    "eval_members": "<i8",
    "eval_member_offsets": "<i8",
}


def write_cache(directory: Path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """Write the arrays not yet on disk and ``manifest.json`` (last, with every array's hash)."""
    entries = {}
    for name, dtype in _ARRAY_DTYPES.items():
        path = directory / f"{name}.bin"
        if name not in ("tokens", "mask"):
            with open(path, "wb") as f:
                f.write(np.ascontiguousarray(arrays[name], dtype=dtype).tobytes())
                f.flush()
                os.fsync(f.fileno())
        entries[name] = {
            "dtype": dtype,
            "length": int(len(arrays[name])),
            "sha256": _sha256_file(path),
        }
    with open(directory / "manifest.json", "w", encoding="utf-8") as f:
        json.dump({**meta, "arrays": entries}, f)
        f.flush()
        os.fsync(f.fileno())


def read_cache(directory: Path, key: str) -> tuple[dict[str, np.ndarray], dict]:
    """The arrays (memory-mapped) and manifest of a cache directory, checked: the key, every
    array's size and SHA-256, the offsets and the sequences' conversation indices.

    Raises:
        ValueError: anything does not check out (the caller rebuilds).
    """
    try:
        meta = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"manifest.json unreadable ({e})") from None
    if not isinstance(meta, dict) or meta.get("key") != key or meta.get("version") != CACHE_VERSION:
        raise ValueError("manifest.json is not for these inputs")
    arrays, entries = {}, {}
    for name, dtype in _ARRAY_DTYPES.items():
        entry = meta.get("arrays", {}).get(name)
        path = directory / f"{name}.bin"
        if not isinstance(entry, dict) or entry.get("dtype") != dtype:
            raise ValueError(f"manifest.json does not describe {name}")
        length = entry.get("length")
        size = length * np.dtype(dtype).itemsize if isinstance(length, int) else -1
        if not path.is_file() or path.stat().st_size != size:
            raise ValueError(f"{path.name} has the wrong size")
        entries[name] = (path, entry, length)
    # hashlib releases the GIL on large buffers: the big arrays hash in parallel
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        digests = dict(zip(entries, pool.map(_sha256_file, [p for p, _, _ in entries.values()])))
    for name, (path, entry, length) in entries.items():
        if digests[name] != entry.get("sha256"):
            raise ValueError(f"{path.name} does not match its hash")
        arrays[name] = _map(path, _ARRAY_DTYPES[name], length)
    tokens, offsets = arrays["tokens"], arrays["offsets"]
    if (
        len(arrays["mask"]) != len(tokens)
        or len(offsets) < 1
        or offsets[0] != 0
        or offsets[-1] != len(tokens)
        or np.any(np.diff(offsets) < 0)
    ):
        raise ValueError("the token offsets are inconsistent")
    for split in ("train", "eval"):
        members, mo = arrays[f"{split}_members"], arrays[f"{split}_member_offsets"]
        if (
            len(mo) < 1
            or mo[0] != 0
            or mo[-1] != len(members)
            or np.any(np.diff(mo) < 1)
            or (len(members) and (members.min() < 0 or members.max() >= len(offsets) - 1))
        ):
            raise ValueError(f"the {split} sequences are inconsistent")
    return arrays, meta


def cache_dir_for(cache_root: Path, key: str) -> Path:
    return Path(cache_root) / f"prepared-{key[:24]}"


def new_build_dir(cache_root: Path, key: str) -> Path:
    """A fresh ``.building-<key>-<pid>`` directory under ``cache_root`` for this process's build.

    Builds left behind by processes that no longer run (killed with SIGKILL: no ``finally`` ran)
    are removed first, whatever their key; a live process's build is left alone."""
    root = Path(cache_root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".building-*-*"):
        pid = stale.name.rpartition("-")[2]
        if stale.is_dir() and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".building-{key[:24]}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (signal 0 checks without sending one)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def publish_build(tmp: Path, final: Path, log: Callable[[str], None] | None = None) -> None:
    """Move a finished build into place (replacing a bad one), and remove other prepared data."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for other in final.parent.glob("prepared-*"):
        if other != final and other.is_dir():
            shutil.rmtree(other, ignore_errors=True)


def stats_to_json(stats) -> dict:
    return asdict(stats)


def errors_to_json(errors: Sequence[RecordError]) -> list:
    return [[e.path, e.line, e.message, e.index] for e in errors]


def errors_from_json(rows) -> list[RecordError]:
    return [RecordError(str(p), line, str(msg), index) for p, line, msg, index in rows]
