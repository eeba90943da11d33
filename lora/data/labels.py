"""From a conversation to ``input_ids`` and ``labels``: loss on the assistant's tokens only.

The conversation is rendered once with the chat template and tokenized once (no special token
added: the template wrote them). Which characters belong to the assistant is found without knowing
the template's markup, by rendering prefixes:

- the assistant turn ``i`` starts where ``render(messages[:i], add_generation_prompt=True)`` ends
  (that text must be a prefix of the whole conversation);
- it ends where ``render(messages[:i+1])`` stops agreeing with the whole conversation (the template
  may close the last turn with ``eos_token``, which is not there when more turns follow);
- from that turn text we keep the content and the template's end-of-turn marker, up to and
  including the first stop token after the content (``<|end|>`` for Phi-3, Phi-3.5, Phi-4-mini);
  anything after it (a newline, the final ``<|endoftext|>``) belongs to the framing.

A token is labelled when its first character lies inside an assistant span; all other labels are
-100. (Not "lies entirely inside": Phi-3's tokenizer declares ``<|end|>`` with ``rstrip``, so the
token also covers the newline after it, outside the span; and a token that starts before the span,
such as a header that swallowed the reply's leading space, is the prompt's.) Labels are aligned
with ``input_ids`` (``labels[t]`` is token ``t``); the model shifts them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..checks import IGNORE_INDEX  # defined once, for the data and the model's loss
from .template import ChatTemplate, ChatTemplateError

__all__ = [
    "IGNORE_INDEX",
    "TokenizedConversation",
    "assistant_spans",
    "labels_from_spans",
    "tokenize_conversation",
]


@dataclass
class TokenizedConversation:
    """``input_ids`` and ``labels`` (same length, ``-100`` where no loss), and the rendered text."""

    input_ids: list[int]
    labels: list[int]
    text: str

    @property
    def num_labels(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def _turn_end(text: str, turn: str, eos_token: str | None) -> int:
    if text.startswith(turn):
        return len(turn)
    if (
        eos_token
        and turn.endswith(eos_token)
        and text.startswith(turn[: len(turn) - len(eos_token)])
    ):
        return len(turn) - len(eos_token)
    raise ChatTemplateError(
        "the chat template renders a conversation prefix that is not a prefix of the whole "
        "conversation; assistant turns cannot be located"
    )


def assistant_spans(
    messages: Sequence[Mapping[str, str]],
    template: ChatTemplate,
    stop_strings: Sequence[str] = (),
) -> tuple[str, list[tuple[int, int]]]:
    """Render ``messages`` and find the character span of every assistant turn in the text.

    Args:
        messages: ``{"role", "content"}`` dicts.
        template: the chat template.
        stop_strings: end-of-turn markers (the tokenizer's stop tokens); a span ends right after the
            first one that follows the content. Without one in the turn, the whole turn text is kept.

    Returns:
        ``(text, spans)``: ``text = template.render(messages)`` and sorted, disjoint ``(start, end)``
        character spans, one per assistant message.

    Raises:
        ChatTemplateError: the template fails to render, or renders prefixes inconsistently (the
            generation prompt is not a prefix of the conversation).
    """
    text = template.render(messages, add_generation_prompt=False)
    eos = template.eos_token
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = template.render(messages[:i], add_generation_prompt=True)
        if not text.startswith(prompt):
            raise ChatTemplateError(
                f"the generation prompt before messages[{i}] is not a prefix of the rendered conversation; "
                "assistant turns cannot be located"
            )
        start = len(prompt)
        end = _turn_end(text, template.render(messages[: i + 1], add_generation_prompt=False), eos)
        content_at = text.find(message["content"], start, end)
        search_from = content_at + len(message["content"]) if content_at >= 0 else start
        stops = [(text.find(s, search_from, end), s) for s in stop_strings if s]
        stops = [(at, s) for at, s in stops if at >= 0]
        if stops:
            at, s = min(stops)
            end = at + len(s)
        if spans and start < spans[-1][1]:
            raise ChatTemplateError(
                f"assistant turn messages[{i}] overlaps the previous one in the rendered text"
            )
        if end > start:
            spans.append((start, end))
    return text, spans


def labels_from_spans(
    input_ids: Sequence[int], offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]
) -> list[int]:
    """Labels for ``input_ids``: the id where the token's ``(start, end)`` character offsets start
    inside one of ``spans`` (sorted, disjoint ``(start, end)``), ``-100`` elsewhere (and on empty tokens).

    Raises:
        ValueError: ``input_ids`` and ``offsets`` differ in length.
    """
    if len(input_ids) != len(offsets):
        raise ValueError(
            f"len(input_ids)={len(input_ids)} but len(offsets)={len(offsets)}; expected equal"
        )
    labels = [IGNORE_INDEX] * len(input_ids)
    k = 0
    for t, (start, end) in enumerate(offsets):
        while k < len(spans) and spans[k][1] <= start:
            k += 1
        if k == len(spans):
            break
        if spans[k][0] <= start and end > start:
            labels[t] = input_ids[t]
    return labels


def tokenize_conversation(
    messages: Sequence[Mapping[str, str]], tokenizer
) -> TokenizedConversation:
    """Render, tokenize and label one conversation with ``tokenizer``'s chat template.

    Args:
        messages: validated ``{"role", "content"}`` dicts.
        tokenizer: a :class:`lora.data.Tokenizer` (its chat template and stop tokens are used).

    Returns:
        The full, untruncated :class:`TokenizedConversation`.

    Raises:
        ChatTemplateError: see :func:`assistant_spans`.
    """
    text, spans = assistant_spans(messages, tokenizer.chat_template, tokenizer.stop_tokens)
    input_ids, offsets = tokenizer.encode_with_offsets(text)
    return TokenizedConversation(
        list(input_ids), labels_from_spans(input_ids, offsets, spans), text
    )
