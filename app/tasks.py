"""Programmatically checked list tasks for the embedded SmolLM2-135M-Instruct.

Every task asks for a short list, one item per line ("reasoning step" = one line), whose items must
satisfy a constraint a program can check. A task supplies

- ``prompt``: the user message; ``prompt_ids(tokenizer)`` renders it through the chat template and
  appends the ``response_prefix`` ``"1."``, so the model writes a numbered list (constrained
  generation: the first item starts right away, and every later item is a new line);
- ``is_correct(text) -> bool``: success of a completion (exactly ``n`` items, each valid, distinct);
- ``answer(text) -> str``: a canonical answer for majority voting (the normalised items, sorted when
  the order does not matter; ``""`` when nothing parses);
- ``step_score(text, finished) -> float in [0, 1]``: a partial-credit process reward on a prefix, the
  fraction of the ``n + 1`` constraints (one per item slot, one on the count) not yet violated; a
  finished completion also violates the slots it left empty, so ``step_score(text, True) == 1`` iff
  ``is_correct(text)``;
- ``final_score(text) -> float``: the outcome reward, 1 if correct else 0.

The parser is lenient about presentation and strict about content: leading blank lines and one
preamble line ending with ``:`` are skipped, the items are the first block of consecutive non-empty
lines (text after a blank line that follows the items is ignored), bullets (``1.``, ``2)``, ``-``,
``*``) and markdown emphasis are stripped, an explanation after `` - ``, ``:`` or ``(`` is dropped,
and a single line of comma-separated items is split on commas.

Families (``FAMILIES``), 20 prompts each (n = 2 and 3 alternate, so the first k prompts mix both):

- ``letter_words``: n distinct words (letters only) starting with a given letter;
- ``number_list``: n distinct integers greater than / less than / between given bounds (bare
  integers: ``"10 - 1 = 9"`` is not an item);
- ``closed_set``: n distinct members of a closed category (days, months, planets, continents,
  rainbow colours, seasons, vowels, oceans, chess pieces, primary colours), checked against the
  complete member list;
- ``acrostic``: two or three words whose first letters are given, in order.

Single-sample success of SmolLM2-135M-Instruct (:func:`measure_success`: 3 samples per prompt,
temperature 0.7, ``max_new_tokens=24``, chat template + the ``"1."`` prefix; Wilson 95% intervals):

============  ===========  ==================
family        successes    rate (95% CI)
============  ===========  ==================
letter_words  29/60        48.3% (36.2–60.7%)
number_list   5/60         8.3% (3.6–18.1%)
closed_set    11/60        18.3% (10.6–29.9%)
acrostic      5/60         8.3% (3.6–18.1%)
============  ===========  ==================

Reference: the task format follows the constrained-generation benchmarks used for SMC steering of
language models (Lew et al. 2023, "Sequential Monte Carlo steering of large language models using
probabilistic programs"); Puri et al. (2025) is the scaling experiment they serve.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable, Sequence

__all__ = [
    "ListTask",
    "FAMILIES",
    "get_tasks",
    "parse_items",
    "letter_words",
    "number_list",
    "closed_set",
    "acrostic",
    "measure_success",
    "wilson_interval",
]

_BULLET = re.compile(r"^\s*(?:\(?\d{1,2}\s*[.):]|[-*•+])(?:\s+|$)")
_EXPLANATION = re.compile(r"\s+[-–—]\s+|:|\(")
_WORD = re.compile(r"^[A-Za-z]+$")
_INT = re.compile(r"^[+-]?\d+$")
_STRIP = " \t\"'`*_.,;!?"


def _clean_item(line: str, strict: bool = False) -> str:
    s = _BULLET.sub("", line.strip())
    s = s.strip().strip("*_ ")
    if not strict:
        s = _EXPLANATION.split(s, maxsplit=1)[0]
    return s.strip(_STRIP)


def parse_items(text: str, finished: bool = True, strict: bool = False) -> list[str]:
    """The list items of a (possibly partial) completion.

    With ``finished=False`` the last line, if not yet terminated by a newline, is in progress and is
    not returned. ``strict`` keeps explanations (``"10 - 1 = 9"`` stays one item, not ``"10"``).
    """
    lines = text.split("\n")
    if not finished:
        lines = lines[:-1]  # the unterminated tail ("" when text ends with a newline)
    i = 0
    while i < len(lines) and not lines[i].strip():
        i += 1
    if i < len(lines) and lines[i].rstrip().endswith(":"):
        i += 1
        while i < len(lines) and not lines[i].strip():
            i += 1
    block = []
    while i < len(lines) and lines[i].strip():
        block.append(lines[i])
        i += 1
    if len(block) == 1 and "," in block[0]:
        parts = re.split(r",\s*(?:and\s+)?|\s+and\s+", _BULLET.sub("", block[0].strip()))
        return [p.strip(_STRIP) for p in parts if p.strip(_STRIP)]
    return [_clean_item(b, strict) for b in block]


@dataclasses.dataclass(frozen=True)
class ListTask:
    """One prompt asking for ``n`` distinct items, each checked by ``item_ok(item, index)``.

    ``ordered``: whether the order of the items is part of the answer (acrostics) or not (sets).
    """

    family: str
    prompt: str
    n: int
    item_ok: Callable[[str, int], bool]
    ordered: bool = False
    distinct: bool = True
    description: str = ""
    response_prefix: str = "1."
    strict: bool = False
    canon: Callable[[str], str] | None = None

    def items(self, completion: str, finished: bool = True) -> list[str]:
        """The parsed items of a completion (the response prefix included)."""
        return parse_items(self.response_prefix + completion, finished, self.strict)

    def prompt_text(self, tokenizer) -> str:
        """The chat-rendered prompt followed by the start of the assistant's answer."""
        return tokenizer.apply_chat_template([{"role": "user", "content": self.prompt}]) + self.response_prefix

    def prompt_ids(self, tokenizer) -> list[int]:
        """Token ids of :meth:`prompt_text` (what the generator continues)."""
        return tokenizer.encode(self.prompt_text(tokenizer), add_special_tokens=False)

    def _norm(self, item: str) -> str:
        """Canonical form of an item (distinctness and votes)."""
        return self.canon(item) if self.canon is not None else item.strip().lower()

    def _slots(self, items: Sequence[str]) -> list[bool]:
        seen: set[str] = set()
        ok = []
        for i, it in enumerate(items[: self.n]):
            k = self._norm(it)
            good = bool(it) and self.item_ok(it, i) and not (self.distinct and k in seen)
            seen.add(k)
            ok.append(good)
        return ok

    def is_correct(self, text: str) -> bool:
        """Success: exactly ``n`` items, each valid (and distinct)."""
        items = self.items(text, True)
        return len(items) == self.n and all(self._slots(items))

    def answer(self, text: str) -> str:
        """Canonical answer for voting: normalised items (sorted unless ``ordered``), ``|``-joined
        (``""`` when nothing parses). :meth:`answer_is_correct` decides success from it alone."""
        items = [self._norm(i).replace("|", "/") for i in self.items(text, True)]
        if not items:
            return ""
        return "|".join(items if self.ordered else sorted(items))

    def answer_is_correct(self, answer: str) -> bool:
        """Success decided from a canonical answer: ``answer_is_correct(answer(t)) == is_correct(t)``
        (lets a result judge every candidate it voted over, not only the selected one)."""
        items = answer.split("|") if answer else []
        return len(items) == self.n and all(self._slots(items))

    def step_score(self, text: str, finished: bool) -> float:
        """Fraction of the ``n + 1`` constraints (n item slots + the count) not yet violated.

        An unfinished prefix is judged on its complete lines only; a finished text also violates
        its empty slots, so the score is 1 exactly when the completion is correct.
        """
        items = self.items(text, finished)
        slots = self._slots(items)
        violated = sum(not s for s in slots)
        if finished:
            violated += self.n - len(slots)
        count_ok = len(items) <= self.n if not finished else len(items) == self.n
        return (self.n - violated + int(count_ok)) / (self.n + 1)

    def final_score(self, text: str) -> float:
        """Outcome reward: 1.0 if the completion is correct, else 0.0."""
        return 1.0 if self.is_correct(text) else 0.0

    @property
    def max_steps(self) -> int:
        """Step (line) cap: the items and one more line (a blank line, EOS, or an extra item)."""
        return self.n + 1


# ------------------------------------------------------------------------------------------------
# families
# ------------------------------------------------------------------------------------------------

_NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five"}


def _is_word(s: str) -> bool:
    return bool(_WORD.match(s)) and len(s) >= 2


def _as_int(s: str) -> int | None:
    return int(s) if _INT.match(s) else None


def letter_words(letter: str, n: int) -> ListTask:
    """n distinct words (letters only, length ≥ 2) starting with ``letter``."""
    L = letter.upper()

    def ok(item: str, _i: int) -> bool:
        return _is_word(item) and item[0].upper() == L

    prompt = f"Write {_NUMBER_WORDS[n]} different English words that start with the letter {L}."
    return ListTask("letter_words", prompt, n, ok, description=f"{n} words starting with {L}")


def number_list(kind: str, a: int, b: int | None, n: int) -> ListTask:
    """n distinct integers: ``greater`` than a, ``less`` than a, or ``between`` a and b (inclusive)."""
    if kind == "greater":
        pred, words = (lambda v: v > a), f"numbers greater than {a}"
    elif kind == "less":
        pred, words = (lambda v: v < a), f"numbers less than {a}"
    elif kind == "between":
        pred, words = (lambda v: a <= v <= b), f"numbers between {a} and {b}"
    else:
        raise ValueError(f"unknown number property {kind!r}")

    def ok(item: str, _i: int) -> bool:
        v = _as_int(item)
        return v is not None and pred(v)

    prompt = f"Write {_NUMBER_WORDS[n]} different {words}."
    return ListTask("number_list", prompt, n, ok, description=f"{n} {words}", strict=True)


_CATEGORIES = {
    "days of the week": ("monday tuesday wednesday thursday friday saturday sunday", 3),
    "months of the year": ("january february march april may june july august september october "
                           "november december", 3),
    "planets of the solar system": ("mercury venus earth mars jupiter saturn uranus neptune", 3),
    "continents": ("africa antarctica asia australia europe oceania north_america south_america", 3),
    "colors of the rainbow": ("red orange yellow green blue indigo violet", 3),
    "seasons of the year": ("spring summer autumn fall winter", 3),
    "vowels of the English alphabet": ("a e i o u", 3),
    "oceans": ("pacific atlantic indian arctic southern antarctic", 3),
    "chess pieces": ("king queen rook castle bishop knight pawn", 3),
    "primary colors": ("red yellow blue", 3),
}
_SUFFIXES = (" ocean", " piece", " season")
_ALIASES = {"castle": "rook", "fall": "autumn", "antarctic": "southern"}


def _category_key(item: str) -> str:
    k = " ".join(item.lower().replace("the ", " ").split())
    for suf in _SUFFIXES:
        if k.endswith(suf):
            k = k[: -len(suf)]
    return _ALIASES.get(k, k)


def closed_set(category: str, n: int) -> ListTask:
    """n distinct members of a closed category (days, months, planets, ...), checked against the
    complete list of its members."""
    if category not in _CATEGORIES:
        raise ValueError(f"unknown category {category!r}; choose from {sorted(_CATEGORIES)}")
    members = frozenset(m.replace("_", " ") for m in _CATEGORIES[category][0].split())

    def ok(item: str, _i: int) -> bool:
        return item.lower().strip() in members or _category_key(item) in members

    prompt = f"Name {_NUMBER_WORDS[n]} {category}."
    return ListTask("closed_set", prompt, n, ok, description=f"{n} {category}", canon=_category_key)


def acrostic(word: str) -> ListTask:
    """len(word) words, one per line, whose first letters spell ``word`` in order."""
    W = word.upper()

    def ok(item: str, i: int) -> bool:
        return _is_word(item) and item[0].upper() == W[i]

    ordinals = ["first", "second", "third", "fourth"]
    parts = [f"the {ordinals[i]} word starts with {c}" for i, c in enumerate(W)]
    prompt = (f"Write {_NUMBER_WORDS[len(W)]} words, one per line: " + ", ".join(parts[:-1])
              + f" and {parts[-1]}.")
    return ListTask("acrostic", prompt, len(W), ok, ordered=True, distinct=False,
                    description=f"acrostic of {W}")


# (letter, n): two- and three-word lists alternate, so the first k prompts mix both lengths
_LETTER_SPECS = [("B", 2), ("C", 3), ("D", 2), ("F", 3), ("G", 2), ("H", 3), ("L", 2), ("M", 3), ("P", 2),
                 ("R", 3), ("S", 2), ("A", 3), ("B", 3), ("C", 2), ("D", 3), ("G", 3), ("M", 2), ("P", 3),
                 ("T", 2), ("W", 3)]
_NUMBER_SPECS = [
    ("greater", 50, None), ("greater", 100, None), ("greater", 20, None), ("greater", 1000, None),
    ("less", 10, None), ("less", 20, None), ("less", 100, None),
    ("between", 10, 20), ("between", 50, 60), ("between", 100, 200),
]
_ACROSTIC_WORDS = ["CA", "DOG", "SU", "MAP", "HA", "PEN", "BO", "CUP", "RE", "TOP",
                   "CAT", "DO", "SUN", "MA", "HAT", "PE", "BOX", "CU", "RED", "TO"]


def _family_letter_words() -> list[ListTask]:
    return [letter_words(L, n) for L, n in _LETTER_SPECS]


def _family_number_list() -> list[ListTask]:
    return [number_list(k, a, b, n) for (k, a, b) in _NUMBER_SPECS for n in (2, 3)]


def _family_closed_set() -> list[ListTask]:
    return [closed_set(c, n) for c, (_, top) in _CATEGORIES.items() for n in (2, 3) if n <= top]


def _family_acrostic() -> list[ListTask]:
    return [acrostic(w) for w in _ACROSTIC_WORDS]


FAMILIES: dict[str, Callable[[], list[ListTask]]] = {
    "letter_words": _family_letter_words,
    "number_list": _family_number_list,
    "closed_set": _family_closed_set,
    "acrostic": _family_acrostic,
}


def get_tasks(family: str, num_prompts: int | None = None) -> list[ListTask]:
    """The first ``num_prompts`` tasks of ``family`` (all of them when None)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown task family {family!r}; choose from {sorted(FAMILIES)}")
    tasks = FAMILIES[family]()
    if num_prompts is not None:
        if not isinstance(num_prompts, int) or num_prompts < 1:
            raise ValueError(f"num_prompts must be a positive integer, got {num_prompts!r}")
        if num_prompts > len(tasks):
            raise ValueError(f"family {family!r} has {len(tasks)} prompts, asked for {num_prompts}")
        tasks = tasks[:num_prompts]
    return tasks


# ------------------------------------------------------------------------------------------------
# measurement
# ------------------------------------------------------------------------------------------------


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion."""
    if trials == 0:
        return (0.0, 1.0)
    p = successes / trials
    d = 1 + z * z / trials
    c = (p + z * z / (2 * trials)) / d
    h = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def measure_success(
    model, tokenizer, tasks: Sequence[ListTask], key, *, samples_per_prompt: int = 4,
    temperature: float = 0.8, max_new_tokens: int = 32, batch_size: int = 40,
) -> dict:
    """Single-sample success rate of ``tasks`` under plain sampling (batched ``generate_text``).

    Returns ``{"rate", "ci95", "successes", "trials", "per_task": [...], "texts": [...]}``.
    """
    import jax

    from models.llm import Sampling, generate_text

    prompts = [t.prompt_text(tokenizer) for t in tasks for _ in range(samples_per_prompt)]
    owners = [t for t in tasks for _ in range(samples_per_prompt)]
    texts: list[str] = []
    for b in range(0, len(prompts), batch_size):
        key, sub = jax.random.split(key)
        texts += generate_text(model, tokenizer, prompts[b:b + batch_size], sub,
                               max_new_tokens=max_new_tokens,
                               sampling=Sampling(temperature=temperature), chat=False).texts
    ok = [t.is_correct(x) for t, x in zip(owners, texts)]
    per_task = [sum(ok[i * samples_per_prompt:(i + 1) * samples_per_prompt]) / samples_per_prompt
                for i in range(len(tasks))]
    s = sum(ok)
    return {"rate": s / len(ok), "ci95": wilson_interval(s, len(ok)), "successes": s,
            "trials": len(ok), "per_task": per_task, "texts": texts, "correct": ok}


# ------------------------------------------------------------------------------------------------
# training prompts (for learned rewards): the same four families, disjoint from FAMILIES
# ------------------------------------------------------------------------------------------------

# letters not used by the evaluation prompts (FAMILIES uses A B C D F G H L M P R S T W)
_TRAIN_LETTER_SPECS = [("E", 2), ("K", 3), ("N", 2), ("O", 3), ("I", 2), ("J", 3), ("V", 2), ("Y", 3),
                       ("U", 2), ("Z", 3), ("Q", 2), ("E", 3), ("K", 2), ("N", 3), ("O", 2), ("I", 3),
                       ("J", 2), ("V", 3), ("Y", 2), ("U", 3)]
# bounds not used by the evaluation prompts
_TRAIN_NUMBER_SPECS = [
    ("greater", 30, None), ("greater", 70, None), ("greater", 500, None), ("greater", 5, None),
    ("less", 50, None), ("less", 30, None), ("less", 1000, None),
    ("between", 1, 10), ("between", 20, 30), ("between", 200, 300),
]
# closed categories not among the evaluation ones: category -> its complete members (and variants)
_TRAIN_CATEGORIES = {
    "cardinal directions": "north south east west",
    "suits in a deck of playing cards": "hearts diamonds clubs spades heart diamond club spade",
    "states of matter": "solid liquid gas plasma",
    "Great Lakes of North America": "superior michigan huron erie ontario",
    "noble gases": "helium neon argon krypton xenon radon oganesson",
    "colors of a traffic light": "red yellow amber green",
    "meals of the day": "breakfast lunch dinner supper brunch",
    "houses of Hogwarts": "gryffindor hufflepuff ravenclaw slytherin",
    "Scandinavian countries": "denmark norway sweden",
    "colors of the Olympic rings": "blue yellow black green red",
}
_TRAIN_PREFIXES = ("lake ", "house ", "the ")
_TRAIN_ACROSTIC_WORDS = ["AN", "BAG", "GO", "FIG", "HE", "JAR", "IN", "LOG", "ME", "NET",
                         "NO", "OWL", "SO", "RUG", "UP", "VAN", "WE", "ANT", "OF", "HEN"]


def _train_key(item: str) -> str:
    k = _category_key(item)
    for pre in _TRAIN_PREFIXES:
        if k.startswith(pre):
            k = k[len(pre):]
    return k


def _train_closed_set(category: str, n: int) -> ListTask:
    members = frozenset(_TRAIN_CATEGORIES[category].split())

    def ok(item: str, _i: int) -> bool:
        return item.lower().strip() in members or _train_key(item) in members

    prompt = f"Name {_NUMBER_WORDS[n]} {category}."
    return ListTask("closed_set", prompt, n, ok, description=f"{n} {category}", canon=_train_key)


def _train_family(family: str) -> list[ListTask]:
    if family == "letter_words":
        return [letter_words(L, n) for L, n in _TRAIN_LETTER_SPECS]
    if family == "number_list":
        return [number_list(k, a, b, n) for (k, a, b) in _TRAIN_NUMBER_SPECS for n in (2, 3)]
    if family == "closed_set":
        return [_train_closed_set(c, n) for c in _TRAIN_CATEGORIES for n in (2, 3)]
    if family == "acrostic":
        return [acrostic(w) for w in _TRAIN_ACROSTIC_WORDS]
    raise ValueError(f"unknown task family {family!r}; choose from {sorted(FAMILIES)}")


def train_tasks(family: str, num: int | None = None) -> list[ListTask]:
    """The first ``num`` of 20 *training* prompts of ``family`` (all when None): the same task family
    and checker as :data:`FAMILIES` on other letters, number bounds, categories and acrostic words,
    for fitting learned rewards (:mod:`app.train_prm`). Disjoint from the evaluation prompts: no
    prompt text is shared (checked here), and the letters, bounds, categories and acrostic words all
    differ from those of the evaluation prompts (by construction; tests/test_prm.py checks it)."""
    tasks = _train_family(family)
    if num is not None:
        if not isinstance(num, int) or num < 1:
            raise ValueError(f"num must be a positive integer, got {num!r}")
        if num > len(tasks):
            raise ValueError(f"family {family!r} has {len(tasks)} training prompts, asked for {num}")
        tasks = tasks[:num]
    evaluation = {t.prompt for t in FAMILIES[family]()}
    shared = [t.prompt for t in tasks if t.prompt in evaluation]
    if shared:
        raise RuntimeError(f"training prompts shared with the evaluation prompts: {shared}")
    return tasks
__all__ += ["train_tasks"]
