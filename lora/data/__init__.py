"""Chat data for fine-tuning: records, chat templates, tokenization, label masks, packing.

The pipeline, in the order data flows (one module each):

- :mod:`.records`: JSONL / JSON-list files of ``messages`` or alpaca records -> validated
  :class:`Conversation` objects; malformed records reported with file and line
  (:class:`DataError`, :class:`RecordError`); the seeded held-out split.
- :mod:`.template`: the checkpoint's Jinja chat template, sandboxed (:class:`ChatTemplate`).
- :mod:`.tokenizer`: the checkpoint's ``tokenizer.json`` and special/stop tokens (:class:`Tokenizer`).
- :mod:`.labels`: render + tokenize one conversation; labels on assistant tokens only.
- :mod:`.packing`: truncation, packing, padding and attention masks (:func:`collate`).
- :mod:`.dataset`: all of the above in one call (:func:`prepare_chat_data`).

This package depends on torch, tokenizers and jinja2 only; it knows nothing of models or layers.
"""

from .dataset import ChatData, SplitStats, build_examples, prepare_chat_data
from .labels import (
    IGNORE_INDEX,
    TokenizedConversation,
    assistant_spans,
    labels_from_spans,
    tokenize_conversation,
)
from .packing import (
    Example,
    collate,
    make_collate_fn,
    pack_examples,
    packed_attention_mask,
    truncate,
)
from .records import (
    ROLES,
    Conversation,
    DataError,
    RecordError,
    load_conversations,
    parse_record,
    split_train_eval,
)
from .template import PHI3_CHAT_TEMPLATE, ChatTemplate, ChatTemplateError, select_chat_template
from .tokenizer import Tokenizer

__all__ = [
    "ROLES",
    "IGNORE_INDEX",
    "PHI3_CHAT_TEMPLATE",
    "Conversation",
    "RecordError",
    "DataError",
    "load_conversations",
    "parse_record",
    "split_train_eval",
    "ChatTemplate",
    "ChatTemplateError",
    "select_chat_template",
    "Tokenizer",
    "TokenizedConversation",
    "assistant_spans",
    "labels_from_spans",
    "tokenize_conversation",
    "Example",
    "truncate",
    "pack_examples",
    "packed_attention_mask",
    "collate",
    "make_collate_fn",
    "SplitStats",
    "ChatData",
    "build_examples",
    "prepare_chat_data",
]
