"""Four small generative tasks for the LLM track, offline and deterministic.

Each task is a question with one short, exactly checkable answer, asked as a chat message so
that an instruction-tuned model (SmolLM2-135M-Instruct) can be prompted with its chat template:

* ``arithmetic`` - two-digit addition and subtraction ("What is 47 + 38?" -> "85");
* ``reverse`` - a string transformation ("Reverse the letters of 'planet'." -> "tenalp");
* ``capitals`` - a small knowledge task ("What is the capital of Norway?" -> "Oslo"); the
  countries of the train, validation and test splits are disjoint, so a fine-tuned expert
  must *recall* capitals it was not trained on, only the answer format is learnt;
* ``dates`` - format following ("Write 2024-03-05 as DD/MM/YYYY." -> "05/03/2024").

Every split is drawn from a NumPy generator seeded by (seed, task, split), so the same call
always returns the same examples. :func:`exact_match` scores predictions after a light
normalization (case, surrounding spaces and quotes, one trailing full stop).
"""

from __future__ import annotations

import datetime
import zlib
from dataclasses import dataclass, field

import numpy as np

TEXT_TASKS: tuple[str, ...] = ("arithmetic", "reverse", "capitals", "dates")
MINI_TEXT_SIZES = {"train": 64, "val": 32, "test": 48}
SPLITS = ("train", "val", "test")

_WORDS = tuple(
    """
apple bread chair dance eagle flame grape house image juice knife lemon mango night ocean
paper queen river snake table uncle voice water youth zebra amber beach cloud dream earth
field ghost heart index jelly karma light magic noble olive pearl quiet radio stone tiger
urban vivid wheat yield blaze cabin drift elbow frost glove honey ivory jewel koala lunar
metal nurse orbit piano quilt robin sugar tulip unity valve whale plant brick candy crown
""".split()  # noqa: SIM905 - a word list reads better as text
)

# Country -> capital, only unambiguous, ASCII-spelt pairs.
_CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid",
    "Portugal": "Lisbon", "the United Kingdom": "London", "Ireland": "Dublin",
    "the Netherlands": "Amsterdam", "Belgium": "Brussels", "Switzerland": "Bern",
    "Austria": "Vienna", "Poland": "Warsaw", "Czechia": "Prague", "Hungary": "Budapest",
    "Greece": "Athens", "Sweden": "Stockholm", "Norway": "Oslo", "Denmark": "Copenhagen",
    "Finland": "Helsinki", "Iceland": "Reykjavik", "Russia": "Moscow", "Ukraine": "Kyiv",
    "Turkey": "Ankara", "Egypt": "Cairo", "Kenya": "Nairobi", "Nigeria": "Abuja",
    "Ghana": "Accra", "Ethiopia": "Addis Ababa", "Morocco": "Rabat", "China": "Beijing",
    "Japan": "Tokyo", "South Korea": "Seoul", "India": "New Delhi", "Pakistan": "Islamabad",
    "Bangladesh": "Dhaka", "Thailand": "Bangkok", "Vietnam": "Hanoi", "Indonesia": "Jakarta",
    "the Philippines": "Manila", "Malaysia": "Kuala Lumpur", "Australia": "Canberra",
    "New Zealand": "Wellington", "Canada": "Ottawa", "Mexico": "Mexico City",
    "Argentina": "Buenos Aires", "Chile": "Santiago", "Peru": "Lima", "Venezuela": "Caracas",
    "Cuba": "Havana", "Iran": "Tehran", "Iraq": "Baghdad", "Saudi Arabia": "Riyadh",
    "Afghanistan": "Kabul", "Nepal": "Kathmandu", "Mongolia": "Ulaanbaatar",
    "Romania": "Bucharest", "Bulgaria": "Sofia", "Serbia": "Belgrade", "Croatia": "Zagreb",
    "Slovakia": "Bratislava", "Slovenia": "Ljubljana", "Estonia": "Tallinn", "Latvia": "Riga",
    "Lithuania": "Vilnius", "Jamaica": "Kingston", "Senegal": "Dakar", "Uganda": "Kampala",
    "Zimbabwe": "Harare", "Qatar": "Doha", "Syria": "Damascus", "Lebanon": "Beirut",
    "Jordan": "Amman",
}  # fmt: skip


@dataclass(frozen=True)
class TextExample:
    """One question (the user message) and its reference answer."""

    prompt: str
    answer: str


@dataclass
class TextTask:
    """A generative task: examples per split, and the chat messages that ask them."""

    name: str
    splits: dict[str, list[TextExample]] = field(default_factory=dict)
    system: str = "You are a helpful assistant. Answer with the answer only."

    def examples(self, split: str) -> list[TextExample]:
        if split not in self.splits:
            raise ValueError(
                f"task {self.name!r} has no split {split!r}; splits: {list(self.splits)}"
            )
        return self.splits[split]

    def messages(self, example: TextExample, with_answer: bool = False) -> list[dict[str, str]]:
        """Chat messages for ``tokenizer.apply_chat_template`` (the answer as the assistant turn
        when ``with_answer``: the training target)."""
        out = [
            {"role": "system", "content": self.system},
            {"role": "user", "content": example.prompt},
        ]
        if with_answer:
            out.append({"role": "assistant", "content": example.answer})
        return out


def _rng(seed: int, name: str, split: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(f"{name}/{split}".encode())])


def _arithmetic(rng: np.random.Generator, n: int) -> list[TextExample]:
    a, b = rng.integers(10, 100, n), rng.integers(10, 100, n)
    plus = rng.random(n) < 0.5
    out = []
    for x, y, p in zip(a.tolist(), b.tolist(), plus.tolist(), strict=True):
        if not p and y > x:
            x, y = y, x  # keep subtraction results non-negative
        out.append(TextExample(f"What is {x} {'+' if p else '-'} {y}?", str(x + y if p else x - y)))
    return out


def _reverse(rng: np.random.Generator, n: int) -> list[TextExample]:
    words = rng.choice(_WORDS, n)
    return [TextExample(f"Reverse the letters of the word '{w}'.", w[::-1]) for w in words.tolist()]


def _capitals(rng: np.random.Generator, n: int, split: str, seed: int) -> list[TextExample]:
    countries = sorted(_CAPITALS)
    order = np.random.default_rng([seed, 7]).permutation(len(countries))
    thirds = np.array_split(order, 3)  # disjoint countries per split
    pool = [countries[i] for i in thirds[SPLITS.index(split)]]
    picks = rng.choice(len(pool), n, replace=n > len(pool))
    return [
        TextExample(f"What is the capital of {pool[i]}?", _CAPITALS[pool[i]])
        for i in picks.tolist()
    ]


def _dates(rng: np.random.Generator, n: int) -> list[TextExample]:
    start = datetime.date(1990, 1, 1).toordinal()
    days = rng.integers(0, 365 * 40, n)
    out = []
    for d in days.tolist():
        day = datetime.date.fromordinal(start + d)
        out.append(
            TextExample(
                f"Write the date {day.isoformat()} as DD/MM/YYYY.", day.strftime("%d/%m/%Y")
            )
        )
    return out


def load_text_task(name: str, sizes: dict[str, int] | None = None, seed: int = 0) -> TextTask:
    """One task with its train/val/test examples (``sizes`` per split, default mini sizes)."""
    if name not in TEXT_TASKS:
        raise ValueError(f"unknown text task {name!r}; choose from {TEXT_TASKS}")
    sizes = dict(MINI_TEXT_SIZES if sizes is None else sizes)
    task = TextTask(name)
    for split, n in sizes.items():
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; splits are {SPLITS}")
        if n < 0:
            raise ValueError(f"split {split!r}: size must be >= 0, got {n}")
        rng = _rng(seed, name, split)
        if name == "capitals":
            task.splits[split] = _capitals(rng, n, split, seed)
        else:
            task.splits[split] = {"arithmetic": _arithmetic, "reverse": _reverse, "dates": _dates}[
                name
            ](rng, n)
    return task


def load_text_tasks(sizes: dict[str, int] | None = None, seed: int = 0) -> dict[str, TextTask]:
    return {n: load_text_task(n, sizes, seed) for n in TEXT_TASKS}


def normalize_answer(text: str) -> str:
    """Lower-case, strip spaces and quotes, drop one trailing full stop; keep the first line."""
    first = text.strip().splitlines()[0] if text.strip() else ""
    first = first.strip().strip("\"'`").strip()
    if first.endswith("."):
        first = first[:-1]
    return first.strip().lower()


def exact_match(predictions: list[str], answers: list[str]) -> float:
    """Percentage of predictions equal to their answer after :func:`normalize_answer`."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers")
    if not answers:
        raise ValueError("exact_match needs at least one answer")
    hits = sum(
        normalize_answer(p) == normalize_answer(a)
        for p, a in zip(predictions, answers, strict=True)
    )
    return 100.0 * hits / len(answers)
