"""A checkpoint's tokenizer: ``tokenizer.json`` through the ``tokenizers`` library, plus what
``tokenizer_config.json`` and ``generation_config.json`` say about special tokens and stopping.

Text is always encoded *without* adding special tokens: chat templates write their own (``<s>``,
``<|user|>``, ``<|end|>``, ...) into the text, and special tokens in the text are matched as single
tokens by the ``tokenizers`` library.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers

from .template import ChatTemplate, special_tokens_from_config

__all__ = ["Tokenizer", "END_OF_TURN_TOKENS"]

# Tokens that end an assistant turn or a document in the Phi family; each one that the vocabulary
# has is a stop token, whatever the configs say.
END_OF_TURN_TOKENS = ("<|end|>", "<|endoftext|>")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ValueError(
            f"{str(path)!r} is not a JSON file ({type(e).__name__}: {str(e)[:200]})"
        ) from None
    if not isinstance(value, dict):
        raise ValueError(f"{str(path)!r} holds a JSON {type(value).__name__}; expected an object")
    return value


def _as_id_list(value: Any, what: str) -> list[int]:
    if value is None:
        return []
    if isinstance(value, bool) or not isinstance(value, (int, list)):
        raise ValueError(f"{what}={value!r}; expected a token id or a list of token ids")
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{what}={value!r}; expected a token id or a list of token ids")
    return list(values)


class Tokenizer:
    """Encode/decode text for one checkpoint and render its chat template.

    Args:
        backend: a ``tokenizers.Tokenizer``.
        config: the tokenizer_config.json dict (special tokens, ``chat_template``); may be empty.
        generation_config: the generation_config.json dict (``eos_token_id`` may list stop ids).
        chat_template: overrides the template found in ``config``.

    Raises:
        ValueError: a special token named in ``config`` is not in the vocabulary.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        config: Mapping[str, Any] | None = None,
        generation_config: Mapping[str, Any] | None = None,
        chat_template: ChatTemplate | None = None,
    ):
        self.backend = backend
        self.config = dict(config or {})
        self.generation_config = dict(generation_config or {})
        self.special_tokens: dict[str, Any] = special_tokens_from_config(self.config)
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            token = self.special_tokens.get(key)
            if token is not None and self.backend.token_to_id(token) is None:
                raise ValueError(f"tokenizer_config {key}={token!r} is not in the vocabulary")
        # The template sees the config's special tokens as variables, as transformers passes them.
        self.chat_template = (
            chat_template
            if chat_template is not None
            else ChatTemplate.from_tokenizer_config(config or {})
        )

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> Tokenizer:
        """Load ``directory/tokenizer.json`` with its tokenizer_config.json and generation_config.json.

        Raises:
            FileNotFoundError: there is no ``tokenizer.json`` in ``directory``.
            ValueError: a config file is not a JSON object, or names a token the vocabulary lacks.
        """
        directory = Path(directory)
        tokenizer_file = directory / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(
                f"no tokenizer.json in {str(directory)!r}; expected a checkpoint directory"
            )
        try:
            backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # the Rust side raises a bare Exception for any malformed file
            raise ValueError(
                f"{str(tokenizer_file)!r} is not a readable tokenizer file ({str(e)[:200]})"
            ) from None
        config = _read_json(directory / "tokenizer_config.json")
        if not config:
            # Older checkpoints keep the special tokens in a separate file.
            config = _read_json(directory / "special_tokens_map.json")
        generation_config = _read_json(directory / "generation_config.json")
        template = ChatTemplate.from_tokenizer_config(config, directory)
        return cls(backend, config, generation_config, chat_template=template)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``tokenizer.json``, ``tokenizer_config.json`` (with ``chat_template``) and, if there
        is one, ``generation_config.json`` into ``directory`` (created if missing), atomically."""
        from .._io import atomic_write_bytes, atomic_write_json

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(
            directory / "tokenizer.json", self.backend.to_str(pretty=True).encode("utf-8")
        )
        config = dict(self.config)
        config["chat_template"] = self.chat_template.source
        atomic_write_json(directory / "tokenizer_config.json", config)
        if self.generation_config:
            atomic_write_json(directory / "generation_config.json", self.generation_config)

    # ---- vocabulary -------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (``max id + 1``)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def _id_of(self, key: str) -> int | None:
        token = self.special_tokens.get(key)
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    @property
    def pad_token(self) -> str | None:
        return self.special_tokens.get("pad_token")

    @property
    def bos_token_id(self) -> int | None:
        return self._id_of("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        """The id of tokenizer_config's ``eos_token``, else the first of generation_config's."""
        token_id = self._id_of("eos_token")
        if token_id is None:
            ids = _as_id_list(
                self.generation_config.get("eos_token_id"), "generation_config eos_token_id"
            )
            token_id = ids[0] if ids else None
        return token_id

    @property
    def pad_token_id(self) -> int:
        """``pad_token``'s id, else generation_config's ``pad_token_id``, else ``eos_token_id``, else 0.

        Padding is always masked out of attention and loss, so its id only has to be a valid one.
        """
        for candidate in (
            self._id_of("pad_token"),
            self.generation_config.get("pad_token_id"),
            self.eos_token_id,
        ):
            if isinstance(candidate, int) and not isinstance(candidate, bool):
                return candidate
        return 0

    @property
    def stop_token_ids(self) -> list[int]:
        """Ids that end generation: ``eos_token``, generation_config's ``eos_token_id`` (int or list),
        and ``<|end|>`` / ``<|endoftext|>`` where the vocabulary has them; in that order, no repeats."""
        ids: list[int] = []
        if self._id_of("eos_token") is not None:
            ids.append(self._id_of("eos_token"))
        ids += _as_id_list(
            self.generation_config.get("eos_token_id"), "generation_config eos_token_id"
        )
        ids += [
            i for i in (self.backend.token_to_id(t) for t in END_OF_TURN_TOKENS) if i is not None
        ]
        return list(dict.fromkeys(ids))

    @property
    def stop_tokens(self) -> list[str]:
        """The strings of :attr:`stop_token_ids`."""
        return [
            t for t in (self.backend.id_to_token(i) for i in self.stop_token_ids) if t is not None
        ]

    # ---- text <-> ids -----------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no special token is added (the text carries its own)."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of ``text`` and, for each, its ``(start, end)`` character span in ``text``."""
        encoding = self.backend.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets

    def encode_batch_with_offsets(
        self, texts: Sequence[str]
    ) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """:meth:`encode_with_offsets` for many texts at once (the library parallelises it)."""
        return [
            (e.ids, e.offsets)
            for e in self.backend.encode_batch(list(texts), add_special_tokens=False)
        ]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (a list, or a 1-D tensor)."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # ---- chat -------------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = False,
        tokenize: bool = True,
    ) -> list[int] | str:
        """Render ``messages`` with the chat template; token ids if ``tokenize`` else the text.

        Raises:
            ChatTemplateError: the template failed to render.
        """
        text = self.chat_template.render(messages, add_generation_prompt=add_generation_prompt)
        return self.encode(text) if tokenize else text

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, eos_token={self.eos_token!r}, "
            f"stop_token_ids={self.stop_token_ids})"
        )
