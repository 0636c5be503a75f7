#!/usr/bin/env python
"""Make a real img2dataset corpus from the Flickr8k images, served on 127.0.0.1 (nothing leaves the machine).

    python scripts/flickr8k_img2dataset.py --out=runs/flickr8k-img2dataset-corpus [--images=500] [--seed=0]

Writes ``<out>/urls.parquet`` (every caption row of the first ``--images`` images, shuffled, with a
``split`` column from ``splits.csv``, plus one 404 row) and runs the real img2dataset 1.47.0 (the tool
venv made by ``make setup``) on it into ``<out>/i2d``: what a user downloading a LAION-style URL list
would have. ``fgcmr pipeline --config=configs/experiments/flickr8k-img2dataset.yaml`` then starts there.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from fgcmr.bench.img2dataset_corpus import flickr8k_url_list, run_img2dataset, serve_directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/flickr8k-img2dataset-corpus")
    parser.add_argument("--data_root", default=os.environ.get("FGCMR_DATA", "../shared/data"))
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    flickr, out = Path(args.data_root) / "flickr8k_500", Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with serve_directory(flickr / "images") as base:
        truth = flickr8k_url_list(flickr, base, out / "urls.parquet", images=args.images, seed=args.seed)
        run_img2dataset(
            out / "urls.parquet", out / "i2d", extra_columns=["split"], image_size=320, samples_per_shard=1000
        )
    print(json.dumps({"rows": truth["rows"], "images": len(truth["images"]), "img2dataset_output": str(out / "i2d")}))


if __name__ == "__main__":
    main()
