"""scripts/make_results.py: seeds group into mean ± std, selection candidates sort by their val score."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("make_results", REPO / "scripts" / "make_results.py")
make_results = importlib.util.module_from_spec(spec)
spec.loader.exec_module(make_results)

KEYS = ("map_i2t", "map_t2i", "map_avg", *make_results.RECALL_KEYS)


def fake_run(
    root: Path, out: str, name: str, seed: int, map_avg: float, overrides: dict | None = None, split: str = "test"
) -> None:
    d = root / out
    (d / "run" / "eval").mkdir(parents=True)
    (d / "experiment.yaml").write_text(
        yaml.safe_dump({"name": name, "train": {"seed": seed, "loss": {"name": "pairwise"}}, "eval": {"split": split}})
    )
    status = {
        "experiment": str(REPO / "configs/experiments/x.yaml"),
        "nproc": 2,
        "overrides": overrides or {},
        "stages": {"train": {"seconds": 10.0}},
    }
    (d / "pipeline.json").write_text(json.dumps(status))
    metrics = {k: map_avg for k in KEYS} | {
        "images": 5,
        "texts": 5,
        "chance_map": 0.1,
        "chance_map_i2t": 0.1,
        "chance_map_t2i": 0.1,
        "data": {"name": "wiki"},
    }
    (d / "run" / "eval" / "metrics.json").write_text(json.dumps(metrics))


def test_seeds_group_into_mean_and_std(tmp_path):
    fake_run(tmp_path, "a-s0", "a", 0, 0.2)
    fake_run(tmp_path, "a-s1", "a", 1, 0.4)
    fake_run(tmp_path, "b-s0", "b", 0, 0.25)
    text = make_results.tables(make_results.load_runs(tmp_path))
    rows = [line for line in text.splitlines() if line.startswith("| a ") or line.startswith("| b ")]
    assert rows[0].startswith("| a | 0, 1 |") and "0.3000 ± 0.1414" in rows[0]  # best mean first
    assert rows[1].startswith("| b | 0 |") and "0.2500" in rows[1]
    assert "--out=" in text and "--nproc=2" in text


def test_selection_table_sorts_candidates_and_names_their_changes(tmp_path):
    fake_run(tmp_path, "base", "sel", 0, 0.21, split="val")
    fake_run(tmp_path, "drop", "sel", 0, 0.24, {"train.model_overrides.image.dropout": 0.5}, split="val")
    fake_run(
        tmp_path, "drop-s1", "sel", 1, 0.26, {"train.model_overrides.image.dropout": 0.5, "train.seed": 1}, split="val"
    )
    text = make_results.selection_table(make_results.load_runs(tmp_path))
    assert "split `val`" in text
    rows = [line for line in text.splitlines() if line.startswith("| `") or line.startswith("| (")]
    assert rows[0].startswith("| `train.model_overrides.image.dropout=0.5` | 0, 1 | ") and "0.2500 ± 0.0141" in rows[0]
    assert rows[1].startswith("| (the experiment file as is) | 0 |") and len(rows) == 2
    assert make_results.selection_table([]) == ""
