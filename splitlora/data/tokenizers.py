"""Tokenizers behind one small interface: encode, decode, eos_id, pad_id, vocab_size.

:class:`WordTokenizer` (built from the data, for models built from a config) and
:class:`HFTokenizer` (any transformers tokenizer, including its chat template).
"""
from __future__ import annotations

import functools
import json
import os
import re
import sys
from pathlib import Path
from typing import Iterable, Sequence

from .e2e import DEFAULT_SEPARATOR, TARGET_PREFIX, Example

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

    def to_transformers(self):
        """This tokenizer as a transformers `PreTrainedTokenizerFast` (a `tokenizers` WordLevel model
        over the same vocabulary), which `save_pretrained` writes and plain
        `AutoTokenizer.from_pretrained` reads back, with no splitlora import.

        It encodes and decodes exactly as this tokenizer does (`encode(text, add_special_tokens=False)`
        and `decode(ids)` give `encode(text)` and `decode(ids)`): the pre-tokenizer is `_WORD_PATTERN`
        with Python's `\\w` and `\\s` written out as the code-point ranges they match in this Python
        (the tokenizers library's regex engine gives `\\w` and `\\s` other Unicode meanings: it keeps
        combining marks inside words, and does not count '²' as a word character nor '\\x1c' as a
        space); the decoder concatenates tokens as they are (no space inserted, no clean-up), and
        `<pad>`, `<eos>`, `<unk>` are special tokens that text is not matched against
        (`split_special_tokens`), so a literal "<eos>" in a text is three tokens, as here."""
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        backend = Tokenizer(models.WordLevel({token: i for i, token in enumerate(self.vocab)}, unk_token=self.UNK))
        backend.pre_tokenizer = pre_tokenizers.Split(Regex(_explicit_word_pattern()), behavior="isolated")
        backend.decoder = decoders.Fuse()
        return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=self.PAD, eos_token=self.EOS,
                                       unk_token=self.UNK, clean_up_tokenization_spaces=False,
                                       split_special_tokens=True)

    def __repr__(self) -> str:
        return f"WordTokenizer(vocab_size={self.vocab_size})"


@functools.lru_cache(maxsize=1)
def _explicit_word_pattern() -> str:
    """`_WORD_PATTERN` for the tokenizers library (Oniguruma): `\\w` and `\\s` as the explicit
    code-point classes that Python's `re` matches for them (WordTokenizer.to_transformers)."""
    if _WORD_PATTERN.pattern != r" ?\w+| ?[^\w\s]|\s+":
        raise RuntimeError(f"_WORD_PATTERN changed to {_WORD_PATTERN.pattern!r}: update _explicit_word_pattern")

    def ranges(pattern: str) -> str:
        match, spans, start = re.compile(pattern).match, [], None
        for cp in range(sys.maxunicode + 2):
            inside = cp <= sys.maxunicode and not 0xD800 <= cp <= 0xDFFF and match(chr(cp)) is not None
            if inside and start is None:
                start = cp
            elif not inside and start is not None:
                spans.append(f"\\x{{{start:X}}}" if start == cp - 1 else f"\\x{{{start:X}}}-\\x{{{cp - 1:X}}}")
                start = None
        return "".join(spans)

    word, space = ranges(r"\w"), ranges(r"\s")
    return f" ?[{word}]+| ?[^{word}{space}]|[{space}]+"


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
