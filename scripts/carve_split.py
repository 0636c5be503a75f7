#!/usr/bin/env python
"""Carve a train/test split out of one split of a Wikipedia-layout corpus, as a new corpus root.

    python scripts/carve_split.py --root=../shared/data/web_news_zh_testsplit --out=runs/web-news-carve \
        [--split=test] [--test_fraction=0.3] [--seed=0]

Only the web-news data set's test split has its files, so its train/test carve is made from that
split: the chosen pairs are stratified by category, the new ``trainset``/``testset`` lists are written
under ``--out``, and ``texts/``, ``images/`` and ``categories.list`` are symbolic links to the original
(nothing is copied). ``fgcmr shard --source=wikipedia --root=<out>`` then reads it like the original.
"""

from __future__ import annotations

import argparse
import os
import random
from collections import defaultdict
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--test_fraction", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    root, out = Path(args.root).resolve(), Path(args.out)
    lines = [
        ln for ln in (root / f"{args.split}set_txt_img_cat.list").read_text(encoding="utf-8").splitlines() if ln.strip()
    ]
    by_cat: dict[str, list[str]] = defaultdict(list)
    for ln in lines:
        by_cat[ln.split("\t")[2]].append(ln)
    rng = random.Random(args.seed)
    train, test = [], []
    for cat in sorted(by_cat):
        group = sorted(by_cat[cat])
        rng.shuffle(group)
        n_test = max(1, round(len(group) * args.test_fraction))
        test += group[:n_test]
        train += group[n_test:]
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("trainset_txt_img_cat.list", train), ("testset_txt_img_cat.list", test)):
        (out / name).write_text("\n".join(rows) + "\n", encoding="utf-8")
    for name in ("texts", "images", "categories.list"):
        link = out / name
        if not link.exists():
            os.symlink(root / name, link)
    print(f"{out}: {len(train)} train / {len(test)} test pairs from {root.name}/{args.split}")


if __name__ == "__main__":
    main()
