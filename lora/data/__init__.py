"""Chat data for fine-tuning: records, chat templates, tokenization, label masks, packing.

The pipeline, in the order data flows (one module each):

- :mod:`.sources`: files, directories, globs and ``DIR:SPLIT`` -> the files to read (JSONL, JSON,
  parquet, arrow / ``datasets.save_to_disk``).
- :mod:`.records`: records of ``messages``, ShareGPT ``conversations`` or alpaca -> validated
  :class:`Conversation` objects; malformed records reported with file and line
  (:class:`DataError`, :class:`RecordError`); the seeded held-out split.
- :mod:`.template`: the checkpoint's Jinja chat template, sandboxed (:class:`ChatTemplate`).
- :mod:`.tokenizer`: the checkpoint's ``tokenizer.json`` and special/stop tokens (:class:`Tokenizer`).
- :mod:`.labels`: render + tokenize one conversation; labels on assistant tokens only.
- :mod:`.packing`: truncation, packing, padding and attention masks (:func:`collate`).
- :mod:`.prepared`: batched tokenization into flat arrays (:class:`ExampleArray`), fast packing,
  the prepared-data cache.
- :mod:`.dataset`: all of the above in one call (:func:`prepare_chat_data`).

This package depends on torch, numpy, tokenizers and jinja2 only (pyarrow for parquet, optional); it knows nothing of models or layers.
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
from .prepared import ExampleArray
from .records import (
    ROLES,
    Conversation,
    DataError,
    RecordError,
    iter_conversations,
    load_conversations,
    parse_record,
    split_train_eval,
)
from .sources import DataFile, resolve_data_files
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
    "iter_conversations",
    "ExampleArray",
    "DataFile",
    "resolve_data_files",
]
