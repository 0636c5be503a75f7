#!/usr/bin/env python
"""How far can semantic matching go on the Wikipedia SIFT features? An analysis of the MAP ceiling.

    python scripts/wikipedia_ceiling.py [--data=../shared/data/wikipedia_rasiwasia2010] [--json]

Semantic matching (one classifier per modality, similarity of the class-probability vectors) is the
strongest method measured on these features. This script scores it with a stronger (χ² kernel SVM)
and a weaker (linear) image classifier, against a TF-IDF text classifier and against a *perfect*
text side (the true category as a one-hot vector): the last rows bound what any method whose image
side is that classifier can reach. Hyperparameters by 3-fold cross-validation on the train split
only; scored on the official test split with ``fgcmr.evaluate.metrics``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fgcmr.evaluate.baselines import dense_features, match_probabilities, tfidf_features  # noqa: E402
from fgcmr.evaluate.metrics import retrieval_metrics  # noqa: E402


def load(root: Path) -> dict:
    from scipy.io import loadmat

    mat = loadmat(root / "raw_features.mat")
    data = {}
    for split, key in (("train", "tr"), ("test", "te")):
        rows = [
            line.split("\t")
            for line in (root / f"{split}set_txt_img_cat.list").read_text().splitlines()
            if line.strip()
        ]
        texts = [
            re.search(r"<text>(.*)</text>", (root / "texts" / f"{r[0]}.xml").read_text(encoding="utf-8"), re.S).group(1)
            for r in rows
        ]
        data[split] = {"image": mat[f"I_{key}"], "text": texts, "y": np.array([int(r[2]) - 1 for r in rows])}
    return data


def image_classifiers(train: np.ndarray, test: np.ndarray, y: np.ndarray) -> dict[str, tuple[np.ndarray, float]]:
    """Test class probabilities of a linear and a χ²-kernel classifier on the SIFT histograms, and the CV accuracy."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics.pairwise import chi2_kernel
    from sklearn.model_selection import GridSearchCV
    from sklearn.svm import SVC

    lin = dense_features(train, test, hellinger=True)
    linear = GridSearchCV(LogisticRegression(max_iter=3000), {"C": [0.01, 0.1, 1.0]}, cv=3).fit(lin.train, y)
    best = None
    for gamma in (0.5, 1.0, 2.0, 4.0):
        search = GridSearchCV(SVC(kernel="precomputed", probability=True, random_state=0), {"C": [1.0, 10.0]}, cv=3)
        search.fit(chi2_kernel(train, gamma=gamma), y)
        if best is None or search.best_score_ > best[0]:
            best = (search.best_score_, gamma, search.best_estimator_)
    score, gamma, svm = best
    return {
        "linear (Hellinger, logistic regression)": (linear.predict_proba(lin.test), linear.best_score_),
        f"χ² kernel SVM (γ={gamma})": (svm.predict_proba(chi2_kernel(test, train, gamma=gamma)), score),
    }


def text_probabilities(train: list[str], test: list[str], y: np.ndarray) -> tuple[np.ndarray, float]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV

    f = tfidf_features(train, test)
    search = GridSearchCV(LogisticRegression(max_iter=3000), {"C": [1.0, 10.0, 100.0]}, cv=3).fit(f.train, y)
    return search.predict_proba(f.test), search.best_score_


def semantic_matching(p_img: np.ndarray, p_txt: np.ndarray, y: np.ndarray) -> dict:
    return retrieval_metrics(*match_probabilities(p_img, p_txt), y, np.arange(len(y)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "wikipedia_rasiwasia2010"))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    warnings.filterwarnings(
        "ignore", message=".*probability.*deprecated", category=FutureWarning
    )  # SVC(probability=True), sklearn ≥ 1.9
    data = load(Path(args.data))
    tr, te = data["train"], data["test"]
    p_txt, txt_cv = text_probabilities(tr["text"], te["text"], tr["y"])
    perfect = np.eye(10)[te["y"]] * 0.99 + 0.001
    rows = []
    for image_name, (p_img, img_cv) in image_classifiers(tr["image"], te["image"], tr["y"]).items():
        for text_name, p, cv in (
            ("TF-IDF logistic regression", p_txt, txt_cv),
            ("perfect (true category)", perfect, 1.0),
        ):
            m = semantic_matching(p_img, p, te["y"])
            rows.append(
                {
                    "image": image_name,
                    "image_cv_acc": round(img_cv, 4),
                    "text": text_name,
                    "text_cv_acc": round(cv, 4),
                    "map_i2t": round(m["map_i2t"], 4),
                    "map_t2i": round(m["map_t2i"], 4),
                    "map_avg": round(m["map_avg"], 4),
                }
            )
    if args.json:
        print(json.dumps(rows))
        return
    print("| image classifier (train CV acc) | text side (train CV acc) | MAP@all i→t | t→i | avg |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['image']} ({r['image_cv_acc']:.3f}) | {r['text']} ({r['text_cv_acc']:.3f}) | "
            f"{r['map_i2t']:.4f} | {r['map_t2i']:.4f} | {r['map_avg']:.4f} |"
        )


if __name__ == "__main__":
    main()
