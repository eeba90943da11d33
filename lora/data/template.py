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

The sandbox stops escapes, not waste, so rendering is bounded too (:class:`RenderLimits`): the text
a render produces, the length of any string or list built with ``*``, the size of ``**`` results
and of numeric call arguments, the items all ``range()`` calls of a render may yield, and (on the
main thread) the CPU time of a render. Over a bound, or on jinja's own limits (a too-large range,
runaway recursion), rendering raises :class:`ChatTemplateError` naming the template's origin.
"""

from __future__ import annotations

import functools
import json
import operator
import signal
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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
    "RenderLimits",
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
SPECIAL_TOKEN_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "pad_token",
    "sep_token",
    "cls_token",
    "mask_token",
)


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
    raise ValueError(
        f"special token {token!r}; expected a string or an object with a string 'content'"
    )


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
            if not (
                isinstance(entry, Mapping)
                and isinstance(entry.get("name"), str)
                and isinstance(entry.get("template"), str)
            ):
                raise ValueError(
                    f"chat_template[{i}]={entry!r}; expected an object with string 'name' and 'template'"
                )
            named[entry["name"]] = entry["template"]
        if name not in named:
            raise ValueError(f"chat_template has no entry named {name!r}; it has {sorted(named)}")
        return named[name]
    raise ValueError(
        f"chat_template is a {type(chat_template).__name__}; expected a string or a list of "
        "{name, template} objects"
    )


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
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@dataclass(frozen=True)
class RenderLimits:
    """Bounds on one render of a chat template (a real template uses a tiny fraction of each).

    ``max_output_chars``: the rendered text; ``max_sequence``: a string or list made by ``*`` (and
    any int argument of a call or filter, such as ``center(10**9)``); ``max_power_bits``: the
    result of ``**``; ``max_range_items``: all ``range()`` items of one render together (nested
    loops multiply); ``max_cpu_seconds``: CPU time, enforced on the main thread (SIGVTALRM).
    """

    max_output_chars: int = 16 * 2**20
    max_sequence: int = 2**22
    max_power_bits: int = 4096
    max_range_items: int = 1_000_000
    max_cpu_seconds: float = 10.0


LIMITS = RenderLimits()


class _LimitExceeded(Exception):
    """Raised inside a render that went over a bound (reported by ChatTemplate.render)."""


class _Budget(threading.local):
    range_items = 0


_budget = _Budget()


def _bounded_range(*args):
    r = range(*args)
    _budget.range_items += len(r)
    if _budget.range_items > LIMITS.max_range_items:
        raise _LimitExceeded(f"range() calls yield more than {LIMITS.max_range_items} items in all")
    return r


_WIDE = __import__("re").compile(r"\d{7,}")


def _check_format_string(text, what: str) -> None:
    # '{:>999999999}'.format(x) and '%999999999s' % x build a gigabyte from a short template.
    if isinstance(text, str) and _WIDE.search(text):
        raise _LimitExceeded(f"{what} with a format width of 7 or more digits")


def _check_size_args(args, kwargs, what: str) -> None:
    for value in list(args) + list(kwargs.values()):
        too_big = isinstance(value, int) and abs(value) > LIMITS.max_sequence
        if too_big and not isinstance(value, bool):
            raise _LimitExceeded(
                f"{what} with the argument {value} (at most {LIMITS.max_sequence})"
            )


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "%"})

    def call_binop(self, context, op, left, right):
        if op == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                    if len(seq) * max(n, 0) > LIMITS.max_sequence:
                        raise _LimitExceeded(
                            f"'*' would build a sequence of {len(seq) * n} items "
                            f"(at most {LIMITS.max_sequence})"
                        )
            return operator.mul(left, right)
        if op == "**":
            if isinstance(left, int) and isinstance(right, int) and right > 0:
                bits = max(abs(left), 2).bit_length() * right
                if bits > LIMITS.max_power_bits:
                    raise _LimitExceeded(
                        f"'**' would build a {bits}-bit number (at most {LIMITS.max_power_bits})"
                    )
            return operator.pow(left, right)
        if op == "%":
            _check_format_string(left, "'%' formatting")
            return operator.mod(left, right)
        return super().call_binop(context, op, left, right)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja's own signature
        _check_size_args(args, kwargs, f"calling {getattr(__obj, '__name__', 'a function')}()")
        return super().call(__context, __obj, *args, **kwargs)

    def wrap_str_format(self, value):
        wrapped = super().wrap_str_format(value)
        if wrapped is not None:
            _check_format_string(value.__self__, f"calling {value.__name__}()")
        return wrapped


def _bounded_filter(name: str, fn):
    def filtered(*args, **kwargs):
        _check_size_args(args[1:], kwargs, f"the filter {name}")
        if name == "format" and args:
            _check_format_string(args[0], "the filter format")
        return fn(*args, **kwargs)

    for attr in ("jinja_pass_arg",):  # keep @pass_environment / @pass_context markers
        if hasattr(fn, attr):
            setattr(filtered, attr, getattr(fn, attr))
    return filtered


@functools.lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    env = _BoundedSandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    for name in ("center", "indent", "wordwrap", "truncate", "format", "batch", "slice", "round"):
        if name in env.filters:
            env.filters[name] = _bounded_filter(name, env.filters[name])
    env.globals["range"] = _bounded_range
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

    def __init__(
        self,
        source: str,
        special_tokens: Mapping[str, Any] | None = None,
        origin: str = "chat template",
    ):
        self.origin = origin  # where the template came from, for error messages
        if not isinstance(source, str):
            raise ChatTemplateError(
                f"{origin}: the source is a {type(source).__name__}; expected a string"
            )
        try:
            self._template = _compile(source)
        except (jinja2.TemplateError, RecursionError, MemoryError) as e:
            raise ChatTemplateError(f"{origin} does not compile: {type(e).__name__}: {e}") from e
        self.source = source
        self.special_tokens: dict[str, Any] = dict(special_tokens or {})

    @classmethod
    def phi3(cls, special_tokens: Mapping[str, Any] | None = None) -> ChatTemplate:
        """Phi-3's template, with Phi-3's special tokens unless others are given."""
        tokens = {
            "bos_token": "<s>",
            "eos_token": "<|endoftext|>",
            "unk_token": "<unk>",
            "pad_token": "<|endoftext|>",
        }
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
        origin = "the tokenizer_config chat template"
        if directory is not None:
            origin = f"the chat template in {Path(directory) / 'tokenizer_config.json'}"
        if source is None and directory is not None:
            jinja_file = Path(directory) / "chat_template.jinja"
            if jinja_file.is_file():
                source = jinja_file.read_text(encoding="utf-8")
                origin = f"the chat template {jinja_file}"
        if source is None:
            return cls(PHI3_CHAT_TEMPLATE, tokens, origin="Phi-3's chat template")
        return cls(select_chat_template(source, name), tokens, origin=origin)

    @classmethod
    def from_pretrained(cls, directory: str | Path, name: str = "default") -> ChatTemplate:
        """The template of a checkpoint directory (its tokenizer_config.json, if any)."""
        config_file = Path(directory) / "tokenizer_config.json"
        config = (
            json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        )
        return cls.from_tokenizer_config(config, directory, name)

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = False,
        **variables: Any,
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
            return self._render_bounded(context)
        except _LimitExceeded as e:
            raise ChatTemplateError(f"{self.origin} was stopped: {e}") from None
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"{self.origin} failed to render: {e}") from e
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            raise ChatTemplateError(
                f"{self.origin} failed to render: {type(e).__name__}: {e}"
            ) from e
        except (OverflowError, RecursionError, MemoryError) as e:
            raise ChatTemplateError(f"{self.origin} was stopped: {type(e).__name__}: {e}") from None

    def _render_bounded(self, context: dict) -> str:
        _budget.range_items = 0
        with _cpu_deadline(LIMITS.max_cpu_seconds):
            parts, size = [], 0
            for chunk in self._template.generate(**context):
                size += len(chunk)
                if size > LIMITS.max_output_chars:
                    raise _LimitExceeded(
                        f"the rendered text exceeds {LIMITS.max_output_chars} characters"
                    )
                parts.append(chunk)
            return "".join(parts)

    def __repr__(self) -> str:
        head = self.source if len(self.source) <= 60 else self.source[:57] + "..."
        return f"ChatTemplate({head!r})"


class _cpu_deadline:
    """Raise _LimitExceeded after ``seconds`` of CPU time (ITIMER_VIRTUAL), on the main thread only;
    elsewhere (and when another SIGVTALRM handler is installed) the other bounds still hold."""

    def __init__(self, seconds: float):
        self.seconds, self.armed = seconds, False

    @staticmethod
    def _expired(signum, frame):
        raise _LimitExceeded(f"rendering took more than {LIMITS.max_cpu_seconds:g} s of CPU time")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):
            if signal.getsignal(signal.SIGVTALRM) in (signal.SIG_DFL, signal.SIG_IGN, None):
                self._old = signal.signal(signal.SIGVTALRM, self._expired)
                signal.setitimer(signal.ITIMER_VIRTUAL, self.seconds)
                self.armed = True
        return self

    def __exit__(self, *exc):
        if self.armed:
            signal.setitimer(signal.ITIMER_VIRTUAL, 0)
            signal.signal(signal.SIGVTALRM, self._old)
