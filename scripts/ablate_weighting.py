#!/usr/bin/env python
"""Does the fine-grained weighting help on this data? A paired-seed ablation with a shuffled-hardness control.

    python scripts/ablate_weighting.py --experiment=configs/experiments/wikipedia-features.yaml --seeds=5 \
        [--cached] [--nproc=2] [--out=runs/ablate-<name>] [--variants=alpha0,normalised-a1,...] [--split=test] \
        [--set train.epochs=40 ...] [--dry_run]

Every variant trains with the experiment's towers and schedule (fix them at the unweighted optimum,
chosen on a validation carve, before running this), on the same shards and label sidecars (one
``data_dir`` for all), once per seed: seed k of every variant starts from the same initialisation and
sees the same data order, so differences are paired. Variants are ``alpha0`` (the unweighted twin),
``<weighting>-a<α>`` for the formulations of ``fgcmr.losses`` (``normalised``, ``unnormalised``,
``hinge_only``, ``graded``), ``down-a<α>`` (hard positives down-weighted) and ``shuffled-a<α>`` (the
control: normalised weights from hardness permuted within relevance class × category; ``shuffled_down-a<α>``
is the same control for ``down``). Each variant is compared with the control of its direction and α when
that was run, else with ``shuffled-a1``.

Writes ``<out>/ablation.json`` and ``<out>/ablation.md``: per variant the mean MAP@all, the per-seed
paired Δ against ``alpha0`` with its 95 % t-interval and sign count, and the same against the shuffled
control. A gain is claimed only when the interval against ``alpha0`` excludes 0 *and* the interval
against the control does too. Finished runs are kept (the pipeline skips done stages), so a rerun
continues where it stopped.

``--cached`` makes a run cost seconds instead of minutes (``fgcmr.train.cached``): the pipeline makes
the shards and label sidecars once, then every run trains in this process on inputs cached in memory:
feature towers whole, pretrained towers frozen (projections trained only). Same loss, labels, optimizer,
schedule and global batch; no augmentation. ``--set`` changes the experiment (``section.option=value``,
as on the pipeline's command line) for every run; ``--split`` scores another split (a validation carve).
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
from fgcmr.losses import LossConfig  # noqa: E402

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
CACHED_METRICS = "cached-metrics.json"
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
        if kind == "shuffled_down":  # the control of down-a<α>
            return cls(name, float(alpha), direction="down", shuffle=True)
        if kind not in ("normalised", "unnormalised", "hinge_only", "graded"):
            raise SystemExit(f"variant {name!r}: unknown kind {kind!r}")
        return cls(name, float(alpha), weighting=kind)

    def loss(self, base: LossConfig) -> LossConfig:
        return dataclasses.replace(
            base,
            name="weighted_pairwise",
            alpha=self.alpha,
            weighting=self.weighting,
            direction=self.direction,
            shuffle_hardness=self.shuffle,
        )

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
        f"--data_dir={args.data_dir}",
        f"--train.seed={seed}",
        *(f"--{k}={v}" for k, v in args.set.items()),
        *([f"--eval.split={args.split}"] if args.split else []),
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


def control_of(name: str, scores: dict) -> str:
    """The shuffled control of the variant's direction at its α when it was run, else ``CONTROL``."""
    kind, _, alpha = name.rpartition("-a")
    for control in (f"shuffled_down-a{alpha}",) if kind == "down" else ():
        if scores.get(control):
            return control
    same_alpha = f"shuffled-a{alpha}"
    return same_alpha if scores.get(same_alpha) else CONTROL


def summarise(scores: dict[str, dict[int, float]], variants: list[str]) -> dict:
    rows = {}
    for name in variants:
        if not scores.get(name):
            continue
        vs_base = paired(scores, name, BASELINE) if name != BASELINE else None
        control = control_of(name, scores)
        vs_control = paired(scores, name, control) if name != BASELINE and not name.startswith("shuffled") else None
        gain = bool(vs_base and vs_base["ci95"][0] > 0 and vs_control and vs_control["ci95"][0] > 0)
        loss = bool(vs_base and vs_base["ci95"][1] < 0)
        verdict = "gain" if gain else "loss" if loss else "no effect shown" if vs_base else "reference"
        rows[name] = {
            "map_avg": statistics.fmean(scores[name].values()),
            "runs": len(scores[name]),
            "vs_alpha0": vs_base,
            "control": control if vs_control else None,
            "vs_control": vs_control,
            "verdict": verdict,
        }
    return rows


def markdown(rows: dict, experiment: str, metric: str, setup: str = "") -> str:
    def cell(p: dict | None) -> str:
        if not p:
            return "—"
        lo, hi = p["ci95"]
        return f"{p['mean']:+.4f} [{lo:+.4f}, {hi:+.4f}] ({p['wins']}+/{p['losses']}−)"

    lines = [
        f"Ablation of the fine-grained weighting on `{experiment}` "
        f"({metric}, paired seeds, 95 % t-interval, sign count){setup}",
        "",
        f"| variant | {metric} | Δ vs {BASELINE} | Δ vs shuffled control (same α, else {CONTROL}) | verdict |",
        "|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['map_avg']:.4f} (n={r['runs']}) | {cell(r['vs_alpha0'])} | "
            f"{cell(r['vs_control'])} | {r['verdict']} |"
        )
    return "\n".join(lines) + "\n"


def read_score(run: Path, metric: str) -> float | None:
    for path in (run / "run" / "eval" / "metrics.json", run / CACHED_METRICS):
        if path.is_file():
            return json.loads(path.read_text())[metric]
    return None


def parse_set(items: list[str]) -> dict[str, object]:
    """``["train.epochs=40", ...]`` → ``{"train.epochs": 40}`` (values read as YAML scalars)."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set {item!r}: expected section.option=value")
        out[key] = yaml.safe_load(value)
    return out


class CachedRunner:
    """Shards and sidecars through the pipeline (once), then each run in this process on cached inputs."""

    def __init__(self, args: argparse.Namespace):
        import torch

        from fgcmr.dataset import open_dataset
        from fgcmr.distributed import DistEnv
        from fgcmr.pipeline import resolve_experiment, run_pipeline, stage_configs
        from fgcmr.train.cached import cache_split
        from fgcmr.train.config import load_model_config
        from fgcmr.train.loop import with_tokenizer

        overrides = {**args.set, "data_dir": str(args.data_dir)}
        prep = str(args.out / "prep")
        run_pipeline(args.experiment, nproc=args.nproc, out=prep, overrides=overrides, until="infer")
        exp, _ = resolve_experiment(args.experiment, prep, overrides)
        self.train_cfg = stage_configs(exp)["train"]
        self.dataset = open_dataset(self.train_cfg.shards)
        model_cfg = load_model_config(self.train_cfg.model, self.train_cfg.model_overrides)
        # a tfidf text tower's vectoriser, fitted on the train split as ``fgcmr train`` does
        self.model_cfg = with_tokenizer(model_cfg, self.dataset, Path(prep), DistEnv(), self.train_cfg.data)
        split = args.split or exp["eval"].get("split", "test")
        cache = args.data_dir / "cached"
        self.train = cache_split(self.dataset, self.train_cfg.data.split, self.model_cfg, self.train_cfg.labels, cache)
        self.test = cache_split(self.dataset, split, self.model_cfg, None, cache)
        self.nproc = args.nproc
        torch.set_num_threads(1)  # small models: one thread per run beats two fighting over shared cores

    def __call__(self, variant: Variant, seed: int, run: Path) -> None:
        from fgcmr.train.cached import train_and_score

        cfg = dataclasses.replace(self.train_cfg, seed=seed, loss=variant.loss(self.train_cfg.loss))
        metrics = train_and_score(cfg, self.model_cfg, self.train, self.test, self.dataset, self.nproc)
        atomic_write_json(run / CACHED_METRICS, metrics)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--data_dir", type=Path, help="shards and sidecars (default <out>/data; share it across --out)")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
    parser.add_argument("--metric", default="map_avg")
    parser.add_argument("--cached", action="store_true", help="train in this process on cached tower inputs")
    parser.add_argument("--split", help="split to score (default: the experiment's eval.split)")
    parser.add_argument("--set", action="append", default=[], help="section.option=value for every run")
    parser.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(argv)
    suffix = "-cached" if args.cached else ""
    args.out = (args.out or Path("runs") / f"ablate-{Path(args.experiment).stem}{suffix}").absolute()
    args.set = parse_set(args.set)
    args.data_dir = (args.data_dir or args.out / "data").absolute()
    names = args.variants.split(",")
    variants = [Variant.parse(n) for n in names]
    planned = {n: {0: 0.0} for n in names}  # which controls this run will have scored
    needed = {BASELINE} | {control_of(n, planned) for n in names if n != BASELINE and not n.startswith("shuffled")}
    if missing := sorted(needed - set(names)):
        raise SystemExit(f"--variants must include {', '.join(missing)} (the verdicts are paired against them)")
    scores: dict[str, dict[int, float]] = {}
    runner = CachedRunner(args) if args.cached and not args.dry_run else None
    for seed in range(args.seeds):  # seed-major: a stopped ablation already has complete pairs
        for v in variants:
            cmd = command(args, v, seed)
            print(f"cached: {v.name} seed {seed}" if args.cached else " ".join(cmd), flush=True)
            if args.dry_run:
                continue
            if read_score(run_dir(args.out, v, seed), args.metric) is None and runner is not None:
                runner(v, seed, run_dir(args.out, v, seed))
            elif read_score(run_dir(args.out, v, seed), args.metric) is None:
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
        {
            "experiment": args.experiment,
            "metric": args.metric,
            "cached": args.cached,
            "set": args.set,
            "split": args.split,
            "scores": scores,
            "rows": rows,
        },
    )
    setup = "; cached inputs (feature towers trained whole, pretrained towers frozen)" if args.cached else ""
    setup += "".join(f"; {k}={v}" for k, v in args.set.items()) + (f"; split {args.split}" if args.split else "")
    table = markdown(rows, args.experiment, args.metric, setup)
    atomic_write_text(args.out / "ablation.md", table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
