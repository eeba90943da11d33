"""Training examples, truncation, packing and batching.

An :class:`Example` is one training sequence: one conversation, or several packed together. Each
token carries the index of the conversation it belongs to (``segment_ids``) and its position inside
that conversation (``position_ids``, restarting at 0 for each one).

Batches (:func:`collate`) are right-padded; padding has label -100. The attention mask is

- unpacked: ``(batch, seq)`` 0/1 ints, 1 on real tokens, as Hugging Face models take it;
- packed: ``(batch, 1, seq, seq)`` booleans, True where query ``i`` may attend key ``j`` because both
  belong to the same conversation. The model ANDs its causal mask onto it. Padding is its own
  "conversation": no real token attends a pad and no pad is attended by a real token, but a pad
  query attends the pads (hence at least itself), so that no attention row is all False, which
  would make softmax return NaN and poison the backward pass even though those positions carry no
  loss.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .labels import IGNORE_INDEX

__all__ = [
    "Example",
    "truncate",
    "pack_examples",
    "collate",
    "make_collate_fn",
    "packed_attention_mask",
]


@dataclass
class Example:
    """One training sequence.

    Attributes:
        input_ids: token ids, length ``L``.
        labels: ``input_ids`` where the loss applies, -100 elsewhere; length ``L``.
        position_ids: position of each token inside its conversation; length ``L``.
        segment_ids: which packed conversation each token belongs to (0, 1, ...); all 0 if unpacked.
    """

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int] | None = None
    segment_ids: list[int] | None = None

    def __post_init__(self):
        n = len(self.input_ids)
        if self.position_ids is None:
            self.position_ids = list(range(n))
        if self.segment_ids is None:
            self.segment_ids = [0] * n
        for name in ("labels", "position_ids", "segment_ids"):
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"Example.{name} has length {len(getattr(self, name))}; "
                    f"expected len(input_ids)={n}"
                )

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_labels(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)

    @property
    def num_conversations(self) -> int:
        return (self.segment_ids[-1] + 1) if self.segment_ids else 0


def truncate(example: Example, max_seq_length: int) -> Example:
    """The first ``max_seq_length`` tokens of ``example`` (itself if already short enough).

    Raises:
        ValueError: ``max_seq_length < 1``.
    """
    if max_seq_length < 1:
        raise ValueError(f"max_seq_length={max_seq_length}; expected a positive int")
    if len(example) <= max_seq_length:
        return example
    m = max_seq_length
    return Example(
        example.input_ids[:m], example.labels[:m], example.position_ids[:m], example.segment_ids[:m]
    )


def pack_examples(examples: Sequence[Example], max_seq_length: int) -> list[Example]:
    """Pack single-conversation examples into sequences of at most ``max_seq_length`` tokens.

    First fit in the given order: each example goes into the first open sequence with room for it
    (so the result depends only on the input order, which the caller shuffles or not). Inside a
    sequence, conversations keep their order; each gets the next segment id and its own positions
    restarting at 0. Every token of every example appears exactly once, labels unchanged.

    Args:
        examples: unpacked examples, each at most ``max_seq_length`` long (truncate first).
        max_seq_length: capacity of one packed sequence.

    Raises:
        ValueError: ``max_seq_length < 1``, or an example is longer than ``max_seq_length`` or is
            itself already packed.
    """
    if max_seq_length < 1:
        raise ValueError(f"max_seq_length={max_seq_length}; expected a positive int")
    for i, ex in enumerate(examples):
        if len(ex) > max_seq_length:
            raise ValueError(
                f"examples[{i}] has {len(ex)} tokens; expected at most max_seq_length={max_seq_length} "
                "(truncate before packing)"
            )
        if ex.num_conversations > 1:
            raise ValueError(
                f"examples[{i}] is already packed ({ex.num_conversations} conversations)"
            )
    from .prepared import first_fit  # O(n log n); the same choices as scanning the open sequences

    bins = [
        [examples[i] for i in b] for b in first_fit([len(ex) for ex in examples], max_seq_length)
    ]
    packed = []
    for members in bins:
        ids, labels, positions, segments = [], [], [], []
        for s, ex in enumerate(members):
            ids += ex.input_ids
            labels += ex.labels
            positions += range(len(ex))
            segments += [s] * len(ex)
        packed.append(Example(ids, labels, positions, segments))
    return packed


def packed_attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """``(batch, 1, seq, seq)`` bool mask from ``(batch, seq)`` segment ids: True where the query
    and key tokens share a segment (padding must carry a segment id of its own, e.g. -1)."""
    return (segment_ids[:, :, None] == segment_ids[:, None, :]).unsqueeze(1)


def collate(
    examples: Sequence[Example],
    pad_token_id: int,
    packed: bool = False,
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """Right-pad ``examples`` into a batch.

    Args:
        examples: at least one :class:`Example`.
        pad_token_id: id written into padded ``input_ids`` positions.
        packed: return the 4-D block-diagonal mask (required when an example holds several
            conversations), else the 2-D 0/1 mask.
        pad_to_multiple_of: round the padded length up to a multiple of this.

    Returns:
        ``input_ids``, ``labels``, ``position_ids``: ``(B, S)`` int64; ``attention_mask``: ``(B, S)``
        int64 0/1 if not ``packed``, else ``(B, 1, S, S)`` bool. Padding: label -100, position 0.

    Raises:
        ValueError: ``examples`` is empty, or an example holds several conversations while
            ``packed`` is False (a 2-D mask would let them attend to each other).
    """
    if not examples:
        raise ValueError("examples is empty; expected at least one Example")
    width = max(len(e) for e in examples)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    batch = len(examples)
    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((batch, width), dtype=torch.long)
    segment_ids = torch.full((batch, width), -1, dtype=torch.long)
    for b, ex in enumerate(examples):
        if not packed and ex.num_conversations > 1:
            raise ValueError(
                f"examples[{b}] packs {ex.num_conversations} conversations but packed=False; "
                "expected packed=True so that they are kept apart by the attention mask"
            )
        n = len(ex)
        input_ids[b, :n] = torch.tensor(ex.input_ids, dtype=torch.long)
        labels[b, :n] = torch.tensor(ex.labels, dtype=torch.long)
        position_ids[b, :n] = torch.tensor(ex.position_ids, dtype=torch.long)
        segment_ids[b, :n] = torch.tensor(ex.segment_ids, dtype=torch.long)
    if packed:
        attention_mask = packed_attention_mask(segment_ids)
    else:
        attention_mask = (segment_ids >= 0).long()
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
    }


def make_collate_fn(
    pad_token_id: int, packed: bool = False, pad_to_multiple_of: int | None = None
) -> Callable[[Sequence[Example]], dict[str, torch.Tensor]]:
    """:func:`collate` with its options bound, for ``DataLoader(collate_fn=...)`` (picklable)."""
    return functools.partial(
        collate, pad_token_id=pad_token_id, packed=packed, pad_to_multiple_of=pad_to_multiple_of
    )
