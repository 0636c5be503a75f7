#!/usr/bin/env python
"""Does the fine-grained weighting help on this data? A paired-seed ablation with a shuffled-hardness control.

    python scripts/ablate_weighting.py --experiment=configs/experiments/wikipedia-features.yaml --seeds=5 \
        [--nproc=2] [--out=runs/ablate-<name>] [--variants=alpha0,normalised-a1,...] [--split=test] [--dry_run]

Every variant trains with the experiment's towers and schedule (fix them at the unweighted optimum,
chosen on a validation carve, before running this), on the same shards and label sidecars (one
``data_dir`` for all), once per seed: seed k of every variant starts from the same initialisation and
sees the same data order, so differences are paired. Variants are ``alpha0`` (the unweighted twin),
``<weighting>-a<α>`` for the formulations of ``fgcmr.losses`` (``normalised``, ``unnormalised``,
``hinge_only``, ``graded``), ``down-a<α>`` (hard positives down-weighted) and ``shuffled-a<α>`` (the
control: normalised weights from hardness permuted within relevance class × category).

Writes ``<out>/ablation.json`` and ``<out>/ablation.md``: per variant the mean MAP@all, the per-seed
paired Δ against ``alpha0`` with its 95 % t-interval and sign count, and the same against the shuffled
control. A gain is claimed only when the interval against ``alpha0`` excludes 0 *and* the interval
against the control does too. Finished runs are kept (the pipeline skips done stages), so a rerun
continues where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fgcmr.io import atomic_write_json, atomic_write_text  # noqa: E402

DEFAULT_VARIANTS = (
    "alpha0",
    "normalised-a1",
    "normalised-a4",
    "unnormalised-a1",
    "hinge_only-a1",
    "graded-a0.5",
    "down-a1",
    "shuffled-a1",
)
CONTROL = "shuffled-a1"
BASELINE = "alpha0"


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    alpha: float
    weighting: str = "normalised"
    direction: str = "up"
    shuffle: bool = False

    @classmethod
    def parse(cls, name: str) -> "Variant":
        if name == BASELINE:
            return cls(name, 0.0)
        kind, sep, alpha = name.rpartition("-a")
        if not sep:
            raise SystemExit(f"variant {name!r}: expected alpha0 or <kind>-a<alpha> (e.g. normalised-a1)")
        if kind == "down":
            return cls(name, float(alpha), direction="down")
        if kind == "shuffled":
            return cls(name, float(alpha), shuffle=True)
        if kind not in ("normalised", "unnormalised", "hinge_only", "graded"):
            raise SystemExit(f"variant {name!r}: unknown kind {kind!r}")
        return cls(name, float(alpha), weighting=kind)

    def overrides(self) -> list[str]:
        return [
            "--train.loss.name=weighted_pairwise",
            f"--train.loss.alpha={self.alpha}",
            f"--train.loss.weighting={self.weighting}",
            f"--train.loss.direction={self.direction}",
            f"--train.loss.shuffle_hardness={str(self.shuffle).lower()}",
        ]


def run_dir(out: Path, variant: Variant, seed: int) -> Path:
    return out / f"{variant.name}-s{seed}"


def command(args: argparse.Namespace, variant: Variant, seed: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "fgcmr.cli",
        "pipeline",
        f"--config={args.experiment}",
        f"--nproc={args.nproc}",
        f"--out={run_dir(args.out, variant, seed)}",
        f"--data_dir={args.out / 'data'}",
        f"--train.seed={seed}",
        *variant.overrides(),
    ]


def t_interval(deltas: list[float]) -> tuple[float, float, float]:
    """Mean and 95 % two-sided Student-t interval of paired differences."""
    from scipy.stats import t

    n = len(deltas)
    mean = statistics.fmean(deltas)
    if n < 2:
        return mean, -math.inf, math.inf
    half = t.ppf(0.975, n - 1) * statistics.stdev(deltas) / math.sqrt(n)
    return mean, mean - half, mean + half


def paired(scores: dict[str, dict[int, float]], variant: str, against: str) -> dict | None:
    seeds = sorted(scores.get(variant, {}).keys() & scores.get(against, {}).keys())
    if not seeds:
        return None
    deltas = [scores[variant][s] - scores[against][s] for s in seeds]
    mean, lo, hi = t_interval(deltas)
    return {
        "seeds": seeds,
        "deltas": deltas,
        "mean": mean,
        "ci95": [lo, hi],
        "wins": sum(d > 0 for d in deltas),
        "losses": sum(d < 0 for d in deltas),
    }


def summarise(scores: dict[str, dict[int, float]], variants: list[str]) -> dict:
    rows = {}
    for name in variants:
        if not scores.get(name):
            continue
        vs_base = paired(scores, name, BASELINE) if name != BASELINE else None
        vs_control = paired(scores, name, CONTROL) if name not in (BASELINE, CONTROL) else None
        gain = bool(vs_base and vs_base["ci95"][0] > 0 and vs_control and vs_control["ci95"][0] > 0)
        loss = bool(vs_base and vs_base["ci95"][1] < 0)
        verdict = "gain" if gain else "loss" if loss else "no effect shown" if vs_base else "reference"
        rows[name] = {
            "map_avg": statistics.fmean(scores[name].values()),
            "runs": len(scores[name]),
            "vs_alpha0": vs_base,
            "vs_control": vs_control,
            "verdict": verdict,
        }
    return rows


def markdown(rows: dict, experiment: str, metric: str) -> str:
    def cell(p: dict | None) -> str:
        if not p:
            return "—"
        lo, hi = p["ci95"]
        return f"{p['mean']:+.4f} [{lo:+.4f}, {hi:+.4f}] ({p['wins']}+/{p['losses']}−)"

    lines = [
        f"Ablation of the fine-grained weighting on `{experiment}` "
        f"({metric}, paired seeds, 95 % t-interval, sign count)",
        "",
        f"| variant | {metric} | Δ vs {BASELINE} | Δ vs {CONTROL} (control) | verdict |",
        "|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['map_avg']:.4f} (n={r['runs']}) | {cell(r['vs_alpha0'])} | "
            f"{cell(r['vs_control'])} | {r['verdict']} |"
        )
    return "\n".join(lines) + "\n"


def read_score(run: Path, metric: str) -> float | None:
    path = run / "run" / "eval" / "metrics.json"
    return json.loads(path.read_text())[metric] if path.is_file() else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
    parser.add_argument("--metric", default="map_avg")
    parser.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(argv)
    args.out = (args.out or Path("runs") / f"ablate-{Path(args.experiment).stem}").absolute()
    names = args.variants.split(",")
    variants = [Variant.parse(n) for n in names]
    for required in (BASELINE, CONTROL):
        if required not in names:
            raise SystemExit(f"--variants must include {required} (every verdict is paired against it)")
    scores: dict[str, dict[int, float]] = {}
    for seed in range(args.seeds):  # seed-major: a stopped ablation already has complete pairs
        for v in variants:
            cmd = command(args, v, seed)
            print(" ".join(cmd), flush=True)
            if args.dry_run:
                continue
            if read_score(run_dir(args.out, v, seed), args.metric) is None:
                rc = subprocess.run(cmd).returncode
                if rc != 0:
                    print(
                        f"ablate: {v.name} seed {seed} failed (exit {rc}); rerun the same command to continue",
                        file=sys.stderr,
                    )
                    return rc
            scores.setdefault(v.name, {})[seed] = read_score(run_dir(args.out, v, seed), args.metric)
    if args.dry_run:
        return 0
    rows = summarise(scores, names)
    atomic_write_json(
        args.out / "ablation.json",
        {"experiment": args.experiment, "metric": args.metric, "scores": scores, "rows": rows},
    )
    table = markdown(rows, args.experiment, args.metric)
    atomic_write_text(args.out / "ablation.md", table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
