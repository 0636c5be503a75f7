"""The ``shard`` stage: any image-text corpus → verified, deterministic WebDataset shards + manifest.

``readers/`` turn a corpus layout into a cheap, ordered stream of references (``Ref``) and load one
reference into an ``Item`` (or a ``Skip`` with its reason); row corpora (one row per caption: CSV,
JSONL, parquet, img2dataset output, WebDataset) go through ``grouping``, which gathers each image's
rows from anywhere in the corpus in bounded memory; ``sample`` checks and encodes an item as
tar members; ``writer`` writes one chunk of items as tar parts; ``manifest`` assembles the chunks of
all workers and tasks into the final shards, manifest, sizes and skip log; ``job`` plans and runs it,
with the config and ``done`` check of ``config`` (free of numpy and images).
"""
