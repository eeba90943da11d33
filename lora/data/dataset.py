"""The whole data pipeline in one call: files -> validated conversations -> train/eval split ->
tokenized and labelled examples -> truncated -> (packed) -> ready for a DataLoader.

    data = prepare_chat_data("train.jsonl", tokenizer, max_seq_length=512, eval_fraction=0.05)
    print(data.summary())
    loader = DataLoader(data.train, batch_size=8, shuffle=True, collate_fn=data.collate_fn())
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .labels import tokenize_conversation
from .packing import Example, collate, make_collate_fn, truncate
from .records import Conversation, DataError, RecordError, check_on_error, split_train_eval
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
            text += (
                f"; {self.dropped} dropped: no assistant token left within max_seq_length={max_seq_length} "
                f"(first: {', '.join(self.dropped_sources[:3])})"
            )
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
        train, eval: the examples (packed sequences if ``packed``), indexable sequences of
            :class:`Example` (built on access from flat arrays); ``eval`` may be empty.
        errors: every malformed record that was skipped (empty when ``on_error="raise"``).
        train_stats, eval_stats: counts, see :class:`SplitStats`.
        packed: whether sequences hold several conversations (the collate function then returns
            the 4-D mask).
        pad_token_id, max_seq_length: as used.
    """

    train: Sequence[Example]
    eval: Sequence[Example]
    errors: list[RecordError]
    train_stats: SplitStats
    eval_stats: SplitStats
    packed: bool
    pad_token_id: int
    max_seq_length: int

    def collate_fn(
        self, pad_to_multiple_of: int | None = None
    ) -> Callable[[Sequence[Example]], dict]:
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
            lines.append(
                f"skipped {n} malformed record{'s' if n != 1 else ''} (on_error='skip'); first: {self.errors[0]}"
            )
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
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> ChatData:
    """Read, check, split, tokenize, label, truncate and (optionally) pack chat data.

    Conversations are read as a stream, rendered, and tokenized in batches by the tokenizer's
    batch call; tokens go into flat arrays (:class:`~lora.data.prepared.ExampleArray`), so memory
    is ~5 bytes a token. The result is the same as tokenizing each conversation with
    :func:`~lora.data.tokenize_conversation`.

    Args:
        train_file: data spec(s): files, directories, globs, ``DIR:SPLIT`` (see
            :mod:`lora.data.sources`) of ``messages``, ShareGPT ``conversations`` or alpaca records,
            in JSONL, JSON, parquet or arrow.
        tokenizer: a :class:`lora.data.Tokenizer` (its chat template renders the conversations).
        max_seq_length: longest sequence; longer conversations are cut from the right.
        eval_file: held-out data spec(s); if given, ``eval_fraction`` must be 0.
        eval_fraction: else, the fraction of ``train_file``'s conversations held out, chosen by
            ``seed`` (see :func:`split_train_eval`).
        seed: the split's seed, and the order in which training conversations are packed.
        packing: pack several conversations into each ``max_seq_length`` sequence.
        on_error: ``"raise"``: any malformed record (bad JSON, bad fields, or a conversation the chat
            template cannot render) raises one :class:`DataError` listing all of them, before any
            training; ``"skip"``: they are left out and returned in ``ChatData.errors``.
        cache_dir: if given, prepared data is kept there (``prepared-<key>/``, see
            :mod:`lora.data.prepared`) and reused when the data files, tokenizer, template,
            ``max_seq_length`` and the options above are the same; anything else rebuilds.
        progress: show a progress bar (on a terminal only).
        log: where a line about the cache goes (hit, rebuilt because unusable).

    Raises:
        ValueError: a bad argument (``on_error``, ``eval_fraction``, both ``eval_file`` and
            ``eval_fraction``, ``max_seq_length``, a data spec).
        FileNotFoundError: a data file is missing.
        ImportError: parquet/arrow data without pyarrow (``pip install lora[data]``).
        DataError: malformed records with ``on_error="raise"``; or no training example left.
    """
    from . import prepared as P
    from .sources import resolve_data_files

    check_on_error(on_error)
    if eval_file is not None and eval_fraction:
        raise ValueError(
            f"eval_file={eval_file!r} and eval_fraction={eval_fraction}; "
            "expected one of them, not both"
        )
    if not isinstance(max_seq_length, int) or max_seq_length < 2:
        raise ValueError(f"max_seq_length={max_seq_length!r}; expected an int >= 2")
    if not (0.0 <= eval_fraction < 1.0):
        raise ValueError(f"eval_fraction={eval_fraction!r}; expected a number in [0, 1)")
    groups = [resolve_data_files(train_file)]
    if eval_file is not None:
        groups.append(resolve_data_files(eval_file))
    say = log or (lambda line: None)
    options = {
        "max_seq_length": max_seq_length,
        "eval_fraction": eval_fraction,
        "seed": seed,
        "packing": bool(packing),
        "on_error": on_error,
        "eval_file": eval_file is not None,
    }
    if cache_dir is not None:
        key, _ = P.cache_key(groups, tokenizer, options)
        final = P.cache_dir_for(Path(cache_dir), key)
        if final.exists():
            try:
                arrays, meta = P.read_cache(final, key)
            except ValueError as e:
                say(f"data cache {final} is unusable ({e}); rebuilding it")
            else:
                say(f"prepared data from the cache {final}")
                return _chat_data_from_arrays(arrays, meta, tokenizer, max_seq_length)
        build_dir = P.new_build_dir(Path(cache_dir), key)
    else:
        key, build_dir = "", None
    try:
        built = P.tokenize_files(groups, tokenizer, max_seq_length, build_dir, progress=progress)
        # Every problem is reported at once, before any split: records that do not parse, and
        # conversations the template cannot render.
        if built.parse_errors and on_error == "raise":
            template = [built.template_errors[p] for p in sorted(built.template_errors)]
            raise DataError(built.parse_errors + template)
        n_all = len(built.example_of)
        train_pos: Sequence[int] = range(built.n_train)
        eval_pos: Sequence[int] = range(built.n_train, n_all)
        if eval_file is None and eval_fraction:
            train_pos, eval_pos = split_train_eval(range(built.n_train), eval_fraction, seed)
        errors = built.parse_errors + [
            built.template_errors[p]
            for p in list(train_pos) + list(eval_pos)
            if p in built.template_errors
        ]
        if errors and on_error == "raise":
            raise DataError(errors)
        train_stats, train_kept = P.split_stats(built, train_pos)
        eval_stats, eval_kept = P.split_stats(built, eval_pos)
        if not len(train_kept):
            raise DataError(
                errors,
                f"no training example left out of {train_stats.conversations} "
                f"conversations ({train_stats.dropped} dropped by "
                f"max_seq_length={max_seq_length})",
            )
        train_m, train_mo = P.make_split(built, train_kept, packing, max_seq_length, seed)
        eval_m, eval_mo = P.make_split(built, eval_kept, packing, max_seq_length, None)
        train_stats.sequences, eval_stats.sequences = len(train_mo) - 1, len(eval_mo) - 1
        arrays = {
            "tokens": built.tokens,
            "mask": built.mask,
            "offsets": built.offsets,
            "train_members": train_m,
            "train_member_offsets": train_mo,
            "eval_members": eval_m,
            "eval_member_offsets": eval_mo,
        }
        meta = {
            "version": P.CACHE_VERSION,
            "key": key,
            "packed": bool(packing),
            "train_stats": asdict(train_stats),
            "eval_stats": asdict(eval_stats),
            "errors": P.errors_to_json(errors),
        }
        if build_dir is not None:
            P.write_cache(build_dir, arrays, meta)
            P.publish_build(build_dir, final)
            build_dir = None
    finally:
        if build_dir is not None:
            shutil.rmtree(build_dir, ignore_errors=True)
    return _chat_data_from_arrays(arrays, meta, tokenizer, max_seq_length)


def _chat_data_from_arrays(arrays: dict, meta: dict, tokenizer, max_seq_length: int) -> ChatData:
    from .prepared import ExampleArray, errors_from_json

    def split(name):
        return ExampleArray(
            arrays["tokens"],
            arrays["mask"],
            arrays["offsets"],
            arrays[f"{name}_members"],
            arrays[f"{name}_member_offsets"],
        )

    return ChatData(
        split("train"),
        split("eval"),
        errors_from_json(meta["errors"]),
        SplitStats(**meta["train_stats"]),
        SplitStats(**meta["eval_stats"]),
        bool(meta["packed"]),
        tokenizer.pad_token_id,
        max_seq_length,
    )
