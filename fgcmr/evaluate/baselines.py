"""Classical cross-modal baselines on feature matrices, evaluated like any model.

Both return L2-normalised test embeddings for images and texts, so ``metrics.retrieval_metrics``
scores them exactly as it scores the two-tower model:

- **CCA** (Hotelling; Rasiwasia et al. 2010): project both modalities onto their top canonical
  directions, fitted on the train pairs; similarity = cosine in the shared space.
- **Semantic matching** (Rasiwasia et al. 2010): one logistic-regression classifier per modality
  into the categories; each item becomes its class-probability vector; similarity = normalised
  correlation of the two vectors (centred, then cosine).

Every hyperparameter (the classifiers' regularisation) is chosen by cross-validation on the train
split only. Histogram features (SIFT bag-of-words) go through a square root first (the Hellinger
map) when ``hellinger`` is set; every feature is then standardised on the train split.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
from scipy import sparse

from fgcmr.model.tfidf import fit_vectorizer

REG_GRID = (1e-2, 0.1, 1.0, 10.0)  # inverse regularisation strengths tried by 3-fold CV


@dataclasses.dataclass
class Features:
    """One modality's features for the train and test items (dense arrays or sparse matrices)."""

    train: np.ndarray | sparse.spmatrix
    test: np.ndarray | sparse.spmatrix


def l2n(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def dense_features(train: np.ndarray, test: np.ndarray, hellinger: bool = False) -> Features:
    """Standardise on train (after a square root for non-negative histograms when ``hellinger``)."""
    from sklearn.preprocessing import StandardScaler

    train, test = np.asarray(train, np.float64), np.asarray(test, np.float64)
    if hellinger:
        if (train < 0).any() or (test < 0).any():
            raise ValueError("hellinger needs non-negative (histogram) features")
        train, test = np.sqrt(train), np.sqrt(test)
    scaler = StandardScaler().fit(train)
    return Features(scaler.transform(train), scaler.transform(test))


def tfidf_features(train_texts: Sequence[str], test_texts: Sequence[str]) -> Features:
    """Sublinear TF-IDF over terms seen in at least two train texts: words (English stop words removed),
    or character 1–2-grams when the texts are mostly CJK (no spaces between words); ``fgcmr.model.tfidf``,
    the vectoriser a ``tfidf`` text tower reads too."""
    vec = fit_vectorizer(train_texts)
    return Features(vec.transform(train_texts), vec.transform(test_texts))


def svd_features(f: Features, dim: int, seed: int = 0) -> Features:
    """Reduce (sparse) features to ``dim`` dense dimensions, fitted on train (LSA), then standardise."""
    from sklearn.decomposition import TruncatedSVD

    dim = min(dim, f.train.shape[1] - 1)
    svd = TruncatedSVD(dim, random_state=seed).fit(f.train)
    return dense_features(svd.transform(f.train), svd.transform(f.test))


def cca(
    img: Features, txt: Features, img_of_text: np.ndarray, dim: int = 10, reg: float = 1e-4
) -> tuple[np.ndarray, np.ndarray]:
    """Test embeddings (images, texts) in the top-``dim`` canonical space fitted on the train pairs.

    ``img_of_text`` [M_train]: the train image row of each train text (several captions → repeated
    rows). Closed form: whiten each modality (ridge ``reg`` on the covariances), SVD of the whitened
    cross-covariance.
    """
    x, y = _dense(img.train)[img_of_text], _dense(txt.train)
    mx, my = x.mean(axis=0), y.mean(axis=0)
    x, y = x - mx, y - my
    n = len(x) - 1
    wx = _inv_sqrt(x.T @ x / n + reg * np.eye(x.shape[1]))
    wy = _inv_sqrt(y.T @ y / n + reg * np.eye(y.shape[1]))
    u, _, vt = np.linalg.svd(wx @ (x.T @ y / n) @ wy)
    dim = min(dim, len(vt))
    a, b = wx @ u[:, :dim], wy @ vt.T[:, :dim]
    return l2n((_dense(img.test) - mx) @ a), l2n((_dense(txt.test) - my) @ b)


def _inv_sqrt(c: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh(c)
    return (vecs / np.sqrt(np.maximum(vals, 1e-12))) @ vecs.T


def semantic_matching(
    img: Features,
    txt: Features,
    img_cat: np.ndarray,
    txt_cat: np.ndarray,
    seed: int = 0,
    grid: tuple[float, ...] = REG_GRID,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Test embeddings (images, texts) as centred class-probability vectors, plus the chosen regularisation.

    ``img_cat``/``txt_cat``: train categories of the train images/texts. Regularisation by 3-fold
    cross-validation on train.
    """
    p_img, c_img = _classify(img, img_cat, seed, grid)
    p_txt, c_txt = _classify(txt, txt_cat, seed, grid)
    return *match_probabilities(p_img, p_txt), {"C_img": c_img, "C_txt": c_txt}


def match_probabilities(p_img: np.ndarray, p_txt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Class-probability vectors → embeddings whose inner product is their normalised correlation."""
    centre = np.concatenate([p_img, p_txt]).mean(axis=0)
    return l2n(p_img - centre), l2n(p_txt - centre)


def _classify(f: Features, y: np.ndarray, seed: int, grid: tuple[float, ...]) -> tuple[np.ndarray, float]:
    from sklearn.linear_model import LogisticRegressionCV

    clf = LogisticRegressionCV(Cs=list(grid), cv=3, max_iter=3000, random_state=seed).fit(f.train, y)
    return clf.predict_proba(f.test), float(clf.C_[0])


def _dense(x: np.ndarray | sparse.spmatrix) -> np.ndarray:
    return x.toarray() if sparse.issparse(x) else np.asarray(x)
