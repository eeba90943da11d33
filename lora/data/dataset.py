"""The whole data pipeline in one call: files -> validated conversations -> train/eval split ->
tokenized and labelled examples -> truncated -> (packed) -> ready for a DataLoader.

    data = prepare_chat_data("train.jsonl", tokenizer, max_seq_length=512, eval_fraction=0.05)
    print(data.summary())
    loader = DataLoader(data.train, batch_size=8, shuffle=True, collate_fn=data.collate_fn())
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from .labels import tokenize_conversation
from .packing import Example, collate, make_collate_fn, pack_examples, truncate
from .records import (
    Conversation,
    DataError,
    RecordError,
    check_on_error,
    load_conversations,
    split_train_eval,
)
from .template import ChatTemplateError

__all__ = ["SplitStats", "ChatData", "build_examples", "prepare_chat_data"]


@dataclass
class SplitStats:
    """What happened to one split's conversations.

    ``conversations``: valid ones tokenized; ``truncated``: cut to ``max_seq_length`` (kept if a
    labelled token survived); ``dropped``: no labelled token left after truncation (left out);
    ``examples``: kept; ``sequences``: after packing (= examples when not packed); ``tokens`` and
    ``labelled_tokens``: totals over the kept examples. ``dropped_sources``: where the dropped ones
    came from.
    """

    conversations: int = 0
    truncated: int = 0
    dropped: int = 0
    examples: int = 0
    sequences: int = 0
    tokens: int = 0
    labelled_tokens: int = 0
    dropped_sources: list[str] = field(default_factory=list)

    def describe(self, name: str, max_seq_length: int) -> str:
        text = f"{name}: {self.examples} examples from {self.conversations} conversations"
        if self.sequences != self.examples:
            text += f", packed into {self.sequences} sequences"
        text += f"; {self.tokens} tokens, {self.labelled_tokens} with loss"
        if self.truncated:
            text += f"; {self.truncated} truncated to max_seq_length={max_seq_length}"
        if self.dropped:
            text += (f"; {self.dropped} dropped: no assistant token left within max_seq_length={max_seq_length} "
                     f"(first: {', '.join(self.dropped_sources[:3])})")
        return text


def build_examples(
    conversations: Iterable[Conversation],
    tokenizer,
    max_seq_length: int,
) -> tuple[list[Example], list[RecordError], SplitStats]:
    """Tokenize, label and truncate conversations (from the right, to ``max_seq_length`` tokens).

    Args:
        conversations: validated conversations (from :func:`load_conversations`).
        tokenizer: a :class:`lora.data.Tokenizer`.
        max_seq_length: the longest sequence kept.

    Returns:
        ``(examples, errors, stats)``: one :class:`Example` per conversation that still has a
        labelled token after truncation; a :class:`RecordError` for each conversation the chat
        template could not render; what was truncated and dropped.

    Raises:
        ValueError: ``max_seq_length < 2``.
    """
    if not isinstance(max_seq_length, int) or max_seq_length < 2:
        raise ValueError(f"max_seq_length={max_seq_length!r}; expected an int >= 2")
    examples: list[Example] = []
    errors: list[RecordError] = []
    stats = SplitStats()
    for conv in conversations:
        try:
            tokenized = tokenize_conversation(conv.messages, tokenizer)
        except ChatTemplateError as e:
            errors.append(conv.error(str(e)))
            continue
        stats.conversations += 1
        example = Example(tokenized.input_ids, tokenized.labels)
        if len(example) > max_seq_length:
            stats.truncated += 1
            example = truncate(example, max_seq_length)
        if example.num_labels == 0:
            stats.dropped += 1
            stats.dropped_sources.append(conv.source)
            continue
        examples.append(example)
        stats.tokens += len(example)
        stats.labelled_tokens += example.num_labels
    stats.examples = stats.sequences = len(examples)
    return examples, errors, stats


@dataclass
class ChatData:
    """Prepared training data.

    Attributes:
        train, eval: the examples (packed sequences if ``packed``); ``eval`` may be empty.
        errors: every malformed record that was skipped (empty when ``on_error="raise"``).
        train_stats, eval_stats: counts, see :class:`SplitStats`.
        packed: whether sequences hold several conversations (the collate function then returns
            the 4-D mask).
        pad_token_id, max_seq_length: as used.
    """

    train: list[Example]
    eval: list[Example]
    errors: list[RecordError]
    train_stats: SplitStats
    eval_stats: SplitStats
    packed: bool
    pad_token_id: int
    max_seq_length: int

    def collate_fn(self, pad_to_multiple_of: int | None = None) -> Callable[[Sequence[Example]], dict]:
        """The batch function for these examples (see :func:`lora.data.collate`)."""
        return make_collate_fn(self.pad_token_id, self.packed, pad_to_multiple_of)

    def collate(self, examples: Sequence[Example]) -> dict:
        return collate(examples, self.pad_token_id, self.packed)

    def summary(self) -> str:
        """A few lines for the training log: sizes, truncation, drops, skipped records."""
        lines = [self.train_stats.describe("train", self.max_seq_length)]
        if self.eval or self.eval_stats.conversations:
            lines.append(self.eval_stats.describe("eval", self.max_seq_length))
        if self.errors:
            n = len(self.errors)
            lines.append(f"skipped {n} malformed record{'s' if n != 1 else ''} (on_error='skip'); first: {self.errors[0]}")
        return "\n".join(lines)


def prepare_chat_data(
    train_file: str | os.PathLike | Sequence[str | os.PathLike],
    tokenizer,
    max_seq_length: int,
    eval_file: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    eval_fraction: float = 0.0,
    seed: int = 0,
    packing: bool = False,
    on_error: str = "raise",
) -> ChatData:
    """Read, check, split, tokenize, label, truncate and (optionally) pack chat data.

    Args:
        train_file: JSONL or JSON-list file(s) of ``messages`` or alpaca records.
        tokenizer: a :class:`lora.data.Tokenizer` (its chat template renders the conversations).
        max_seq_length: longest sequence; longer conversations are cut from the right.
        eval_file: held-out file(s); if given, ``eval_fraction`` must be 0.
        eval_fraction: else, the fraction of ``train_file``'s conversations held out, chosen by
            ``seed`` (see :func:`split_train_eval`).
        seed: the split's seed, and the order in which training conversations are packed.
        packing: pack several conversations into each ``max_seq_length`` sequence.
        on_error: ``"raise"``: any malformed record (bad JSON, bad fields, or a conversation the chat
            template cannot render) raises one :class:`DataError` listing all of them, before any
            training; ``"skip"``: they are left out and returned in ``ChatData.errors``.

    Raises:
        ValueError: a bad argument (``on_error``, ``eval_fraction``, both ``eval_file`` and
            ``eval_fraction``, ``max_seq_length``).
        FileNotFoundError: a data file is missing.
        DataError: malformed records with ``on_error="raise"``; or no training example left.
    """
    check_on_error(on_error)
    if eval_file is not None and eval_fraction:
        raise ValueError(f"eval_file={eval_file!r} and eval_fraction={eval_fraction}; expected one of them, not both")
    if not isinstance(max_seq_length, int) or max_seq_length < 2:
        raise ValueError(f"max_seq_length={max_seq_length!r}; expected an int >= 2")
    # Every problem is reported at once: records that do not parse, and conversations the template
    # cannot render. With "raise" this happens before the split, which could fail on what is left.
    train_convs, errors = load_conversations(train_file, on_error="skip")
    eval_convs: list[Conversation] = []
    if eval_file is not None:
        eval_convs, eval_errors = load_conversations(eval_file, on_error="skip")
        errors += eval_errors
    if errors and on_error == "raise":
        _, template_errors, _ = build_examples(train_convs + eval_convs, tokenizer, max_seq_length)
        raise DataError(errors + template_errors)
    if eval_file is None and eval_fraction:
        train_convs, eval_convs = split_train_eval(train_convs, eval_fraction, seed)

    train, train_errors, train_stats = build_examples(train_convs, tokenizer, max_seq_length)
    evals, eval_errors, eval_stats = build_examples(eval_convs, tokenizer, max_seq_length)
    errors += train_errors + eval_errors
    if errors and on_error == "raise":
        raise DataError(errors)
    if not train:
        raise DataError(errors, f"no training example left out of {train_stats.conversations} conversations "
                                f"({train_stats.dropped} dropped by max_seq_length={max_seq_length})")
    if packing:
        random.Random(seed).shuffle(train)
        train = pack_examples(train, max_seq_length)
        evals = pack_examples(evals, max_seq_length)
        train_stats.sequences, eval_stats.sequences = len(train), len(evals)
    return ChatData(train, evals, errors, train_stats, eval_stats, packing, tokenizer.pad_token_id, max_seq_length)
