"""Movie-review sentiment as prompt/completion JSONL, from a public set shipped on PyPI.

The data: the 10,605 movie-review snippets (Rotten Tomatoes, the sentences of Pang & Lee's sentence
polarity data set, 2005) that Hutto & Gilbert had rated by 10 people each for VADER (ICWSM 2014,
`movieReviewSnippets_GroundTruth.txt`: id, mean rating in [-4, 4], text). It ships inside the source
distribution of vaderSentiment 3.3.2 on PyPI (MIT licence), in additional_resources/hutto_ICWSM_2014.tar.gz;
this script fetches that sdist with pip (cached under ~/.cache/deltaw/data), nothing else.

A snippet is positive when its mean rating is above 0, negative below 0; the 37 rated exactly 0 are
dropped. One line per snippet:

    {"prompt": "Review: <snippet>\\nSentiment (positive or negative)? Answer:", "completion": " positive"}

The train and test files are disjoint, class-balanced, and a function of `seed` only.

    .venv/bin/python bench/sentiment_data.py OUT_DIR [--train 2400] [--test 400] [--seed 0]
"""

from __future__ import annotations

import argparse
import io
import json
import random
import subprocess
import sys
import tarfile
from pathlib import Path

PACKAGE = "vaderSentiment==3.3.2"
SDIST = "vaderSentiment-3.3.2.tar.gz"
INNER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
MEMBER = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
CACHE = Path.home() / ".cache" / "deltaw" / "data"
LABELS = (" negative", " positive")  # the completions; index = label


def prompt(snippet: str) -> str:
    """The prompt of one snippet; the label token follows 'Answer:'."""
    return f"Review: {snippet}\nSentiment (positive or negative)? Answer:"


def snippets() -> list[tuple[str, int]]:
    """(text, label) of every snippet with a non-zero mean rating, in the file's order."""
    sdist = CACHE / SDIST
    if not sdist.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        "--dest", str(CACHE), PACKAGE], check=True)
    with tarfile.open(sdist) as outer, tarfile.open(fileobj=io.BytesIO(outer.extractfile(INNER).read())) as inner:
        lines = inner.extractfile(MEMBER).read().decode("utf-8").splitlines()
    rows = []
    for line in lines:
        _, rating, text = line.split("\t", 2)
        if float(rating) != 0:
            rows.append((text.strip(), int(float(rating) > 0)))
    return rows


def split(train: int, test: int, seed: int) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(train, test): `train` and `test` snippets, half of each class, drawn without overlap by `seed`."""
    by_label: dict[int, list[tuple[str, int]]] = {0: [], 1: []}
    for row in snippets():
        by_label[row[1]].append(row)
    generator = random.Random(seed)
    train_rows, test_rows = [], []
    for rows in by_label.values():
        generator.shuffle(rows)
        test_rows += rows[: test // 2]
        train_rows += rows[test // 2 : test // 2 + train // 2]
    generator.shuffle(train_rows)
    generator.shuffle(test_rows)
    return train_rows, test_rows


def write_jsonl(rows: list[tuple[str, int]], path: Path) -> Path:
    with open(path, "w", encoding="utf-8") as handle:
        for text, label in rows:
            handle.write(json.dumps({"prompt": prompt(text), "completion": LABELS[label]}) + "\n")
    return path


def write_split(out: Path, train: int = 2400, test: int = 400, seed: int = 0) -> tuple[Path, Path]:
    """Write OUT/train.jsonl and OUT/test.jsonl; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    train_rows, test_rows = split(train, test, seed)
    return write_jsonl(train_rows, out / "train.jsonl"), write_jsonl(test_rows, out / "test.jsonl")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--train", type=int, default=2400)
    parser.add_argument("--test", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for path in write_split(args.out, args.train, args.test, args.seed):
        print(path)


if __name__ == "__main__":
    main()
