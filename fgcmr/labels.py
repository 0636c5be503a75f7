"""The label seam: fine-grained label sidecars and the label math the weighted loss uses.

Files (written by ``fgcmr label infer``, read by ``fgcmr train``)::

    <dataset>/labels/<labeler>/<split>-NNNNNN.npz   one per data shard, same keys in the same order
        keys          str   [n]      sample keys, in shard order
        text_emb      f16   [T, d]   every text of every sample, concatenated in sample order
        text_offsets  i64   [n + 1]  sample i's texts are text_emb[text_offsets[i]:text_offsets[i + 1]]
        desc_emb      f16   [n, d]   the description of sample i's image (its own text, or the mean of
                                     its normalised caption embeddings)
        labeler       str   []       the identity of the labeler that wrote it (``labeler_identity``)
    <dataset>/labels/<labeler>/head.npz             w f32 [d], c f32 [1]: the labeler's pair head (+ labeler)
    <dataset>/labels/<labeler>/manifest.json        labeler (name, path, identity), metrics, counts, per-sidecar
                                                    sha256 (``sidecars: {<file>: {split, items, texts, sha256}}``)

Every file is written atomically (``write_sidecar``, ``write_head``); ``verify_labels`` lists what is
missing, corrupt, out of step with the manifest or written by another labeler. A labeler's identity
is a hash of its weights, config, head and tokenizer, so retraining it (or pointing ``--labeler`` at
another) makes ``label infer`` redo the sidecars, and training refuses sidecars that the head it
reads did not come with. Sidecars written before identities existed carry an empty one.

Label math, for a batch of N images and M texts (gathered across ranks if need be):

- relevance ``y[i, j] = 1`` when image i and text j share a category; for data without categories
  (category < 0), when text j belongs to image i itself;
- siamese score ``p[i, j] = sigmoid(w · (d_i ⊙ t_j) + c)`` with ``d_i`` the description embedding
  of image i and ``t_j`` the embedding of text j. It is a weighted inner product, so the whole
  matrix is one product ``(D * w) @ Tᵀ + c``;
- hardness ``h = 1 − p`` on positives (a relevant pair the labeler finds dissimilar is hard) and
  ``h = p`` on negatives (an irrelevant pair that looks alike is hard); ``h`` lies in [0, 1].

Descriptions are leave-one-out, at join time (``join_labels``): a training item pairs image i with its
k-th of n texts, and ``d_i`` is the mean of its *other* texts, ``(n·desc − t_k)/(n − 1)`` (computed
from the stored text embeddings), so the matched pair is never scored against itself. With n = 1 there
is no other text: ``d_i`` is the caption itself, which describes image i for its negatives (and for
same-category positives of other images), and the matched pair gets no hardness (``p = 1``, ``h = 0``,
``ω = 1``; ``label_scores``). The sidecar keeps the plain mean of all texts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fgcmr.dataset import ShardError, iter_samples, open_dataset
from fgcmr.io import CorruptFileError, atomic_write_bytes, read_json, sha256_file

if TYPE_CHECKING:  # the label math takes tensors but calls only their methods: the file checks stay torch-free
    import torch

SIDECAR_FIELDS = ("keys", "text_emb", "text_offsets", "desc_emb")
LABELER_FILES = ("labeler.json", "head.safetensors", "encoder", "tokenizer")  # what makes a labeler's embeddings


def labels_dir(dataset_dir: str | Path, labeler_name: str) -> Path:
    return Path(dataset_dir) / "labels" / labeler_name


def sidecar_path(dataset_dir: str | Path, labeler_name: str, shard_file: str) -> Path:
    return labels_dir(dataset_dir, labeler_name) / (Path(shard_file).name.removesuffix(".tar") + ".npz")


@dataclasses.dataclass
class Sidecar:
    keys: np.ndarray
    text_emb: np.ndarray
    text_offsets: np.ndarray
    desc_emb: np.ndarray
    labeler: str = ""  # identity of the labeler that wrote it

    def texts_of(self, i: int) -> np.ndarray:
        return self.text_emb[self.text_offsets[i] : self.text_offsets[i + 1]]

    def by_key(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """key → (text embeddings [k, d], description embedding [d])."""
        return {str(k): (self.texts_of(i), self.desc_emb[i]) for i, k in enumerate(self.keys)}


class SidecarError(CorruptFileError, RuntimeError):
    """A sidecar is missing, corrupt, or does not match its data shard or labeler."""


def labeler_identity(labeler_dir: str | Path) -> str:
    """sha256 over the labeler's weights, config, head and tokenizer files (paths and contents, sorted)."""
    root = Path(labeler_dir)
    if not (root / "labeler.json").is_file():
        raise FileNotFoundError(f"{root} is not a labeler directory (no labeler.json); run `fgcmr label train` first")
    h = hashlib.sha256()
    for name in LABELER_FILES:
        top = root / name
        files = sorted(p for p in top.rglob("*") if p.is_file()) if top.is_dir() else [top] if top.is_file() else []
        for f in files:
            h.update(f"{f.relative_to(root).as_posix()}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


def read_sidecar(path: str | Path, expected_keys: list[str] | None = None) -> Sidecar:
    """Load and check one sidecar; with ``expected_keys`` the keys must match the shard exactly."""
    path = Path(path)
    if not path.is_file():
        raise SidecarError(f"label sidecar missing: {path} (run `fgcmr label infer`)")
    try:
        with np.load(path, allow_pickle=False) as z:
            sc = Sidecar(**{f: z[f] for f in SIDECAR_FIELDS}, labeler=str(z["labeler"]) if "labeler" in z.files else "")
    except Exception as e:  # zipfile, KeyError, ValueError: all mean the same to the user
        raise SidecarError(f"label sidecar unreadable: {path}: {e}") from None
    n = len(sc.keys)
    if len(sc.text_offsets) != n + 1 or len(sc.desc_emb) != n or sc.text_offsets[-1] != len(sc.text_emb):
        raise SidecarError(
            f"label sidecar inconsistent: {path}: {n} keys, {len(sc.desc_emb)} descriptions, "
            f"offsets end {sc.text_offsets[-1]} vs {len(sc.text_emb)} texts"
        )
    if expected_keys is not None and [str(k) for k in sc.keys] != list(expected_keys):
        mismatch = next(
            (i for i, (a, b) in enumerate(zip(sc.keys, expected_keys)) if str(a) != b), min(n, len(expected_keys))
        )
        raise SidecarError(
            f"label sidecar keys do not match the data shard: {path}: first difference at position {mismatch} "
            f"({n} vs {len(expected_keys)} keys)"
        )
    return sc


def read_sidecar_identity(path: str | Path) -> str:
    """The identity of the labeler that wrote a sidecar, reading only that entry (empty if unrecorded)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return str(z["labeler"]) if "labeler" in z.files else ""
    except Exception as e:  # zipfile, ValueError: all mean the same to the user
        raise SidecarError(f"label sidecar unreadable: {path}: {e}") from None


def read_head(dataset_dir: str | Path, labeler_name: str) -> tuple[np.ndarray, float]:
    w, c, _ = read_head_with_identity(dataset_dir, labeler_name)
    return w, c


def read_head_with_identity(dataset_dir: str | Path, labeler_name: str) -> tuple[np.ndarray, float, str]:
    """(w, c, identity of the labeler it came from; empty for heads written before identities)."""
    path = labels_dir(dataset_dir, labeler_name) / "head.npz"
    if not path.is_file():
        raise SidecarError(f"labeler head missing: {path} (run `fgcmr label infer`)")
    try:
        with np.load(path, allow_pickle=False) as z:
            identity = str(z["labeler"]) if "labeler" in z.files else ""
            return z["w"].astype(np.float32), float(np.asarray(z["c"]).reshape(-1)[0]), identity
    except Exception as e:  # zipfile, KeyError, ValueError
        raise SidecarError(f"labeler head unreadable: {path}: {e}; rerun `fgcmr label infer`") from None


def relevance(img_cat: torch.Tensor, txt_cat: torch.Tensor, img_id: torch.Tensor, txt_id: torch.Tensor) -> torch.Tensor:
    """``y[i, j]``: same category where both have one (≥ 0), else same image id."""
    same_cat = img_cat[:, None] == txt_cat[None, :]
    has_cat = (img_cat[:, None] >= 0) & (txt_cat[None, :] >= 0)
    same_img = img_id[:, None] == txt_id[None, :]
    return same_cat.where(has_cat, same_img).float()


def pair_logits(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor, c: float | torch.Tensor) -> torch.Tensor:
    """``w · (a_i ⊙ b_j) + c`` for every row pair, [len(a), len(b)], as one fp32 matrix product: the labeler's
    head (trained on these logits) and every score computed from its embeddings."""
    return (a.float() * w.float()) @ b.float().T + c


def pair_scores(
    desc_emb: torch.Tensor, text_emb: torch.Tensor, w: torch.Tensor, c: float | torch.Tensor
) -> torch.Tensor:
    """``p[i, j] = sigmoid(w · (desc_i ⊙ text_j) + c)``."""
    return pair_logits(desc_emb, text_emb, w, c).sigmoid()


LABEL_FIELDS = ("label_text_emb", "desc_emb", "has_desc")  # what ``join_labels`` adds to a training item


def join_labels(texts: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """Label inputs of an item paired with its text ``k`` of ``texts`` [n, d]: that text's embedding and
    the leave-one-out description (mean of the other texts; the text itself when n = 1, ``has_desc`` 0)."""
    n = len(texts)
    t = texts.astype(np.float32)
    desc = (t.sum(0) - t[k]) / (n - 1) if n > 1 else t[k]
    return {"label_text_emb": t[k], "desc_emb": desc, "has_desc": np.float32(n > 1)}


def label_scores(
    desc_emb: torch.Tensor,
    text_emb: torch.Tensor,
    has_desc: torch.Tensor,
    image_id: torch.Tensor,
    w: torch.Tensor,
    c: float | torch.Tensor,
) -> torch.Tensor:
    """``p`` of every (image, text) pair of a batch; 1 on an image's own text when it has no other text to be
    described by (``has_desc`` 0), so that pair carries no hardness."""
    p = pair_scores(desc_emb, text_emb, w, c)
    own = (image_id[:, None] == image_id[None, :]) & (has_desc[:, None] <= 0)
    return p.masked_fill(own, 1.0)


def hardness(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``1 − p`` on positives, ``p`` on negatives."""
    return (1.0 - p).where(y > 0, p)


def write_sidecar(
    path: str | Path,
    keys: list[str],
    text_emb: np.ndarray,
    text_offsets: np.ndarray,
    desc_emb: np.ndarray,
    labeler: str = "",
) -> str:
    """Write one sidecar atomically (float16 embeddings, the labeler's identity); returns its sha256."""
    buf = io.BytesIO()
    np.savez(
        buf,
        keys=np.asarray(keys, dtype=str),
        text_emb=np.asarray(text_emb, dtype=np.float16),
        text_offsets=np.asarray(text_offsets, dtype=np.int64),
        desc_emb=np.asarray(desc_emb, dtype=np.float16),
        labeler=np.asarray(labeler),
    )
    data = buf.getvalue()
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def write_head(dataset_dir: str | Path, labeler_name: str, w: np.ndarray, c: float, labeler: str = "") -> None:
    buf = io.BytesIO()
    np.savez(buf, w=np.asarray(w, dtype=np.float32), c=np.asarray([c], dtype=np.float32), labeler=np.asarray(labeler))
    atomic_write_bytes(labels_dir(dataset_dir, labeler_name) / "head.npz", buf.getvalue())


def verify_labels(
    dataset_dir: str | Path, labeler_name: str, check_keys: bool = False, identity: str | None = None
) -> list[str]:
    """Problems with a labeler's sidecars for every data shard (empty list = all present and intact).

    Checks the manifest exists, every data shard has a sidecar whose sha256 matches the manifest and
    whose sample count matches the shard's, each reads back consistently and was written by the
    manifest's labeler (and by ``identity`` if given); ``check_keys`` also reads the data shards (checked
    against their own manifest) and compares keys. A damaged data shard is reported as such.
    """
    ds = open_dataset(dataset_dir)
    manifest_path = labels_dir(dataset_dir, labeler_name) / "manifest.json"
    if not manifest_path.is_file():
        return [f"label manifest missing: {manifest_path}"]
    try:
        manifest = read_json(manifest_path)
    except CorruptFileError as e:
        return [f"label manifest damaged: {e}"]
    recorded = manifest.get("sidecars", {})
    wrote = (manifest.get("labeler") or {}).get("identity", "")
    problems = []
    if identity is not None and wrote != identity:
        problems.append(
            f"label sidecars in {manifest_path.parent} were written by another labeler "
            f"(identity {wrote[:12] or 'unrecorded'}, this labeler is {identity[:12]}); rerun `fgcmr label infer`"
        )
    for split in ds.split_names:
        for info, shard in zip(ds.shard_infos(split), ds.shards(split)):
            path = sidecar_path(dataset_dir, labeler_name, shard.name)
            try:
                keys = [s.key for s in iter_samples(shard, {"json"})] if check_keys else None
            except ShardError as e:
                problems.append(str(e))
                continue
            try:
                sc = read_sidecar(path, keys)
            except SidecarError as e:
                problems.append(str(e))
                continue
            if len(sc.keys) != info.items:
                problems.append(
                    f"label sidecar has {len(sc.keys)} samples, its data shard {shard.name} {info.items}: {path}"
                )
            if sc.labeler != wrote:
                problems.append(f"label sidecar written by another labeler than its manifest's: {path}")
            want = recorded.get(path.name, {}).get("sha256")
            if want != sha256_file(path):
                problems.append(f"label sidecar sha256 differs from the manifest: {path}")
    return problems


def sidecars_current(dataset_dir: str | Path, labeler_name: str, labeler_dir: str | Path) -> str | None:
    """None when ``labels/<labeler_name>/`` holds complete, intact sidecars written by the labeler in
    ``labeler_dir`` (its weights, config and head as they are now); else the first problem and a count."""
    try:
        problems = verify_labels(dataset_dir, labeler_name, identity=labeler_identity(labeler_dir))
    except (FileNotFoundError, CorruptFileError) as e:
        return str(e)
    if not problems:
        return None
    return problems[0] + (f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else "")
