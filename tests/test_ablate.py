"""scripts/ablate_weighting.py: variant parsing, the commands it runs, and the paired statistics of its verdict."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from scipy import stats

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("ablate_weighting", REPO / "scripts" / "ablate_weighting.py")
ablate = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = ablate  # dataclasses look their module up
spec.loader.exec_module(ablate)


def test_variants_parse_into_loss_overrides():
    assert ablate.Variant.parse("alpha0").alpha == 0.0
    v = ablate.Variant.parse("graded-a0.5")
    assert (v.weighting, v.alpha, v.direction, v.shuffle) == ("graded", 0.5, "up", False)
    assert ablate.Variant.parse("down-a1").direction == "down"
    assert ablate.Variant.parse("shuffled-a1").shuffle
    assert "--train.loss.shuffle_hardness=true" in ablate.Variant.parse("shuffled-a1").overrides()
    for bad in ("nonsense", "fancy-a1"):
        with pytest.raises(SystemExit):
            ablate.Variant.parse(bad)


def test_paired_interval_and_verdicts():
    deltas = [0.010, 0.012, 0.008, 0.011, 0.009]
    mean, lo, hi = ablate.t_interval(deltas)
    sd = stats.tstd(deltas)
    assert mean == pytest.approx(0.01)
    assert hi - mean == pytest.approx(stats.t.ppf(0.975, 4) * sd / 5**0.5)
    base = {s: 0.30 + 0.001 * s for s in range(5)}
    scores = {
        "alpha0": base,
        "shuffled-a1": {s: v + 0.0005 * (-1) ** s for s, v in base.items()},  # the control: noise around the twin
        "normalised-a1": {s: v + d for (s, v), d in zip(base.items(), deltas)},  # a clear gain over both
        "normalised-a4": {s: v - d for (s, v), d in zip(base.items(), deltas)},  # a clear loss
        "down-a1": {s: v + 0.002 * (-1) ** s for s, v in base.items()},  # noise
    }
    rows = ablate.summarise(scores, list(scores))
    assert rows["normalised-a1"]["verdict"] == "gain"
    assert rows["normalised-a1"]["vs_alpha0"]["wins"] == 5
    assert rows["normalised-a4"]["verdict"] == "loss"
    assert rows["down-a1"]["verdict"] == "no effect shown"
    assert rows["alpha0"]["verdict"] == "reference"
    # a gain over α = 0 that the shuffled control matches is not claimed
    scores["shuffled-a1"] = scores["normalised-a1"]
    assert ablate.summarise(scores, list(scores))["normalised-a1"]["verdict"] == "no effect shown"
    assert rows["normalised-a4"]["control"] == "shuffled-a1"  # no control at α = 4: the α = 1 one
    scores["shuffled-a4"] = scores["normalised-a4"]  # a control at the variant's own α is preferred
    assert ablate.summarise(scores, list(scores))["normalised-a4"]["control"] == "shuffled-a4"
    assert ablate.summarise(scores, list(scores))["shuffled-a4"]["vs_control"] is None
    scores["shuffled_down-a1"] = scores["down-a1"]  # down is judged against its own shuffled control
    assert ablate.summarise(scores, list(scores))["down-a1"]["control"] == "shuffled_down-a1"
    assert ablate.Variant.parse("shuffled_down-a1") == ablate.Variant(
        "shuffled_down-a1", 1.0, "normalised", "down", True
    )
    table = ablate.markdown(rows, "x.yaml", "map_avg")
    assert "| normalised-a1 |" in table and "5+/0−" in table


def test_dry_run_prints_paired_commands(tmp_path, capsys):
    assert (
        ablate.main(
            [
                "--experiment=configs/experiments/synthetic-tiny.yaml",
                "--seeds=2",
                f"--out={tmp_path}",
                "--variants=alpha0,shuffled-a1",
                "--dry_run",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4
    assert all(f"--data_dir={tmp_path / 'data'}" in line for line in lines)  # one set of shards and sidecars
    assert sum("--train.seed=1" in line for line in lines) == 2
    for variants in ("normalised-a1", "alpha0,normalised-a1", "alpha0,down-a1,shuffled-a4"):  # a control missing
        with pytest.raises(SystemExit, match="must include"):
            ablate.main(["--experiment=x.yaml", f"--variants={variants}", "--dry_run"])
    # down judged against its own control needs no shuffled-a1
    args = ["--experiment=configs/experiments/synthetic-tiny.yaml", "--seeds=1", f"--out={tmp_path}", "--dry_run"]
    assert ablate.main([*args, "--variants=alpha0,down-a1,shuffled_down-a1"]) == 0
