"""Four small generative tasks for the LLM track, offline and deterministic.

Each task is a question with one short, exactly checkable answer, asked as a chat message so
that an instruction-tuned model (SmolLM2-135M-Instruct) can be prompted with its chat template:

* ``arithmetic`` - adding or subtracting numbers from 1 to 9 ("What is 7 + 5?" -> "12");
* ``reverse`` - a string transformation ("Reverse the order of the words: table paper index"
  -> "index paper table");
* ``qa`` - question answering from the context ("Anna has a red kite and Ben has a blue ball.
  What color is Ben's ball?" -> "blue");
* ``dates`` - format following ("Write the date 2024-03-05 as DD/MM/YYYY." -> "05/03/2024").

No question is shared between splits: each task's pool of items (operand pairs, word triples,
stories, days) is shuffled once and cut into disjoint train (1/2), validation (1/4) and test
(1/4) pools, so an expert is tested on questions it never saw. Each split then samples its
pool with a NumPy generator seeded by (seed, task, split), so the same call always returns the
same examples. Training may repeat an item (128 draws from arithmetic's 63 operand pairs); the
validation and test splits never do: one asked for more questions than its pool holds gets the
whole pool, once (arithmetic's test split has 31 questions: its 126 items, 81 sums and 45
differences of digits 1-9, are cut 63 / 32 / 31). :func:`exact_match` scores predictions after a light normalization (case,
surrounding spaces and quotes, one trailing full stop).

A fifth task, ``capitals`` ("What is the capital of Norway?" -> "Oslo", countries disjoint
between splits), is kept as a lesson rather than a benchmark: SmolLM2-135M answers it in full
sentences ("The capital of Norway is Oslo."), but a LoRA that teaches it to answer with the city
alone, on 36 training countries, learns those 36 answers and loses the recall of the unseen
ones (0-12% on validation in our runs at lr 5e-4 and 1e-3). Load it by name.
"""

from __future__ import annotations

import datetime
import zlib
from dataclasses import dataclass, field

import numpy as np

TEXT_TASKS: tuple[str, ...] = ("arithmetic", "reverse", "qa", "dates")
ALL_TEXT_TASKS = (*TEXT_TASKS, "capitals")  # capitals: see the module docstring
ARITH_MAX = 9
MINI_TEXT_SIZES = {"train": 128, "val": 32, "test": 32}
SPLITS = ("train", "val", "test")

_WORDS = tuple(
    """
apple bread chair dance eagle flame grape house image juice knife lemon mango night ocean
paper queen river snake table uncle voice water youth zebra amber beach cloud dream earth
field ghost heart index jelly karma light magic noble olive pearl quiet radio stone tiger
urban vivid wheat yield blaze cabin drift elbow frost glove honey ivory jewel koala lunar
metal nurse orbit piano quilt robin sugar tulip unity valve whale plant brick candy crown
anvil bison cedar daisy ember fable gravy hazel igloo joker kayak lilac maple nylon otter
panda raven salad toast umbra viper waltz yacht acorn bagel camel denim easel fjord giant
hotel irony jumbo kebab llama medal ninja opera pizza rumba scarf tempo ultra vodka wagon
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
    system: str = "Answer with the answer only."

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


POOL_FRACTIONS = (0.5, 0.25, 0.25)  # train / val / test share of each task's items


def _rng(seed: int, name: str, split: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(f"{name}/{split}".encode())])


def _pool(items: list, split: str, seed: int, name: str) -> list:
    """This split's disjoint share of ``items`` (shuffled once per (seed, task))."""
    order = np.random.default_rng([seed, zlib.crc32(name.encode()), 7]).permutation(len(items))
    cuts = np.cumsum([round(f * len(items)) for f in POOL_FRACTIONS[:-1]]).tolist()
    parts = np.split(order, cuts)
    return [items[i] for i in parts[SPLITS.index(split)]]


def _sample(pool: list, n: int, rng: np.random.Generator, repeat: bool) -> list:
    """``n`` items of ``pool``; without ``repeat`` each item at most once (at most the pool)."""
    if not repeat:
        n = min(n, len(pool))
    picks = rng.choice(len(pool), n, replace=n > len(pool))
    return [pool[i] for i in picks.tolist()]


_NAMES = ("Anna", "Ben", "Carla", "David", "Emma", "Felix", "Grace", "Hugo", "Iris", "Jack")
_COLORS = ("red", "blue", "green", "yellow", "black", "white", "pink", "brown", "orange", "grey")
_OBJECTS = ("kite", "ball", "car", "hat", "bike", "cup", "book", "bag", "lamp", "coat")


def _qa_items() -> list[tuple]:
    """(name1, color1, object1, name2, color2, object2, asked) - the answer is in the question."""
    rng = np.random.default_rng(11)
    items = set()
    while len(items) < 3000:
        n = rng.choice(len(_NAMES), 2, replace=False)
        c = rng.choice(len(_COLORS), 2, replace=False)
        o = rng.choice(len(_OBJECTS), 2, replace=False)
        items.add((*n.tolist(), *c.tolist(), *o.tolist(), int(rng.integers(2))))
    return sorted(items)


def _triples() -> list[tuple[int, int, int]]:
    rng = np.random.default_rng(12)
    items = set()
    while len(items) < 3000:
        items.add(tuple(rng.choice(len(_WORDS), 3, replace=False).tolist()))
    return sorted(items)


def _arithmetic_items() -> list[tuple[int, str, int]]:
    items = []
    for x in range(1, ARITH_MAX + 1):
        for y in range(1, ARITH_MAX + 1):
            items.append((x, "+", y))
            if x >= y:  # results stay non-negative
                items.append((x, "-", y))
    return items


def _make(name: str, item) -> TextExample:
    if name == "arithmetic":
        x, op, y = item
        return TextExample(f"What is {x} {op} {y}?", str(x + y if op == "+" else x - y))
    if name == "reverse":
        words = [_WORDS[i] for i in item]
        return TextExample(
            f"Reverse the order of the words: {' '.join(words)}", " ".join(words[::-1])
        )
    if name == "qa":
        n1, n2, c1, c2, o1, o2, ask = item
        who, color, obj = (n1, c1, o1) if ask == 0 else (n2, c2, o2)
        return TextExample(
            f"{_NAMES[n1]} has a {_COLORS[c1]} {_OBJECTS[o1]} and {_NAMES[n2]} has a "
            f"{_COLORS[c2]} {_OBJECTS[o2]}. What color is {_NAMES[who]}'s {_OBJECTS[obj]}?",
            _COLORS[color],
        )
    if name == "capitals":
        return TextExample(f"What is the capital of {item}?", _CAPITALS[item])
    day = datetime.date.fromordinal(datetime.date(1990, 1, 1).toordinal() + item)
    return TextExample(f"Write the date {day.isoformat()} as DD/MM/YYYY.", day.strftime("%d/%m/%Y"))


def _items(name: str) -> list:
    return {
        "arithmetic": _arithmetic_items,
        "reverse": _triples,
        "qa": _qa_items,
        "capitals": lambda: sorted(_CAPITALS),
        "dates": lambda: list(range(365 * 40)),  # 1990-2029
    }[name]()


def load_text_task(name: str, sizes: dict[str, int] | None = None, seed: int = 0) -> TextTask:
    """One task with its train/val/test examples (``sizes`` per split, default mini sizes)."""
    if name not in ALL_TEXT_TASKS:
        raise ValueError(f"unknown text task {name!r}; choose from {ALL_TEXT_TASKS}")
    sizes = dict(MINI_TEXT_SIZES if sizes is None else sizes)
    task = TextTask(name)
    items = _items(name)
    for split, n in sizes.items():
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; splits are {SPLITS}")
        if n < 0:
            raise ValueError(f"split {split!r}: size must be >= 0, got {n}")
        pool = _pool(items, split, seed, name)
        picked = _sample(pool, n, _rng(seed, name, split), repeat=split == "train")
        task.splits[split] = [_make(name, it) for it in picked]
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
