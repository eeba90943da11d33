"""Chat templates: the checkpoint's own Jinja template, rendered the way transformers renders it.

A checkpoint's ``tokenizer_config.json`` carries ``chat_template``: a Jinja string, or a list of
``{"name", "template"}`` entries of which ``"default"`` is the one used for chat (some checkpoints
also store it in a ``chat_template.jinja`` file next to the config). Templates are untrusted code
from the Hub, so they run in Jinja's immutable sandbox, with the same environment transformers
builds (``trim_blocks``, ``lstrip_blocks``, ``loopcontrols``, ``raise_exception``, ``strftime_now``,
a non-escaping ``tojson``, and a ``{% generation %}`` block that renders its body). The variables are
``messages``, ``add_generation_prompt``, ``tools=None``, ``documents=None`` and the tokenizer's special
tokens (``bos_token``, ``eos_token``, ...).

Without a template, Phi-3's format is used (:data:`PHI3_CHAT_TEMPLATE`).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = [
    "PHI3_CHAT_TEMPLATE",
    "SPECIAL_TOKEN_KEYS",
    "ChatTemplate",
    "ChatTemplateError",
    "select_chat_template",
    "special_tokens_from_config",
    "token_content",
]

# microsoft/Phi-3-mini-4k-instruct, tokenizer_config.json (the revision without a leading bos_token).
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# tokenizer_config.json keys whose values are passed to the template under the same name.
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


class ChatTemplateError(ValueError):
    """A chat template failed to compile or to render (including its own ``raise_exception``)."""


def token_content(token: Any) -> str | None:
    """The text of a special token as tokenizer_config stores it: a string, or an AddedToken dict.

    Raises:
        ValueError: ``token`` is neither ``None``, a string, nor a dict with a string ``"content"``.
    """
    if token is None or isinstance(token, str):
        return token
    if isinstance(token, Mapping) and isinstance(token.get("content"), str):
        return token["content"]
    raise ValueError(f"special token {token!r}; expected a string or an object with a string 'content'")


def special_tokens_from_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The template variables a tokenizer_config provides: its special tokens, as strings.

    ``additional_special_tokens`` (a list) is passed through as a list of strings when present.
    """
    out: dict[str, Any] = {}
    for key in SPECIAL_TOKEN_KEYS:
        value = token_content(config.get(key))
        if value is not None:
            out[key] = value
    extra = config.get("additional_special_tokens")
    if isinstance(extra, list):
        out["additional_special_tokens"] = [token_content(t) for t in extra]
    return out


def select_chat_template(chat_template: Any, name: str = "default") -> str:
    """Pick the template string out of tokenizer_config's ``chat_template`` value.

    Args:
        chat_template: a string, or a list of ``{"name": str, "template": str}`` entries.
        name: which entry of a list to take.

    Raises:
        ValueError: ``chat_template`` has another type, an entry is malformed, or no entry is named
            ``name`` (the available names are listed).
    """
    if isinstance(chat_template, str):
        return chat_template
    if isinstance(chat_template, list):
        named: dict[str, str] = {}
        for i, entry in enumerate(chat_template):
            if not (isinstance(entry, Mapping) and isinstance(entry.get("name"), str)
                    and isinstance(entry.get("template"), str)):
                raise ValueError(f"chat_template[{i}]={entry!r}; expected an object with string 'name' and 'template'")
            named[entry["name"]] = entry["template"]
        if name not in named:
            raise ValueError(f"chat_template has no entry named {name!r}; it has {sorted(named)}")
        return named[name]
    raise ValueError(f"chat_template is a {type(chat_template).__name__}; expected a string or a list of "
                     "{name, template} objects")


class _GenerationBlock(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: transformers marks assistant text with it; we
    find assistant spans by rendering prefixes instead, so the block just renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson HTML-escapes; chat templates expect plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


class ChatTemplate:
    """A compiled chat template plus the special-token variables it is rendered with.

    Args:
        source: the Jinja source.
        special_tokens: template variables such as ``{"bos_token": "<s>", "eos_token": "<|endoftext|>"}``.

    Raises:
        ChatTemplateError: ``source`` is not a string or does not compile.
    """

    def __init__(self, source: str, special_tokens: Mapping[str, Any] | None = None):
        if not isinstance(source, str):
            raise ChatTemplateError(f"chat template source is a {type(source).__name__}; expected a string")
        try:
            self._template = _compile(source)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template does not compile: {e}") from e
        self.source = source
        self.special_tokens: dict[str, Any] = dict(special_tokens or {})

    @classmethod
    def phi3(cls, special_tokens: Mapping[str, Any] | None = None) -> ChatTemplate:
        """Phi-3's template, with Phi-3's special tokens unless others are given."""
        tokens = {"bos_token": "<s>", "eos_token": "<|endoftext|>", "unk_token": "<unk>", "pad_token": "<|endoftext|>"}
        return cls(PHI3_CHAT_TEMPLATE, tokens if special_tokens is None else special_tokens)

    @classmethod
    def from_tokenizer_config(
        cls, config: Mapping[str, Any], directory: str | Path | None = None, name: str = "default"
    ) -> ChatTemplate:
        """The template of a tokenizer_config dict (falling back to ``directory/chat_template.jinja``,
        then to Phi-3's template), with that config's special tokens.

        Raises:
            ValueError / ChatTemplateError: see :func:`select_chat_template` and the constructor.
        """
        tokens = special_tokens_from_config(config)
        source = config.get("chat_template")
        if source is None and directory is not None:
            jinja_file = Path(directory) / "chat_template.jinja"
            if jinja_file.is_file():
                source = jinja_file.read_text(encoding="utf-8")
        if source is None:
            return cls(PHI3_CHAT_TEMPLATE, tokens)
        return cls(select_chat_template(source, name), tokens)

    @classmethod
    def from_pretrained(cls, directory: str | Path, name: str = "default") -> ChatTemplate:
        """The template of a checkpoint directory (its tokenizer_config.json, if any)."""
        config_file = Path(directory) / "tokenizer_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        return cls.from_tokenizer_config(config, directory, name)

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    def render(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False, **variables: Any
    ) -> str:
        """Render ``messages`` to text.

        Args:
            messages: ``{"role", "content"}`` dicts (copied; the template never sees the caller's objects).
            add_generation_prompt: end with the assistant's turn header, ready for generation.
            variables: more template variables; they override the special tokens.

        Raises:
            ChatTemplateError: the template raised (``raise_exception``, an undefined operation, ...).
        """
        context = {
            **self.special_tokens,
            "tools": None,
            "documents": None,
            **variables,
            "messages": [dict(m) for m in messages],
            "add_generation_prompt": bool(add_generation_prompt),
        }
        try:
            return self._template.render(**context)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template failed to render: {e}") from e
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            raise ChatTemplateError(f"chat template failed to render: {type(e).__name__}: {e}") from e

    def __repr__(self) -> str:
        head = self.source if len(self.source) <= 60 else self.source[:57] + "..."
        return f"ChatTemplate({head!r})"
