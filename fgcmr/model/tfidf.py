"""TF-IDF text input: the vectoriser semantic matching uses, fitted on the train split, kept as one JSON file.

A ``text.kind: tfidf`` tower is an MLP over a text's TF-IDF vector, the input of the strongest classical
baseline (``fgcmr.evaluate.baselines``): sublinear TF-IDF over the terms of at least two train texts,
words (English stop words removed) or, for CJK texts (no spaces between words), character 1–2-grams.
The fitted vocabulary and idf weights live in ``<dir>/tfidf.json`` (the text tower's ``tokenizer_dir``),
so training, export and eval read exactly the same vectoriser, without pickles.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np

from fgcmr.io import atomic_write_json, read_json

TFIDF_FILE = "tfidf.json"


def is_cjk(texts: Sequence[str], sample: int = 200) -> bool:
    """Whether most letters of (the first ``sample``) texts are CJK ideographs."""
    chars = [c for t in texts[:sample] for c in t if c.isalpha()]
    return bool(chars) and sum("\u4e00" <= c <= "\u9fff" or "\u3400" <= c <= "\u4dbf" for c in chars) > 0.5 * len(chars)


def vectorizer_params(texts: Sequence[str]) -> dict:
    """The vectoriser's settings for these (train) texts: words, or character 1–2-grams for CJK."""
    if is_cjk(texts):
        return {"analyzer": "char", "ngram_range": (1, 2), "stop_words": None}
    return {"analyzer": "word", "ngram_range": (1, 1), "stop_words": "english"}


def fit_vectorizer(texts: Sequence[str], max_terms: int | None = None):
    """A sklearn ``TfidfVectorizer`` fitted on ``texts`` (sublinear tf, terms of at least two texts; the
    ``max_terms`` most frequent of them when given)."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    params = vectorizer_params(texts)
    return TfidfVectorizer(sublinear_tf=True, min_df=2, max_features=max_terms, **params).fit(texts)


@dataclasses.dataclass
class TfidfEncoder:
    """A fitted vectoriser as data: ``encode`` gives a text's dense, L2-normalised TF-IDF vector."""

    params: dict
    vocabulary: list[str]  # term of each output dimension
    idf: list[float]

    def __post_init__(self):
        from sklearn.feature_extraction.text import TfidfVectorizer

        params = {**self.params, "ngram_range": tuple(self.params["ngram_range"])}
        self._vec = TfidfVectorizer(
            sublinear_tf=True, vocabulary={t: i for i, t in enumerate(self.vocabulary)}, **params
        )
        self._vec.idf_ = np.asarray(self.idf, dtype=np.float64)

    @property
    def dim(self) -> int:
        return len(self.vocabulary)

    def encode(self, text: str) -> np.ndarray:
        return self._vec.transform([text]).toarray()[0].astype(np.float32)

    @classmethod
    def fit(cls, texts: Sequence[str], max_terms: int | None = None) -> "TfidfEncoder":
        vec = fit_vectorizer(texts, max_terms)
        vocab = [""] * len(vec.vocabulary_)
        for term, i in vec.vocabulary_.items():
            vocab[i] = term
        params = {k: vec.get_params()[k] for k in ("analyzer", "ngram_range", "stop_words")}
        return cls({**params, "ngram_range": list(params["ngram_range"])}, vocab, vec.idf_.tolist())

    def save(self, out_dir: str | Path) -> Path:
        path = Path(out_dir) / TFIDF_FILE
        atomic_write_json(path, {"params": self.params, "vocabulary": self.vocabulary, "idf": self.idf})
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "TfidfEncoder":
        path = Path(directory) / TFIDF_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no fitted TF-IDF vectoriser (text.kind=tfidf)")
        data = read_json(path)
        return cls(data["params"], data["vocabulary"], data["idf"])
