"""fgcmr: distributed training for cross-modal retrieval with fine-grained siamese labels.

The public API (imported on first use, so ``import fgcmr`` stays cheap)::

    model = fgcmr.load("runs/demo/train/export")          # fgcmr.Model
    img = model.encode_image(["cat.jpg", pil_image])       # [n, d] float32 numpy, L2-normalised
    txt = model.encode_text(["a red circle"])              # [m, d]
    scores = model.similarity(txt, img)                    # [m, n] cosine similarities
    model.preprocess                                       # PIL image → normalised [3, H, W] tensor
"""

__version__ = "0.1.0"

__all__ = ["Model", "Preprocess", "load", "__version__"]


def __getattr__(name: str):
    if name in ("Model", "Preprocess", "load"):
        from fgcmr import api

        return getattr(api, name)
    raise AttributeError(f"module 'fgcmr' has no attribute {name!r}")
