"""The skill the demo teaches: answering "what number comes after X?", with numbers in words.

"What comes after three hundred and forty-one?" -> "It is three hundred and forty-two."

The base model has read counting in its stories ("she counted the steps: forty-one, forty-two and
forty-three"), but it has never seen a chat turn, let alone a question about numbers, so before
fine-tuning its greedy reply to such a question is story text and its score is 0. A LoRA adapter
teaches it to turn the question into the count it already knows how to continue; the held-out
conversations ask about numbers that no training conversation asks about, so the score measures a
learned skill, not memorised answers. Success is exact match (:func:`score`).

Why this skill and not, say, "write forty-two as 42": the mapping from number words to digits is
new knowledge for the base model (its stories never put the two side by side, so the embeddings of
"forty" and "4" share nothing), and a LoRA on the linear layers of a ~3.7M-parameter model does not
pick it up in a CPU-minute (measured: 0 to 3% exact match after 300 to 600 steps, at ranks 16 to
64, whereas also training the embedding matrix reached 86% after 300 steps). Continuing a count
uses what pretraining built, which is what LoRA fine-tuning is for: r=16 on all linear layers gets
about 80% of the held-out questions right after 300 to 400 steps (a minute or so on 2 CPU cores).

Everything here is deterministic given a seed (``random.Random``), so the committed dataset can be
regenerated bit for bit and compared.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from pathlib import Path

from ..finetune.evaluate import normalise_reply, score

__all__ = [
    "SKILL",
    "EXAMPLE_PROMPT",
    "MAX_NEW_TOKENS",
    "NUMBER_RANGE",
    "number_to_words",
    "words_to_number",
    "sample_quantity",
    "make_question",
    "make_answer",
    "read_answer",
    "make_conversation",
    "make_conversations",
    "split_numbers",
    "score",
    "eval_pairs",
    "write_jsonl",
]

SKILL = "answering 'what number comes after X?' with X in words (1 to 998)"
EXAMPLE_PROMPT = "What comes after forty-two?"
MAX_NEW_TOKENS = (
    12  # the longest answer, "It is nine hundred and ninety-nine.", is 9 tokens + <|end|>
)

NUMBER_RANGE = range(1, 999)  # asked about; the answers go up to 999

_UNITS = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_to_words(n: int) -> str:
    """English words for ``0 <= n <= 999``, British style: 342 -> "three hundred and forty-two".

    Raises:
        ValueError: ``n`` is not an int in 0..999.
    """
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= 999:
        raise ValueError(f"n={n!r}; expected an int in 0..999")
    if n < 20:
        return _UNITS[n]
    if n < 100:
        tens, unit = divmod(n, 10)
        return _TENS[tens] + (f"-{_UNITS[unit]}" if unit else "")
    hundreds, rest = divmod(n, 100)
    head = f"{_UNITS[hundreds]} hundred"
    return head if rest == 0 else f"{head} and {number_to_words(rest)}"


_FROM_WORDS = {number_to_words(n): n for n in range(1000)}


def words_to_number(words: str) -> int:
    """The inverse of :func:`number_to_words` (case and surrounding whitespace ignored).

    Raises:
        ValueError: ``words`` is not a number 0..999 as :func:`number_to_words` writes it.
    """
    key = " ".join(words.strip().lower().split())
    if key not in _FROM_WORDS:
        raise ValueError(
            f"words={words!r}; expected a number 0..999 in words, e.g. 'three hundred and forty-two'"
        )
    return _FROM_WORDS[key]


def sample_quantity(rng: random.Random) -> int:
    """A number 1..999 as quantities come in text: 45% in 1..20, 30% in 21..99, 25% in 100..999."""
    r = rng.random()
    if r < 0.45:
        return rng.randint(1, 20)
    if r < 0.75:
        return rng.randint(21, 99)
    return rng.randint(100, 999)


# How a user may ask. {w} is the number in words.
_QUESTIONS = [
    "What number comes after {w}?",
    "What comes after {w}?",
    "Which number follows {w}?",
    "What is the next number after {w}?",
    "Count on from {w}. What is next?",
    "I counted up to {w}. What number do I say next?",
    "What number is one more than {w}?",
    "{w}, and then?",
    "Tell me the number after {w}.",
    "Please say the number that comes after {w}.",
]
_FOLLOW_UPS = [
    "And after {w}?",
    "Now {w}. What comes next?",
    "What about after {w}?",
]
_SYSTEMS = [
    "You are a helpful assistant.",
    "You answer in a few words.",
    "You are a patient counting teacher.",
    "Be brief.",
]


def make_question(n: int, rng: random.Random, follow_up: bool = False) -> str:
    """A user turn asking what comes after ``n``, phrased at random (``rng``)."""
    text = rng.choice(_FOLLOW_UPS if follow_up else _QUESTIONS).format(w=number_to_words(n))
    return text[0].upper() + text[1:]


def make_answer(n: int) -> str:
    """The assistant's reply to a question about ``n``: "It is " + ``n + 1`` in words + ".".

    (A short sentence rather than the bare number: inside a sentence every number word is the
    space-prefixed token the base model read in its stories, not a rare line-initial spelling.)
    """
    return f"It is {number_to_words(n + 1)}."


def read_answer(text: str) -> int:
    """The number in a reply written like :func:`make_answer`'s ("It is forty-three." -> 43).

    Raises:
        ValueError: ``text`` is not "It is <number in words>." (case, spacing and the full stop are free).
    """
    body = normalise_reply(text)
    if not body.startswith("it is "):
        raise ValueError(f"text={text!r}; expected 'It is <number in words>.'")
    return words_to_number(body[len("it is ") :])


def make_conversation(
    numbers: Sequence[int], rng: random.Random, system: float = 0.3, follow_up: float = 0.25
) -> dict:
    """One ``messages`` record asking about a number drawn from ``numbers`` (with probability
    ``system`` after a system message; with probability ``follow_up`` a second question follows)."""
    messages = []
    if rng.random() < system:
        messages.append({"role": "system", "content": rng.choice(_SYSTEMS)})
    n = rng.choice(numbers)
    messages += [
        {"role": "user", "content": make_question(n, rng)},
        {"role": "assistant", "content": make_answer(n)},
    ]
    if rng.random() < follow_up:
        m = rng.choice(numbers)
        messages += [
            {"role": "user", "content": make_question(m, rng, follow_up=True)},
            {"role": "assistant", "content": make_answer(m)},
        ]
    return {"messages": messages}


def make_conversations(
    numbers: Sequence[int], count: int, seed: int, system: float = 0.3, follow_up: float = 0.25
) -> list[dict]:
    """``count`` conversations (:func:`make_conversation`) from a generator seeded with ``seed``.

    Raises:
        ValueError: ``numbers`` is empty, outside :data:`NUMBER_RANGE`, or ``count < 0``.
    """
    if not numbers:
        raise ValueError("numbers is empty; expected at least one number to ask about")
    bad = [n for n in numbers if n not in NUMBER_RANGE]
    if bad:
        raise ValueError(f"numbers contains {bad[:5]}; expected numbers in 1..{NUMBER_RANGE[-1]}")
    if count < 0:
        raise ValueError(f"count={count}; expected >= 0")
    rng = random.Random(seed)
    numbers = list(numbers)
    return [make_conversation(numbers, rng, system, follow_up) for _ in range(count)]


def split_numbers(n_eval: int = 200, seed: int = 0) -> tuple[list[int], list[int]]:
    """Partition :data:`NUMBER_RANGE` into (train numbers, held-out numbers), ``n_eval`` held out
    by a permutation seeded with ``seed``; both sorted.

    Raises:
        ValueError: ``n_eval`` leaves no number for one of the parts.
    """
    if not 1 <= n_eval < len(NUMBER_RANGE):
        raise ValueError(f"n_eval={n_eval}; expected 1..{len(NUMBER_RANGE) - 1}")
    numbers = list(NUMBER_RANGE)
    random.Random(seed).shuffle(numbers)
    return sorted(numbers[n_eval:]), sorted(numbers[:n_eval])


def write_jsonl(records: Sequence[dict], path: str | os.PathLike) -> None:
    """One JSON object per line (ASCII, ``\\n`` line ends), written atomically."""
    from .._io import atomic_open

    with atomic_open(path, "w") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=True) + "\n")


def eval_pairs(path: str | os.PathLike) -> list[tuple[list[dict], str]]:
    """(prompt messages, reference) pairs from a ``messages`` JSONL file: for each conversation, the
    messages before its last assistant turn, and that turn's content.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: a line is not a ``messages`` record ending in an assistant turn.
    """
    pairs = []
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").split("\n"), start=1):
        if not line.strip():
            continue
        record = json.loads(line)
        messages = record.get("messages") if isinstance(record, dict) else None
        if not messages or messages[-1].get("role") != "assistant":
            raise ValueError(
                f"{path}:{lineno}: expected a messages record ending in an assistant turn"
            )
        pairs.append((messages[:-1], messages[-1]["content"]))
    return pairs
