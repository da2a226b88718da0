"""The synthetic chat task of the fine-tuning evidence (issue 29): conversations a small model learns from scratch
and a program grades.

Two kinds of request, each phrased several ways, some conversations with a system prompt, some with two turns:

- reverse: "Reverse the order of these words: owl river lamp" -> ``lamp river owl`` (3 to 7 distinct words from
  :data:`WORDS`, answered separated by single spaces);
- sort: "Sort these numbers from smallest to largest: 42, 7, 19" -> ``7, 19, 42`` (3 to 7 distinct numbers below
  100, answered separated by ", ").

A training set and a held-out set come from one seed; no request of a held-out conversation (its kind and its set of
words or numbers, in any order) occurs in any turn of a training conversation, so a held-out answer cannot be
remembered. Every
conversation is a ``{"messages": [{"role", "content"}, ...]}`` record ending with an assistant turn; a held-out record
also carries ``"answer"``, the text of its last turn, which exact match compares with. Pure Python: no GPU, no
tokenizer.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

#: Common English words, each its own item to reverse.
WORDS: tuple[str, ...] = (
    "apple", "river", "stone", "cloud", "tiger", "lamp", "window", "garden", "pencil", "ocean", "mountain", "candle",
    "forest", "bridge", "rabbit", "orange", "silver", "castle", "mirror", "bottle", "engine", "pocket", "ladder",
    "basket", "island", "violin", "wagon", "jacket", "kettle", "spoon", "barrel", "meadow", "harbor", "falcon",
    "pepper", "button", "cherry", "dragon", "feather", "giant", "helmet", "jungle", "lemon", "marble", "needle",
    "parrot", "rocket", "saddle", "tunnel", "velvet", "whistle", "yellow", "zebra", "anchor", "blanket", "cactus",
    "desert", "eagle", "fossil", "guitar", "hammer", "igloo", "jelly", "koala", "lantern", "magnet", "nickel",
    "oyster", "pillow", "quartz", "ribbon", "shovel", "throne", "umbrella", "valley", "walnut", "yogurt", "acorn",
    "bamboo", "copper", "dolphin", "emerald", "fountain", "glacier", "hazel", "insect", "jasmine", "kitten",
    "lobster", "mango", "nectar", "orchid", "planet", "quiver", "radish", "sparrow", "tomato",
)  # fmt: skip
#: Numbers to sort are drawn below this.
NUMBER_LIMIT = 100
#: How many items one request has.
MIN_ITEMS, MAX_ITEMS = 3, 7

#: Phrasings of each request; ``{items}`` is the list as the prompt writes it.
REVERSE_PROMPTS: tuple[str, ...] = (
    "Reverse the order of these words: {items}",
    "Write these words in reverse order: {items}",
    "Please list the following words from last to first: {items}",
    "What are these words in reverse order? {items}",
    "{items}\nGive me these words backwards.",
    "Turn this list of words around so the last comes first: {items}",
)
SORT_PROMPTS: tuple[str, ...] = (
    "Sort these numbers from smallest to largest: {items}",
    "Put these numbers in ascending order: {items}",
    "Please order the following numbers, smallest first: {items}",
    "What are these numbers sorted in increasing order? {items}",
    "{items}\nSort them from low to high.",
    "Arrange in ascending order: {items}",
)
SYSTEM_PROMPTS: tuple[str, ...] = (
    "You are a helpful assistant.",
    "You are a careful assistant. Reply with the answer only.",
    "Answer tersely.",
    "You follow instructions exactly.",
)
#: Shares of conversations with a system prompt and with two user turns.
SYSTEM_SHARE, TWO_TURN_SHARE = 0.4, 0.25


@dataclass(frozen=True)
class Request:
    """One request: its kind (``reverse`` or ``sort``) and its items in the order the prompt gives them."""

    kind: str
    items: tuple[str, ...]

    def key(self) -> tuple[str, frozenset[str]]:
        """What disjointness compares: the kind and the set of items (a reordered held-out request is no new one)."""
        return self.kind, frozenset(self.items)

    def answer(self) -> str:
        if self.kind == "reverse":
            return " ".join(reversed(self.items))
        return ", ".join(str(n) for n in sorted(int(item) for item in self.items))

    def prompt(self, phrasing: int) -> str:
        if self.kind == "reverse":
            return REVERSE_PROMPTS[phrasing % len(REVERSE_PROMPTS)].format(items=" ".join(self.items))
        # Numbers are written "a, b, c" in most phrasings and "a b c" in some, as people write them.
        separator = " " if phrasing % 3 == 2 else ", "
        return SORT_PROMPTS[phrasing % len(SORT_PROMPTS)].format(items=separator.join(self.items))


@dataclass(frozen=True)
class TaskSpec:
    """What the generated sets are; recorded as ``task`` in sft.json."""

    seed: int
    train_conversations: int
    heldout_conversations: int
    kinds: tuple[str, ...] = ("reverse", "sort")
    words: int = len(WORDS)
    number_limit: int = NUMBER_LIMIT
    items: tuple[int, int] = (MIN_ITEMS, MAX_ITEMS)
    phrasings: int = len(REVERSE_PROMPTS)
    system_share: float = SYSTEM_SHARE
    two_turn_share: float = TWO_TURN_SHARE

    def describe(self) -> dict[str, Any]:
        record = asdict(self)
        record["description"] = (
            "reverse 3-7 words / sort 3-7 numbers below 100, six phrasings each, a system prompt in ~40% and two user "
            "turns in ~25% of conversations; exact match of the last answer; held-out requests never occur in training"
        )
        return record


def _random_request(rng: random.Random) -> Request:
    count = rng.randint(MIN_ITEMS, MAX_ITEMS)
    if rng.random() < 0.5:
        return Request("reverse", tuple(rng.sample(WORDS, count)))
    return Request("sort", tuple(str(n) for n in rng.sample(range(NUMBER_LIMIT), count)))


def _conversation(rng: random.Random, requests: list[Request]) -> dict[str, Any]:
    messages: list[dict[str, str]] = []
    if rng.random() < SYSTEM_SHARE:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    for request in requests:
        messages.append({"role": "user", "content": request.prompt(rng.randrange(len(REVERSE_PROMPTS)))})
        messages.append({"role": "assistant", "content": request.answer()})
    return {"messages": messages}


def _conversations(rng: random.Random, count: int, avoid: set[Any], taken: set[Any]) -> Iterator[dict[str, Any]]:
    """``count`` conversations none of whose requests' keys is in ``avoid``; their keys are added to ``taken``."""
    made = 0
    while made < count:
        turns = 2 if rng.random() < TWO_TURN_SHARE else 1
        requests = [_random_request(rng) for _ in range(turns)]
        if any(request.key() in avoid for request in requests):
            continue
        taken.update(request.key() for request in requests)
        made += 1
        yield _conversation(rng, requests)


def generate(spec: TaskSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The training and the held-out conversations of ``spec`` (the same for the same spec, on any machine).

    The held-out set is drawn first; training conversations with any of its requests are drawn again. A held-out
    record carries ``answer``, its last turn's text.
    """
    rng = random.Random(spec.seed)
    heldout_requests: set[Any] = set()
    heldout = list(_conversations(rng, spec.heldout_conversations, set(), heldout_requests))
    for record in heldout:
        record["answer"] = record["messages"][-1]["content"]
    train = list(_conversations(rng, spec.train_conversations, heldout_requests, set()))
    return train, heldout


def requests_of(conversation: dict[str, Any]) -> list[Request]:
    """The requests of a generated conversation, read back from its text (for the disjointness check)."""
    found = []
    messages = conversation["messages"]
    for user, assistant in itertools.pairwise(messages):
        if user["role"] != "user" or assistant["role"] != "assistant":
            continue
        answer = assistant["content"]
        if "," in answer or answer.isdigit():
            numbers = tuple(n for n in user["content"].replace(",", " ").split() if n.isdigit())
            found.append(Request("sort", numbers))
        else:
            words = tuple(w for w in user["content"].split() if w in _WORD_SET)
            found.append(Request("reverse", words))
    return found


_WORD_SET = frozenset(WORDS)


def prompt_messages(record: dict[str, Any]) -> list[dict[str, str]]:
    """A held-out conversation without its last (assistant) turn: what the model is asked."""
    messages = record["messages"]
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("a held-out conversation must end with the assistant's answer")
    return messages[:-1]


def exact_match(answers: Iterable[str], expected: Iterable[str]) -> float:
    """Share of answers equal to the expected text, surrounding whitespace ignored (the chat template trims too)."""
    pairs = list(zip(answers, expected, strict=True))
    if not pairs:
        raise ValueError("no answers to grade")
    return sum(answer.strip() == want.strip() for answer, want in pairs) / len(pairs)


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> int:
    count = 0
    with path.open("w", encoding="utf-8") as file:
        for record in records:
            file.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
