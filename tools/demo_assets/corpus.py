"""A seeded generator of plain English stories: the demo's pretraining text.

A small world of people, animals, things, colours, places and numbers, told in short stories of a
few sentences with a main character, pronouns, dialogue and a little cause and effect. It is varied
enough to be a language for a tiny model (a few hundred words, free word combinations). Numbers
come as words ("she found forty-two shells") and as digits ("the bus number 17"), and with meaning:
counting runs ("forty-one, forty-two and forty-three") and sums. The base model thus learns to
count; answering a question about counting is the skill the fine-tune adds (:mod:`lora.demo.skill`).
"""

from __future__ import annotations

import random
from collections.abc import Callable

from lora.demo.skill import number_to_words, sample_quantity

__all__ = ["make_story", "make_corpus"]

_PEOPLE = [
    ("Anna", "she"),
    ("Tom", "he"),
    ("Mia", "she"),
    ("Leo", "he"),
    ("Sara", "she"),
    ("Ben", "he"),
    ("Lily", "she"),
    ("Sam", "he"),
    ("Emma", "she"),
    ("Jack", "he"),
    ("Nora", "she"),
    ("Max", "he"),
    ("Ella", "she"),
    ("Finn", "he"),
    ("Zoe", "she"),
    ("Omar", "he"),
    ("Ruth", "she"),
    ("Ivan", "he"),
    ("Kate", "she"),
    ("Paul", "he"),
]
_POSSESSIVE = {"she": "her", "he": "his"}
_OBJECT = {"she": "her", "he": "him"}
_THINGS = [
    ("apple", "apples"),
    ("ball", "balls"),
    ("book", "books"),
    ("cup", "cups"),
    ("kite", "kites"),
    ("hat", "hats"),
    ("box", "boxes"),
    ("pen", "pens"),
    ("shoe", "shoes"),
    ("key", "keys"),
    ("stone", "stones"),
    ("flower", "flowers"),
    ("cake", "cakes"),
    ("coin", "coins"),
    ("shell", "shells"),
    ("card", "cards"),
    ("toy", "toys"),
    ("bag", "bags"),
    ("lamp", "lamps"),
    ("boat", "boats"),
    ("egg", "eggs"),
    ("leaf", "leaves"),
    ("sock", "socks"),
    ("plate", "plates"),
    ("bell", "bells"),
]
_ANIMALS = [
    ("cat", "cats"),
    ("dog", "dogs"),
    ("bird", "birds"),
    ("horse", "horses"),
    ("cow", "cows"),
    ("fish", "fish"),
    ("duck", "ducks"),
    ("rabbit", "rabbits"),
    ("fox", "foxes"),
    ("sheep", "sheep"),
    ("mouse", "mice"),
    ("goat", "goats"),
]
_COLOURS = [
    "red",
    "blue",
    "green",
    "yellow",
    "white",
    "black",
    "brown",
    "pink",
    "orange",
    "purple",
    "grey",
]
_SIZES = ["big", "small", "old", "new", "little", "long", "round", "soft", "heavy", "bright"]
_PLACES = [
    "park",
    "market",
    "school",
    "garden",
    "river",
    "forest",
    "kitchen",
    "beach",
    "library",
    "station",
    "farm",
    "shop",
    "hill",
    "village",
    "bridge",
    "lake",
    "field",
    "castle",
    "harbour",
    "museum",
]
_TIMES = [
    "in the morning",
    "after lunch",
    "in the evening",
    "at night",
    "on Monday",
    "on Tuesday",
    "on Wednesday",
    "on Thursday",
    "on Friday",
    "on Saturday",
    "on Sunday",
    "in the spring",
    "in the summer",
    "in the autumn",
    "in the winter",
    "one day",
    "the next day",
    "early",
]
_WEATHER = [
    "The sun was warm.",
    "It was raining.",
    "The wind was cold.",
    "The sky was grey.",
    "It was a bright day.",
    "Snow was falling.",
    "The air was still.",
    "Clouds moved over the hill.",
]
_FEELINGS = [
    "happy",
    "sad",
    "tired",
    "surprised",
    "proud",
    "hungry",
    "calm",
    "excited",
    "worried",
    "glad",
]
_FIND_VERBS = [
    "found",
    "saw",
    "bought",
    "picked up",
    "painted",
    "counted",
    "washed",
    "made",
    "sold",
    "lost",
]
_MOVE_VERBS = ["went", "walked", "ran", "rode", "came back"]
_STREETS = [
    "Oak",
    "Hill",
    "River",
    "Mill",
    "Park",
    "Station",
    "Church",
    "Market",
    "Green",
    "Bridge",
]


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def _a(word: str) -> str:
    """The word with its indefinite article: "a red", "an orange"."""
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


class _Story:
    """State of one story: its main character and the things mentioned so far."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.name, self.pro = rng.choice(_PEOPLE)
        others = [p for p in _PEOPLE if p[0] != self.name]
        self.friend, self.friend_pro = rng.choice(others)
        self.place = rng.choice(_PLACES)
        self.thing = rng.choice(_THINGS)
        self.colour = rng.choice(_COLOURS)

    def words(self, n: int | None = None) -> str:
        return number_to_words(sample_quantity(self.rng) if n is None else n)

    def digits(self) -> str:
        return str(sample_quantity(self.rng))

    def count_of(self, noun: tuple[str, str], n: int | None = None) -> str:
        n = sample_quantity(self.rng) if n is None else n
        return f"{number_to_words(n)} {noun[0] if n == 1 else noun[1]}"


def _opening(s: _Story) -> str:
    r = s.rng
    return r.choice(
        [
            f"{_cap(r.choice(_TIMES))}, {s.name} {r.choice(_MOVE_VERBS)} to the {s.place}.",
            f"{s.name} lived near the {s.place}.",
            f"{s.name} and {s.friend} {r.choice(_MOVE_VERBS)} to the {s.place} {r.choice(_TIMES)}.",
            f"There was once {_a(r.choice(_SIZES))} {r.choice(_ANIMALS)[0]} at the {s.place}.",
            f"{s.name} woke up {r.choice(_TIMES)} and felt {r.choice(_FEELINGS)}.",
        ]
    )


def _event(s: _Story) -> str:
    r = s.rng
    pro, poss, obj = s.pro, _POSSESSIVE[s.pro], _OBJECT[s.pro]
    animal = r.choice(_ANIMALS)
    thing = r.choice(_THINGS)
    options: list[Callable[[], str]] = [
        lambda: f"{_cap(pro)} {r.choice(_FIND_VERBS)} {s.count_of(thing)}.",
        lambda: f"{_cap(pro)} {r.choice(_FIND_VERBS)} {s.count_of(s.thing)} at the {s.place}.",
        lambda: f"There were {s.count_of(animal)} near the {r.choice(_PLACES)}.",
        lambda: f"{s.name} gave {s.friend} {s.count_of(thing)}.",
        lambda: (
            f"{s.friend} had {_a(r.choice(_COLOURS))} {thing[0]} in {_POSSESSIVE[s.friend_pro]} bag."
        ),
        lambda: (
            f"The {s.colour} {s.thing[0]} was {r.choice(['on the table', 'under the bed', 'by the door', 'in the box', 'on the hill'])}."
        ),
        lambda: f"{_cap(pro)} counted the {thing[1]}. There were {s.words()} of them.",
        lambda: f"The {animal[0]} was {r.choice(_SIZES)} and {r.choice(_COLOURS)}.",
        lambda: (
            f"{_cap(poss)} {r.choice(['mother', 'father', 'sister', 'brother', 'teacher', 'friend'])} "
            f"had {s.count_of(thing)} too."
        ),
        lambda: r.choice(_WEATHER),
        lambda: f"{s.friend} lives at number {s.digits()} on {r.choice(_STREETS)} Street.",
        lambda: f"The bus number {s.digits()} stopped by the {r.choice(_PLACES)}.",
        lambda: f"{_cap(pro)} read page {s.digits()} of {poss} {r.choice(_COLOURS)} book.",
        lambda: f"The sign on the {r.choice(_PLACES)} said {s.digits()}.",
        lambda: f"Room {s.digits()} was at the end of the hall.",
        lambda: f"{_cap(pro)} wrote a number on the card and gave it to {s.friend}.",
        lambda: (
            f'"Where is my {s.thing[0]}?" asked {s.name}. "It is by the {r.choice(_PLACES)}," said {s.friend}.'
        ),
        lambda: (
            f'"How many {thing[1]} do you have?" asked {s.friend}. "I have {s.words()}," said {s.name}.'
        ),
        lambda: f"{s.friend} helped {obj} carry the {r.choice(_SIZES)} {thing[0]}.",
        lambda: f"{_cap(pro)} put {s.count_of(thing)} into {_a(r.choice(_COLOURS))} box.",
        lambda: f"Then {pro} {r.choice(_MOVE_VERBS)} to the {r.choice(_PLACES)}.",
        lambda: (
            f"The {r.choice(_ANIMALS)[0]} ran after the {r.choice(_COLOURS)} {r.choice(_THINGS)[0]}."
        ),
        # Numbers with meaning: counting runs and sums give every number word and every digit an
        # identity of its own (without them, "forty" and "fifty" would be interchangeable).
        lambda: f"{_cap(pro)} counted the {thing[1]}: {_run(r, number_to_words)}.",
        lambda: f"{_cap(pro)} counted the steps up the hill: {_run(r, number_to_words)}.",
        lambda: f"The houses on {r.choice(_STREETS)} Street were numbered {_run(r, str)}.",
        lambda: f"{_cap(pro)} turned the pages: {_run(r, str)}.",
        lambda: _sum_in_words(s),
        lambda: _difference_in_words(s),
        lambda: _sum_in_digits(s),
        lambda: f"There were {s.digits()} {animal[1]} on the {r.choice(_PLACES)}.",
        lambda: f'"Please write the numbers in your book," said the teacher to {s.name}.',
        lambda: f"{_cap(pro)} wrote the answer in digits with {_a(r.choice(_COLOURS))} pen.",
    ]
    return r.choice(options)()


def _run(rng: random.Random, fmt: Callable[[int], str]) -> str:
    """Three to five consecutive numbers, "forty-one, forty-two and forty-three" or "41, 42 and 43"."""
    k = rng.randint(3, 5)
    start = min(sample_quantity(rng), 999 - k + 1)
    items = [fmt(start + i) for i in range(k)]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _small_pair(rng: random.Random) -> tuple[int, int]:
    a = sample_quantity(rng)
    b = rng.randint(1, 20) if rng.random() < 0.7 else sample_quantity(rng)
    return (a, b) if a + b <= 999 else (a // 2, b // 2 + 1)


def _sum_in_words(s: _Story) -> str:
    a, b = _small_pair(s.rng)
    thing = s.rng.choice(_THINGS)
    return (
        f"{s.name} had {s.count_of(thing, a)}. {s.friend} gave {_OBJECT[s.pro]} {number_to_words(b)} more, "
        f"so now {s.pro} had {number_to_words(a + b)}."
    )


def _difference_in_words(s: _Story) -> str:
    a, b = _small_pair(s.rng)
    a, b = a + b, b
    thing = s.rng.choice(_THINGS)
    return (
        f"{s.name} had {s.count_of(thing, a)} and lost {number_to_words(b)}, "
        f"so {s.pro} had {number_to_words(a - b)} left."
    )


def _sum_in_digits(s: _Story) -> str:
    a, b = _small_pair(s.rng)
    return s.rng.choice(
        [
            f"On the board the teacher wrote {a} + {b} = {a + b}.",
            f"The shop sold {a} cups in the morning and {b} in the evening, {a + b} in all.",
            f"The sign said {a + b} km, and {b} km later it said {a}.",
        ]
    )


def _ending(s: _Story) -> str:
    r = s.rng
    return r.choice(
        [
            f"In the end {s.name} was {r.choice(_FEELINGS)}.",
            f"{s.name} and {s.friend} went home {r.choice(_TIMES)}.",
            f"That night {s.pro} dreamed of {s.count_of(r.choice(_THINGS))}.",
            f"It was a good day at the {s.place}.",
            f"{_cap(s.pro)} kept the {s.colour} {s.thing[0]} for a long time.",
        ]
    )


def make_story(rng: random.Random) -> str:
    """One story of 3 to 8 sentences on one line."""
    s = _Story(rng)
    sentences = [_opening(s)] + [_event(s) for _ in range(rng.randint(1, 6))] + [_ending(s)]
    return " ".join(sentences)


def make_corpus(num_stories: int, seed: int) -> list[str]:
    """``num_stories`` stories from a generator seeded with ``seed`` (same arguments, same text).

    Raises:
        ValueError: ``num_stories < 1``.
    """
    if num_stories < 1:
        raise ValueError(f"num_stories={num_stories}; expected >= 1")
    rng = random.Random(seed)
    return [make_story(rng) for _ in range(num_stories)]
