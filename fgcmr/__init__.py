"""fgcmr: distributed training for cross-modal retrieval with fine-grained siamese labels."""

__version__ = "0.1.0"
