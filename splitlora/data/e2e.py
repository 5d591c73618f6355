"""E2E NLG and the embedded synthetic data-to-text task: meaning representation -> sentence.

An :class:`Example` is a meaning representation (`source`) and a reference sentence (`target`). A
causal LM learns it as one sequence: ``prompt = source + separator`` followed by ``completion =
" " + target`` and the tokenizer's eos (see :mod:`splitlora.data.records`).
"""
from __future__ import annotations

import csv
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

#: Appended to the source to form the prompt; generation uses the same string (see evaluate.py).
DEFAULT_SEPARATOR = " ||"
#: Put before the target so a BPE tokenizer sees the first target word as a word (" There").
TARGET_PREFIX = " "
#: Label value that cross-entropy ignores (prompt and padding positions).



@dataclass(frozen=True)
class Example:
    source: str  # meaning representation, e.g. "name[The Eagle], eatType[coffee shop], food[French]"
    target: str  # reference text
    group: str  # category used for non-IID partitioning


# ---------------------------------------------------------------------------------------------
# E2E
# ---------------------------------------------------------------------------------------------

# The two published spellings of the same attribute names, mapped to one canonical key.
_KEY_ALIASES = {
    "name": "name",
    "eattype": "eatType",
    "type": "eatType",
    "food": "food",
    "pricerange": "priceRange",
    "price": "priceRange",
    "customerrating": "customerRating",
    "area": "area",
    "familyfriendly": "familyFriendly",
    "near": "near",
}
_BRACKET_FIELD = re.compile(r"\s*([^\[\],]+?)\s*\[([^\]]*)\]")


def _canonical_key(key: str) -> str:
    squashed = re.sub(r"[\s_]+", "", key).lower()
    return _KEY_ALIASES.get(squashed, key.strip())


def parse_mr(source: str) -> dict[str, str]:
    """Fields of an E2E meaning representation, keys canonical (``eatType``, ``priceRange``, ...).

    Accepts both spellings: ``name[Alimentum], eatType[pub]`` (the CSV release) and
    ``name : Alimentum | Type : pub`` (the LoRA repository's text files).
    """
    if "[" in source:
        return {_canonical_key(k): v.strip() for k, v in _BRACKET_FIELD.findall(source)}
    fields = {}
    for part in source.split("|"):
        key, sep, value = part.partition(":")
        if sep:
            fields[_canonical_key(key)] = value.strip()
    return fields


# How the text files (valid.txt, test.txt: the LoRA repository's release) spell each canonical key.
_TEXT_KEYS = {
    "name": "name",
    "eatType": "Type",
    "food": "food",
    "priceRange": "price",
    "customerRating": "customer rating",
    "area": "area",
    "familyFriendly": "family friendly",
    "near": "near",
}
# The text files' word splitting, in the Penn Treebank's manner, applied in this order: a quote
# that opens a word stands alone ("'The" -> "' The", but not the "'s" of a split contraction, so
# the whole is idempotent); contractions split off ("it's" -> "it 's", "isn't" -> "is n't"); a
# quote that closes a word stands alone; every other punctuation mark stands alone ("family-friendly"
# -> "family - friendly", "£20-25" -> "£ 20 - 25", "centre." -> "centre .").
_OPENING_QUOTE = re.compile(r"(?i)(^|\s)'(?!(?:s|re|ll|ve|d|m)\b)(?=\w)")
_CONTRACTION = re.compile(r"(?i)(\w)(n't|'s|'re|'ll|'ve|'d|'m)\b")
_CLOSING_QUOTE = re.compile(r"(?<=\S)'(?!\w)")
_PUNCTUATION = re.compile(r"([^\w\s'])")


def ref_to_text_form(text: str) -> str:
    """`text` split into words as the E2E text files split their references.

    ``"It's a family-friendly pub near Café Sicilia."`` -> ``"It 's a family - friendly pub near
    Café Sicilia ."``. On the 9,365 references of testset_w_refs.csv and devset.csv this gives the
    line of test.txt / valid.txt exactly for all but 116: those files are not consistent themselves
    (``"isn 't"`` in some lines, ``"is n't"`` in others; ``"5-star"`` unsplit). Idempotent.
    """
    text = _OPENING_QUOTE.sub(r"\1' ", text)
    text = _CONTRACTION.sub(r"\1 \2", text)
    text = _CLOSING_QUOTE.sub(" '", text)
    text = _PUNCTUATION.sub(r" \1 ", text)
    return " ".join(text.split())


def mr_to_text_form(source: str) -> str:
    """A meaning representation in the text files' spelling, from either spelling.

    ``"name[The Vaults], eatType[pub], priceRange[more than £30]"`` -> ``"name : The Vaults |
    Type : pub | price : more than £ 30"``: fields in the given order, keys as the text files
    write them (an attribute E2E does not have keeps its own name), values split into words as
    :func:`ref_to_text_form` does. On all 9,365 lines of testset_w_refs.csv and devset.csv the
    result equals the meaning representation on the same line of test.txt / valid.txt. Idempotent.
    Raises ValueError if `source` has no ``key[value]`` or ``key : value`` field.
    """
    fields = parse_mr(source)
    if not fields:
        raise ValueError(f"not an E2E meaning representation (no 'key[value]' or 'key : value' field): "
                         f"{source[:120]!r}")
    return " | ".join(f"{_TEXT_KEYS.get(key, key)} : {ref_to_text_form(value)}" for key, value in fields.items())


def _group_of(source: str, group_by: Sequence[str]) -> str:
    fields = parse_mr(source)
    for key in group_by:
        value = fields.get(_canonical_key(key))
        if value:
            return value
    return "unknown"


def read_e2e(path, group_by: str | Sequence[str] = ("food", "eatType"), *,
             text_form: bool = True) -> list[Example]:
    """Read E2E examples from ``mr||ref`` lines (any suffix but .csv) or a CSV with columns mr,ref.

    With `text_form` (the default) a CSV's meaning representations and references are rewritten
    in the text files' form (:func:`mr_to_text_form`, :func:`ref_to_text_form`), so that a model
    trained on valid.txt is scored on testset_w_refs.csv in the form it learnt: with a BPE
    tokenizer ``name[X], eatType[pub]`` and ``name : X | Type : pub`` share few tokens, nor do
    ``"centre."`` and ``"centre ."``; and sacrebleu's 13a tokenizer does not undo the difference
    either (``"it 's"``, ``"family - friendly"`` and ``"£ 20"`` stay apart from ``"it's"``,
    ``"family-friendly"``, ``"£20"``: scoring test.txt's references against the raw CSV's, each
    against the other references of its meaning representation, gives BLEU 55.7 instead of 59.5).
    Text files are returned as written. ``text_form=False`` returns a CSV as published.

    ``group`` is the value of the first field of `group_by` that the meaning representation has
    (``"unknown"`` when none): by default the food, else the eatType. (In valid.txt every eatType
    is "coffee shop" or absent, so the food separates the examples better.)
    Raises ValueError naming the file and line of a malformed line or missing column.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"E2E file not found: {path}")
    keys = (group_by,) if isinstance(group_by, str) else tuple(group_by)
    with open(path, encoding="utf-8", newline="") as f:
        first = f.readline()
        f.seek(0)
        is_csv = path.suffix.lower() == ".csv" or first.strip().lower().startswith("mr,")
        pairs = _read_csv(f, path) if is_csv else _read_lines(f, path)
    if is_csv and text_form:
        pairs = [(mr_to_text_form(mr), ref_to_text_form(ref)) for mr, ref in pairs]
    return [Example(source=mr, target=ref, group=_group_of(mr, keys)) for mr, ref in pairs]


def _read_lines(f, path: Path) -> list[tuple[str, str]]:
    pairs = []
    for lineno, line in enumerate(f, start=1):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        mr, sep, ref = line.partition("||")
        mr, ref = mr.strip(), ref.strip()
        if not sep or not mr or not ref or "||" in ref:
            raise ValueError(
                f"{path}:{lineno}: expected 'meaning representation||reference text' "
                f"(one '||' with text on both sides), got {line[:120]!r}"
            )
        pairs.append((mr, ref))
    return pairs


def _read_csv(f, path: Path) -> list[tuple[str, str]]:
    reader = csv.DictReader(f)
    columns = {name.strip().lower(): name for name in (reader.fieldnames or []) if name is not None}
    if "mr" not in columns or "ref" not in columns:
        raise ValueError(
            f"{path}:1: the CSV header needs columns 'mr' and 'ref', found {reader.fieldnames}"
        )
    mr_col, ref_col = columns["mr"], columns["ref"]
    pairs = []
    for row in reader:
        mr, ref = row.get(mr_col), row.get(ref_col)
        if mr is None or ref is None or not mr.strip() or not ref.strip() or None in row:
            # reader.line_num is the physical line where this (possibly multi-line) row ended.
            raise ValueError(
                f"{path}:{reader.line_num}: expected two fields (mr, ref), both non-empty, "
                f"got {row}"
            )
        pairs.append((mr.strip(), ref.strip()))
    return pairs


# ---------------------------------------------------------------------------------------------
# Synthetic data-to-text task
# ---------------------------------------------------------------------------------------------

_NAMES = ("The Eagle", "Blue Spice", "The Mill", "Green Man", "Alimentum", "The Punter",
          "Cotto", "Zizzi", "The Wrestlers", "Aromi")
_EAT_TYPES = ("pub", "coffee shop", "restaurant")
_FOODS = ("French", "Italian", "Chinese", "English", "Indian", "Japanese", "Fast food")
_AREAS = ("city centre", "riverside")
_PRICES = ("cheap", "moderate", "high")
_RATINGS = ("low", "average", "high")
_NEAR = ("Cafe Rouge", "Burger King", "The Bakers", "Raja Indian Cuisine", "Yippee Noodle Bar",
         "All Bar One")
_SYNTHETIC_FIELDS = ("name", "eatType", "food", "area", "priceRange", "customerRating",
                     "familyFriendly", "near")


def _realize(attrs: Mapping[str, str]) -> str:
    """The one reference sentence for an attribute set.

    Each eatType has its own sentence plan (opening, verb for food, order of the second sentence),
    so the mapping is learnable exactly, yet not a single fill-in-the-blanks template.
    """
    name, eat_type = attrs["name"], attrs["eatType"]
    food, area, near = attrs.get("food"), attrs.get("area"), attrs.get("near")
    price, rating, family = (attrs.get("priceRange"), attrs.get("customerRating"),
                             attrs.get("familyFriendly"))
    if eat_type == "pub":
        first = f"There is a pub called {name}"
        if food:
            first += f" that serves {food} food"
    elif eat_type == "coffee shop":
        first = f"{name} is a coffee shop"
        if food:
            first += f" serving {food} food"
    else:
        first = f"{name} is a {food} restaurant" if food else f"{name} is a restaurant"
    if area:
        first += f" in the {area}"
    if near:
        first += f" near {near}"
    sentences = [first + " ."]
    details = []
    if price:
        details.append(f"{price} prices")
    if rating:
        article = "an" if rating[0] in "aeiou" else "a"
        details.append(f"{article} {rating} customer rating")
    if details:
        sentences.append("It has " + " and ".join(details) + " .")
    if family:
        if eat_type == "pub":
            sentences.append("Children are welcome ." if family == "yes"
                             else "Children are not welcome .")
        else:
            sentences.append("It is family friendly ." if family == "yes"
                             else "It is not family friendly .")
    return " ".join(sentences)


def synthetic_examples(num_examples: int, seed: int = 0) -> list[Example]:
    """`num_examples` restaurant descriptions with distinct sources, needing no files.

    Deterministic per seed, and a prefix property holds: the first k examples of a call with
    n >= k are the examples of the call with k. ``group`` is the eatType (3 categories).
    """
    if not isinstance(num_examples, int) or num_examples < 0:
        raise ValueError(f"num_examples must be a non-negative int, got {num_examples!r}")
    rng = random.Random(seed)
    examples, seen = [], set()
    attempts = 0
    while len(examples) < num_examples:
        attempts += 1
        if attempts > 20 * num_examples + 1000:
            raise ValueError(f"could not draw {num_examples} distinct synthetic sources; ask for fewer")
        attrs = {"name": rng.choice(_NAMES), "eatType": rng.choice(_EAT_TYPES)}
        for key, values in (("food", _FOODS), ("area", _AREAS), ("priceRange", _PRICES),
                            ("customerRating", _RATINGS), ("familyFriendly", ("yes", "no")),
                            ("near", _NEAR)):
            if rng.random() < 0.6:
                attrs[key] = rng.choice(values)
        source = ", ".join(f"{k}[{attrs[k]}]" for k in _SYNTHETIC_FIELDS if k in attrs)
        if source in seen:
            continue
        seen.add(source)
        examples.append(Example(source=source, target=_realize(attrs), group=attrs["eatType"]))
    return examples
