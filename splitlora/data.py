"""Data for the trainer: E2E and synthetic data-to-text examples, tokenizers, client partitions.

An example is a meaning representation (`source`) and a reference sentence (`target`). A causal LM
learns it as one sequence: ``prompt = source + separator`` followed by ``completion = " " + target``
and the tokenizer's eos. Prompt and completion are encoded separately and concatenated, so the
prompt tokens seen at generation time are exactly the ones seen in training (a BPE merge across
the boundary cannot happen). Only the completion (target tokens and the eos) carries labels.

Client data is a list of indices into one :class:`TokenizedDataset`; :func:`partition` makes those
lists (IID or Dirichlet non-IID over a per-example group) and :class:`ClientLoader` draws endless
shuffled mini-batches from one list with its own generator, whose state can be saved and restored.

Shared files are never looked up relative to this package: callers pass paths, or set
``SPLITLORA_DATA`` to the folder holding ``e2e/`` (used by :func:`load_dataset` when no path is given).
"""
from __future__ import annotations

import csv
import json
import logging
import os
import random
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

__all__ = [
    "DEFAULT_SEPARATOR",
    "TARGET_PREFIX",
    "IGNORE_INDEX",
    "PARTITION_SCHEMES",
    "DATASET_SOURCES",
    "Example",
    "parse_mr",
    "mr_to_text_form",
    "ref_to_text_form",
    "read_e2e",
    "synthetic_examples",
    "WordTokenizer",
    "HFTokenizer",
    "load_tokenizer",
    "TokenizedDataset",
    "tokenize",
    "partition",
    "group_skew",
    "ClientLoader",
    "load_dataset",
]

logger = logging.getLogger(__name__)

#: Appended to the source to form the prompt; generation uses the same string (see evaluate.py).
DEFAULT_SEPARATOR = " ||"
#: Put before the target so a BPE tokenizer sees the first target word as a word (" There").
TARGET_PREFIX = " "
#: Label value that cross-entropy ignores (prompt and padding positions).
IGNORE_INDEX = -100
PARTITION_SCHEMES = ("iid", "dirichlet")
DATASET_SOURCES = ("synthetic", "e2e")


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


# ---------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------

# A word keeps its leading space (as GPT-2 BPE does), so decode(encode(text)) == text exactly.
_WORD_PATTERN = re.compile(r" ?\w+| ?[^\w\s]|\s+")
_WORD_FILE_KEY = "splitlora_word_tokenizer"


class WordTokenizer:
    """Word-level tokenizer for small experiments, its vocabulary built from examples.

    Tokens are words and single punctuation marks, each with its leading space if it has one.
    Ids 0, 1, 2 are ``<pad>``, ``<eos>``, ``<unk>``; the rest are the sorted tokens of the texts,
    so the vocabulary does not depend on the order of the examples.
    """

    PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"

    def __init__(self, vocab: Sequence[str]):
        vocab = list(vocab)
        if vocab[:3] != [self.PAD, self.EOS, self.UNK]:
            raise ValueError(f"vocab must start with {[self.PAD, self.EOS, self.UNK]}, got {vocab[:3]}")
        if len(set(vocab)) != len(vocab):
            raise ValueError("vocab has duplicate tokens")
        self.vocab = vocab
        self._ids = {token: i for i, token in enumerate(vocab)}
        self.pad_id, self.eos_id, self.unk_id = 0, 1, 2

    @staticmethod
    def split(text: str) -> list[str]:
        return _WORD_PATTERN.findall(text)

    @classmethod
    def from_texts(cls, texts: Iterable[str], separator: str = DEFAULT_SEPARATOR) -> "WordTokenizer":
        tokens = set(cls.split(separator)) | set(cls.split(TARGET_PREFIX))
        for text in texts:
            tokens.update(cls.split(text))
            # Targets are encoded after TARGET_PREFIX, so their first word appears with a space.
            tokens.update(cls.split(TARGET_PREFIX + text))
        tokens -= {cls.PAD, cls.EOS, cls.UNK}
        return cls([cls.PAD, cls.EOS, cls.UNK, *sorted(tokens)])

    @classmethod
    def from_examples(cls, examples: Iterable[Example], separator: str = DEFAULT_SEPARATOR):
        texts = []
        for example in examples:
            texts.extend((example.source, example.target))
        return cls.from_texts(texts, separator)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        return [self._ids.get(token, self.unk_id) for token in self.split(text)]

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.vocab[int(i)] for i in ids)

    def save(self, path) -> None:
        Path(path).write_text(json.dumps({_WORD_FILE_KEY: 1, "vocab": self.vocab}), encoding="utf-8")

    @classmethod
    def load(cls, path) -> "WordTokenizer":
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if _WORD_FILE_KEY not in data:
            raise ValueError(f"{path} is not a WordTokenizer file (no {_WORD_FILE_KEY!r} key)")
        return cls(data["vocab"])

    def __repr__(self) -> str:
        return f"WordTokenizer(vocab_size={self.vocab_size})"


_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|im_end|>", "<|end_of_text|>", "<eos>")


class HFTokenizer:
    """The trainer's tokenizer interface over a transformers tokenizer.

    No special tokens are added by encode (prompt and completion are concatenated by `tokenize`),
    and decode keeps spacing as is. A tokenizer without a pad token (GPT-2) pads with eos: padded
    positions are masked out of attention and labels, so the id does not matter.
    """

    def __init__(self, tokenizer):
        self.hf = tokenizer
        eos_id = tokenizer.eos_token_id
        if eos_id is None:
            vocab = tokenizer.get_vocab()
            eos_id = next((vocab[t] for t in _EOS_CANDIDATES if t in vocab), None)
        if eos_id is None:
            raise ValueError(
                f"tokenizer {type(tokenizer).__name__} has no eos token and none of "
                f"{list(_EOS_CANDIDATES)}; set tokenizer.eos_token before use"
            )
        self.eos_id = int(eos_id)
        pad_id = tokenizer.pad_token_id
        self.pad_id = int(pad_id) if pad_id is not None else self.eos_id
        self.vocab_size = len(tokenizer)

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=False,
                              clean_up_tokenization_spaces=False)

    def __repr__(self) -> str:
        return f"HFTokenizer({type(self.hf).__name__}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def load_tokenizer(path: str | os.PathLike | None, examples: Iterable[Example] | None = None,
                   separator: str = DEFAULT_SEPARATOR):
    """A tokenizer with encode, decode, eos_id, pad_id and vocab_size.

    `path` may be None (a :class:`WordTokenizer` built from `examples`), a WordTokenizer JSON file,
    a ``tokenizer.json`` file, a ``.gguf`` model file, or a folder: one that
    ``AutoTokenizer.from_pretrained`` reads (has tokenizer_config.json or config.json), or one with
    only ``tokenizer.json`` or ``vocab.json`` + ``merges.txt`` (GPT-2 BPE, as in shared data).
    """
    if path is None:
        if examples is None:
            raise ValueError("load_tokenizer(None) builds a word tokenizer from examples: pass examples")
        examples = list(examples)
        if not examples:
            raise ValueError("load_tokenizer(None, examples) needs at least one example")
        return WordTokenizer.from_examples(examples, separator)

    path = Path(path)
    if path.is_file():
        if path.suffix == ".gguf":
            from transformers import AutoTokenizer

            return HFTokenizer(AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name))
        if path.suffix == ".json":
            with open(path, encoding="utf-8") as f:
                head = f.read(200)
            if _WORD_FILE_KEY in head:
                return WordTokenizer.load(path)
            return _from_tokenizer_json(path)
        raise ValueError(f"unrecognised tokenizer file {path}: expected tokenizer.json, a "
                         f"WordTokenizer .json or a .gguf file")
    if path.is_dir():
        if (path / "tokenizer_config.json").is_file() or (path / "config.json").is_file():
            from transformers import AutoTokenizer

            return HFTokenizer(AutoTokenizer.from_pretrained(str(path)))
        if (path / "tokenizer.json").is_file():
            return _from_tokenizer_json(path / "tokenizer.json")
        if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            from transformers import GPT2TokenizerFast

            return HFTokenizer(GPT2TokenizerFast(vocab_file=str(path / "vocab.json"),
                                                 merges_file=str(path / "merges.txt")))
        raise ValueError(f"no tokenizer found in folder {path}: expected tokenizer_config.json, "
                         f"tokenizer.json, or vocab.json with merges.txt")
    raise FileNotFoundError(f"tokenizer path does not exist: {path}")


def _from_tokenizer_json(path: Path) -> HFTokenizer:
    from transformers import PreTrainedTokenizerFast

    return HFTokenizer(PreTrainedTokenizerFast(tokenizer_file=str(path)))


# ---------------------------------------------------------------------------------------------
# Tokenized dataset
# ---------------------------------------------------------------------------------------------

@dataclass
class TokenizedDataset:
    """Right-padded token tensors, one row per example.

    ``labels`` equals ``input_ids`` on the completion (target tokens and the final eos) and is
    IGNORE_INDEX on the prompt and the padding; like Hugging Face causal LMs, the loss shifts it
    (logits at position t predict labels at t+1).
    """

    input_ids: torch.Tensor  # [N, T] long
    attention_mask: torch.Tensor  # [N, T] long
    labels: torch.Tensor  # [N, T] long
    num_target_tokens: torch.Tensor  # [N] long: label positions per example
    truncated: torch.Tensor  # [N] bool: the completion was cut at max_length

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_truncated(self) -> int:
        return int(self.truncated.sum())

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def _index(self, indices) -> torch.Tensor:
        index = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        if index.numel() and (int(index.min()) < -len(self) or int(index.max()) >= len(self)):
            raise IndexError(f"indices out of range for a dataset of {len(self)} examples")
        return index

    def subset(self, indices) -> "TokenizedDataset":
        index = self._index(indices)
        return TokenizedDataset(self.input_ids[index], self.attention_mask[index],
                                self.labels[index], self.num_target_tokens[index],
                                self.truncated[index])

    def batch(self, indices, trim: bool = False) -> dict[str, torch.Tensor]:
        """input_ids, attention_mask, labels for `indices`.

        With ``trim`` the trailing columns that are padding in every row are dropped; with right
        padding and causal attention that changes no logit at a real position.
        """
        index = self._index(indices)
        batch = {"input_ids": self.input_ids[index], "attention_mask": self.attention_mask[index],
                 "labels": self.labels[index]}
        if trim and index.numel():
            length = int(batch["attention_mask"].sum(dim=1).max())
            batch = {k: v[:, :max(length, 1)] for k, v in batch.items()}
        return batch


def tokenize(examples: Sequence[Example], tokenizer, max_length: int,
             separator: str = DEFAULT_SEPARATOR) -> TokenizedDataset:
    """Encode ``source + separator`` (prompt) then ``TARGET_PREFIX + target`` and eos (completion).

    Rows are right-padded to the longest sequence in the set. A sequence longer than `max_length`
    keeps its whole prompt and as much of the completion as fits (its eos is then cut too, and it
    counts in ``num_truncated``). If a prompt leaves no room for even one completion token the
    target would be silently lost, so that raises ValueError naming max_length and the length
    the example needs.
    """
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
    examples = list(examples)
    if not examples:
        raise ValueError("tokenize needs at least one example")
    rows, prompt_lens, truncated = [], [], []
    for i, example in enumerate(examples):
        prompt = tokenizer.encode(example.source + separator)
        completion = tokenizer.encode(TARGET_PREFIX + example.target) + [tokenizer.eos_id]
        if len(prompt) + 1 > max_length:
            raise ValueError(
                f"example {i}: its prompt alone is {len(prompt)} tokens, so with max_length="
                f"{max_length} no target token fits (the full example needs "
                f"{len(prompt) + len(completion)}); raise max_length. Source: {example.source[:80]!r}"
            )
        ids = prompt + completion
        truncated.append(len(ids) > max_length)
        rows.append(ids[:max_length])
        prompt_lens.append(len(prompt))
    if any(truncated):
        logger.warning("%d of %d examples were longer than max_length=%d: their targets were cut",
                       sum(truncated), len(examples), max_length)
    length = max(len(r) for r in rows)
    n = len(rows)
    input_ids = torch.full((n, length), tokenizer.pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, length), dtype=torch.long)
    labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
    num_target = torch.empty(n, dtype=torch.long)
    for i, (ids, p) in enumerate(zip(rows, prompt_lens)):
        row = torch.tensor(ids, dtype=torch.long)
        input_ids[i, :len(ids)] = row
        attention_mask[i, :len(ids)] = 1
        labels[i, p:len(ids)] = row[p:]
        num_target[i] = len(ids) - p
    return TokenizedDataset(input_ids, attention_mask, labels, num_target,
                            torch.tensor(truncated, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------
# Client partitioning and loading
# ---------------------------------------------------------------------------------------------

def partition(groups: Sequence[str], num_clients: int, scheme: str = "iid", alpha: float = 0.5,
              seed: int = 0) -> list[list[int]]:
    """Split example indices ``0..len(groups)-1`` among clients; each list is sorted.

    ``"iid"``: a shuffled equal split (sizes differ by at most one).
    ``"dirichlet"``: for every group, the share of each client is drawn from Dirichlet(alpha)
    (small alpha: each group concentrates on few clients). A client left empty then gets one
    example from the currently largest client, until none is empty.
    """
    n = len(groups)
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise ValueError(f"num_clients must be an int >= 1, got {num_clients!r}")
    if num_clients > n:
        raise ValueError(f"num_clients={num_clients} is more than the {n} examples to split; "
                         f"every client needs at least one")
    if scheme not in PARTITION_SCHEMES:
        raise ValueError(f"unknown partition scheme {scheme!r}; allowed: {', '.join(PARTITION_SCHEMES)}")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        order = rng.permutation(n)
        return [sorted(int(i) for i in part) for part in np.array_split(order, num_clients)]

    if not alpha > 0:
        raise ValueError(f"alpha must be > 0 for the dirichlet scheme, got {alpha!r}")
    by_group: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        by_group[g].append(i)
    clients: list[list[int]] = [[] for _ in range(num_clients)]
    for g in sorted(by_group):
        members = rng.permutation(by_group[g])
        shares = rng.dirichlet(np.full(num_clients, float(alpha)))
        cuts = (np.cumsum(shares)[:-1] * len(members)).round().astype(int)
        for client, part in enumerate(np.split(members, cuts)):
            clients[client].extend(int(i) for i in part)
    for client in range(num_clients):
        while not clients[client]:
            donor = max(range(num_clients), key=lambda c: len(clients[c]))
            taken = clients[donor].pop(int(rng.integers(len(clients[donor]))))
            clients[client].append(taken)
    return [sorted(c) for c in clients]


def group_skew(groups: Sequence[str], parts: Sequence[Sequence[int]]) -> float:
    """Mean over clients of the total variation distance between the client's group distribution
    and the whole data's: 0 for a perfectly IID split, approaching 1 for disjoint groups."""
    labels = sorted(set(groups))
    overall = np.array([sum(g == label for g in groups) for label in labels], dtype=float)
    overall /= overall.sum()
    distances = []
    for part in parts:
        counts = np.array([sum(groups[i] == label for i in part) for label in labels], dtype=float)
        distances.append(0.5 * np.abs(counts / counts.sum() - overall).sum())
    return float(np.mean(distances))


class ClientLoader:
    """Endless shuffled mini-batches over one client's examples.

    Each pass over the client's indices is a fresh permutation from the loader's own
    ``torch.Generator`` (seeded from `seed` and `client_id`), and a batch that runs past the end
    of a pass continues into the next one, so every batch has ``batch_size`` examples (capped at
    the client's number of examples, so no batch holds an example twice).
    ``state_dict``/``load_state_dict`` make a resumed run draw the same batches as an
    uninterrupted one.
    """

    def __init__(self, dataset: TokenizedDataset, indices: Sequence[int], batch_size: int, *,
                 seed: int = 0, client_id: int = 0, trim: bool = False):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        self.indices = torch.as_tensor(list(indices), dtype=torch.long)
        if self.indices.numel() == 0:
            raise ValueError(f"client {client_id} has no examples")
        dataset._index(self.indices)  # range check
        self.dataset = dataset
        self.batch_size = min(batch_size, self.indices.numel())
        self.client_id = client_id
        self.trim = trim
        # Distinct, reproducible streams per (seed, client): mix the two into one 63-bit seed.
        self.generator = torch.Generator().manual_seed((seed * 1_000_003 + client_id) % (2**63))
        self.epoch = 0
        self._order = torch.randperm(self.indices.numel(), generator=self.generator)
        self._position = 0

    def __len__(self) -> int:
        return self.indices.numel()

    def next_indices(self) -> torch.Tensor:
        """Dataset indices of the next batch."""
        taken = []
        need = self.batch_size
        while need:
            if self._position == self._order.numel():
                self.epoch += 1
                self._order = torch.randperm(self.indices.numel(), generator=self.generator)
                self._position = 0
            chunk = self._order[self._position:self._position + need]
            taken.append(chunk)
            self._position += chunk.numel()
            need -= chunk.numel()
        return self.indices[torch.cat(taken)]

    def next_batch(self) -> dict[str, torch.Tensor]:
        return self.dataset.batch(self.next_indices(), trim=self.trim)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "order": self._order.clone(),
                "position": self._position, "epoch": self.epoch,
                "num_examples": self.indices.numel(), "batch_size": self.batch_size}

    def load_state_dict(self, state: Mapping) -> None:
        if int(state["num_examples"]) != self.indices.numel():
            raise ValueError(f"loader state is for {state['num_examples']} examples, this client has "
                             f"{self.indices.numel()}: was the data partitioned the same way?")
        if int(state["batch_size"]) != self.batch_size:
            raise ValueError(f"loader state has batch_size {state['batch_size']}, this loader "
                             f"{self.batch_size}")
        self.generator.set_state(state["generator"])
        self._order = torch.as_tensor(state["order"], dtype=torch.long).clone()
        self._position = int(state["position"])
        self.epoch = int(state["epoch"])


# ---------------------------------------------------------------------------------------------
# Datasets by name
# ---------------------------------------------------------------------------------------------

def _data_dir_file(relative: str) -> Path:
    root = os.environ.get("SPLITLORA_DATA")
    if not root:
        raise ValueError(f"no path given for the E2E data and SPLITLORA_DATA is not set: pass the "
                         f"file or set SPLITLORA_DATA to the folder holding {relative}")
    return Path(root) / relative


def _take_groups(examples: list[Example], limit: int, seed: int) -> list[Example]:
    """About `limit` examples made of whole source groups (all references of a source kept, so
    multi-reference BLEU stays meaningful), sources picked in a seeded random order."""
    by_source: dict[str, list[Example]] = defaultdict(list)
    for e in examples:
        by_source[e.source].append(e)
    sources = list(by_source)
    random.Random(seed).shuffle(sources)
    taken: list[Example] = []
    for source in sources:
        group = by_source[source]
        if taken and len(taken) + len(group) > limit:
            break
        taken.extend(group)
    return taken


def load_dataset(source: str, *, train_path=None, eval_path=None, num_train: int | None = None,
                 num_eval: int | None = None, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """(train_examples, eval_examples) for a named source.

    ``"synthetic"``: generated; eval is the first `num_eval` (default 200) of one stream of
    distinct sources and train the next `num_train` (default 2000), so they never share a source.
    ``"e2e"``: read from `train_path` and `eval_path` (default ``$SPLITLORA_DATA/e2e/valid.txt``
    and ``test.txt``). `num_train` takes a seeded random sample of training lines; `num_eval`
    takes whole sources (all their references) up to that many examples.
    """
    for name, value in (("num_train", num_train), ("num_eval", num_eval)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    if source == "synthetic":
        n_train = 2000 if num_train is None else num_train
        n_eval = 200 if num_eval is None else num_eval
        stream = synthetic_examples(n_eval + n_train, seed)
        return stream[n_eval:], stream[:n_eval]
    if source == "e2e":
        train = read_e2e(train_path if train_path is not None else _data_dir_file("e2e/valid.txt"))
        evals = read_e2e(eval_path if eval_path is not None else _data_dir_file("e2e/test.txt"))
        if num_train is not None and num_train < len(train):
            picked = sorted(random.Random(seed).sample(range(len(train)), num_train))
            train = [train[i] for i in picked]
        if num_eval is not None and num_eval < len(evals):
            evals = _take_groups(evals, num_eval, seed)
        return train, evals
    raise ValueError(f"unknown dataset source {source!r}; allowed: {', '.join(DATASET_SOURCES)}")
