"""The PNG report: what a person would rather look at than read.

Top row: 11-point interpolated precision-recall curves for both directions (with the chance level),
and histograms of positive vs negative pair similarities. Below: for a few text queries, the five
images retrieved first, framed green when relevant and red when not. Datasets that hold only image
features (no pixels) get a panel saying so instead of thumbnails.
"""

from __future__ import annotations

import io
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from fgcmr.evaluate.metrics import PR_POINTS, rank_order, relevance_by_category
from fgcmr.io import atomic_write_bytes

if TYPE_CHECKING:
    from fgcmr.evaluate.job import Embedded

TOP_K = 5


def pick_text_queries(txt_owner: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """``n`` text queries, each of a different image, chosen reproducibly."""
    first = np.unique(txt_owner, return_index=True)[1]
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(first, size=min(n, len(first)), replace=False))


def top_images(img_emb: np.ndarray, txt_emb: np.ndarray, queries: np.ndarray, k: int = TOP_K) -> np.ndarray:
    """``[len(queries), k]`` image indices retrieved first for each text query (the metrics' tie policy)."""
    return rank_order(txt_emb[queries] @ img_emb.T)[:, :k]


def pair_similarities(img_emb, txt_emb, img_cat, txt_owner, max_pairs: int = 200_000, seed: int = 0):
    """Similarities of relevant and irrelevant pairs (category relevance, as MAP uses), subsampled."""
    rng = np.random.default_rng(seed)
    n, m = len(img_emb), len(txt_emb)
    rows = min(n, max(1, max_pairs // max(m, 1)))
    pick = np.sort(rng.choice(n, size=rows, replace=False))
    sim = img_emb[pick] @ txt_emb.T
    rel = relevance_by_category(img_cat[pick], img_cat[txt_owner], pick, txt_owner)
    return sim[rel], sim[~rel]


def draw_report(
    path: str | Path,
    metrics: dict,
    emb: Embedded,
    load_image: Callable[[int], bytes | None] | None,
    title: str,
    queries: int = 3,
) -> Path:
    """Draw the report of split ``emb`` to ``path`` (atomically). ``load_image(i)`` returns image i's bytes, or None."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    q = pick_text_queries(emb.txt_owner, queries) if load_image is not None else np.zeros(0, np.int64)
    rows = max(len(q), 1)
    fig = plt.figure(figsize=(13, 4.2 + (2.2 * len(q) if len(q) else 0.8)))
    grid = fig.add_gridspec(1 + rows, TOP_K + 1, height_ratios=[2.0] + ([1.0] * len(q) if len(q) else [0.3]))
    _pr_panel(fig.add_subplot(grid[0, :3]), metrics)
    _hist_panel(fig.add_subplot(grid[0, 3:]), *pair_similarities(emb.img_emb, emb.txt_emb, emb.img_cat, emb.txt_owner))
    if load_image is None:
        ax = fig.add_subplot(grid[1:, :])
        ax.axis("off")
        ax.text(
            0.5,
            0.5,
            "No thumbnails: this dataset holds image features only (no pixels).",
            ha="center",
            va="center",
            fontsize=13,
        )
    else:
        for row, t in enumerate(q, start=1):
            _query_row(fig, grid, row, emb, int(t), load_image)
    fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def _pr_panel(ax, metrics: dict) -> None:
    for name, label in (("i2t", "image → text"), ("t2i", "text → image")):
        ax.plot(PR_POINTS, metrics[f"pr_{name}"], marker="o", label=f"{label} (MAP {metrics[f'map_{name}']:.3f})")
    ax.axhline(metrics["chance_map"], color="grey", linestyle="--", label=f"chance MAP {metrics['chance_map']:.3f}")
    ax.set(xlabel="recall", ylabel="interpolated precision", xlim=(0, 1), ylim=(0, 1.02), title="Precision-recall")
    ax.legend(fontsize=8)


def _hist_panel(ax, pos: np.ndarray, neg: np.ndarray) -> None:
    bins = np.linspace(
        min(pos.min(initial=1), neg.min(initial=1)), max(pos.max(initial=-1), neg.max(initial=-1)) + 1e-6, 50
    )
    ax.hist(neg, bins=bins, alpha=0.6, density=True, label=f"irrelevant pairs ({len(neg)})")
    ax.hist(pos, bins=bins, alpha=0.6, density=True, label=f"relevant pairs ({len(pos)})")
    ax.set(xlabel="cosine similarity", ylabel="density", title="Pair similarities")
    ax.legend(fontsize=8)


def _query_row(fig, grid, row: int, emb: Embedded, t: int, load_image: Callable[[int], bytes | None]) -> None:
    """Row ``row``: text query ``t`` and the images retrieved first for it, framed by relevance."""
    ax = fig.add_subplot(grid[row, 0])
    ax.axis("off")
    ax.text(0, 0.5, "\n".join(textwrap.wrap(" ".join(emb.texts[t].split())[:160], 28)), fontsize=7, va="center")
    owner, img_cat = int(emb.txt_owner[t]), emb.img_cat
    for col, i in enumerate(top_images(emb.img_emb, emb.txt_emb, np.array([t]))[0], start=1):
        ax = fig.add_subplot(grid[row, col])
        ax.set_xticks([])
        ax.set_yticks([])
        relevant = i == owner or (img_cat[i] >= 0 and img_cat[i] == img_cat[owner])
        for spine in ax.spines.values():
            spine.set_edgecolor("green" if relevant else "red")
            spine.set_linewidth(3)
        data = load_image(int(i))
        if data is None:
            ax.text(0.5, 0.5, "no image", ha="center", va="center", fontsize=8)
        else:
            ax.imshow(_thumbnail(data))
        ax.set_title(f"#{col}" + (" (own)" if i == owner else ""), fontsize=8)


def _thumbnail(data: bytes, side: int = 128) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        im.thumbnail((side, side))
        return np.asarray(im)
