"""Data for the trainer: readers, record forms, tokenizers, client partitions and loaders.

One module per concern:

- :mod:`.e2e`: E2E NLG files and the embedded synthetic data-to-text task (``Example``).
- :mod:`.sources`: datasets by name (``data.source``).
- :mod:`.tokenizers`: the tokenizer interface (word tokenizer, any transformers tokenizer).
- :mod:`.dataset`: token tensors (``TokenizedDataset``) and the per-client batch loader.
- :mod:`.partition`: which client holds which example.

Shared files are never looked up relative to this package: callers pass paths, or set
``SPLITLORA_DATA`` to the folder holding ``e2e/`` (used by :func:`load_dataset` when no path is given).
"""
from .dataset import IGNORE_INDEX, ClientLoader, TokenizedDataset, tokenize
from .e2e import (DEFAULT_SEPARATOR, TARGET_PREFIX, Example, mr_to_text_form, parse_mr, read_e2e,
                  ref_to_text_form, synthetic_examples)
from .partition import PARTITION_SCHEMES, group_skew, partition
from .sources import DATASET_SOURCES, load_dataset
from .tokenizers import HFTokenizer, WordTokenizer, load_tokenizer

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
