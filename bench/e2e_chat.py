"""The E2E files of ../shared/data as chat data (JSON lines of ``messages``), for the quality
comparison through the user-data path (``bench.e2e --size quality-chat-cpu``).

    python -m bench.e2e_chat --out runs/data/e2e-chat     # writes train.jsonl and test.jsonl

Each E2E line becomes one conversation: a user turn asking for a description of the meaning
representation (in the training file's form, as the plain-prompt runs see it) and an assistant
turn holding the reference. The test set is written one conversation per reference, so the trainer
groups a meaning representation's references back together (same rendered prompt), as it does for
E2E's own files. The files are written to a temporary name and renamed, and rewritten only when
their content changes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

INSTRUCTION = "Describe this restaurant in one sentence. Attributes: "


def conversation(source: str, target: str) -> dict:
    return {"messages": [{"role": "user", "content": INSTRUCTION + source},
                         {"role": "assistant", "content": target}]}


def _write(path: Path, rows) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return  # unchanged: keeps the datasets cache of the file valid
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_chat_files(data: Path, out: Path) -> tuple[Path, Path]:
    """(train.jsonl, test.jsonl) in `out`, from data/e2e/valid.txt and data/e2e/testset_w_refs.csv."""
    from splitlora.data import read_e2e

    out.mkdir(parents=True, exist_ok=True)
    train, test = out / "train.jsonl", out / "test.jsonl"
    _write(train, (conversation(e.source, e.target) for e in read_e2e(data / "e2e" / "valid.txt")))
    _write(test, (conversation(e.source, e.target) for e in read_e2e(data / "e2e" / "testset_w_refs.csv")))
    return train, test


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=os.environ.get("SPLITLORA_DATA", "../shared/data"),
                        help="the folder holding e2e/ (default $SPLITLORA_DATA or ../shared/data)")
    parser.add_argument("--out", default="runs/data/e2e-chat")
    args = parser.parse_args(argv)
    data = Path(args.data)
    if not (data / "e2e" / "valid.txt").is_file():
        parser.error(f"E2E data not found: {data / 'e2e' / 'valid.txt'} does not exist; pass --data")
    for path in write_chat_files(data, Path(args.out)):
        print(f"{path}: {sum(1 for _ in path.open(encoding='utf-8'))} conversations")
    return 0


if __name__ == "__main__":
    sys.exit(main())
