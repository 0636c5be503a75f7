#!/usr/bin/env python
"""Regenerate ``docs/results.md`` from pipeline output directories.

    python scripts/make_results.py [--runs=runs] [--selection=runs/val] [--out=docs/results.md]

Every ``<runs>/*/pipeline.json`` with a finished ``run/eval/metrics.json`` is one run; runs group by
experiment name (``experiment.yaml``) and seed (``train.seed``). Per group: mean ± sample std over
seeds of MAP@all (image→text, text→image, average) and Recall@1/5/10 both directions; the classical baselines from
the runs' own evals; and the exact commands that produced each run. Runs under ``--selection`` are the
model-selection candidates scored on a validation carve of the train split; they get their own table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fgcmr.io import atomic_write_text  # noqa: E402

RECALL_K = (1, 5, 10)
RECALL_KEYS = tuple(f"r{k}_{d}" for d in ("i2t", "t2i") for k in RECALL_K)


def load_runs(runs: Path) -> list[dict]:
    found = []
    for status_path in sorted(runs.glob("*/pipeline.json")):
        out = status_path.parent
        metrics_path = out / "run" / "eval" / "metrics.json"
        if not metrics_path.is_file():
            continue
        exp = yaml.safe_load((out / "experiment.yaml").read_text())
        status = json.loads(status_path.read_text())
        found.append(
            {
                "out": out,
                "name": exp["name"],
                "seed": exp["train"].get("seed", 0),
                "exp": exp,
                "status": status,
                "metrics": json.loads(metrics_path.read_text()),
            }
        )
    return found


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def command(run: dict) -> str:
    status = run["status"]
    try:
        config = Path(status["experiment"]).relative_to(REPO)
    except ValueError:
        config = Path(status["experiment"])
    try:
        out = run["out"].relative_to(REPO)
    except ValueError:
        out = run["out"]
    extra = "".join(f" --{k}={v}" for k, v in (status.get("overrides") or {}).items())
    return f"fgcmr pipeline --config={config} --nproc={status['nproc']} --out={out}{extra}"


def seconds(run: dict) -> float:
    return sum(s.get("seconds", 0) for s in run["status"]["stages"].values())


def tables(runs: list[dict]) -> str:
    by_dataset: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        by_dataset[r["metrics"]["data"]["name"]][r["name"]].append(r)
    parts = []
    for dataset, groups in sorted(by_dataset.items()):
        parts.append(f"## {dataset}\n")
        any_m = next(iter(groups.values()))[0]["metrics"]
        relevance = "same category" if any_m.get("category_relevance", True) else "same image (no categories)"
        parts.append(
            f"Test split: {any_m['images']} images, {any_m['texts']} texts; MAP@all relevance = {relevance}; "
            f"chance MAP@all {any_m['chance_map']:.4f} "
            f"(i→t {any_m['chance_map_i2t']:.4f}, t→i {any_m['chance_map_t2i']:.4f}).\n"
        )
        parts.append(
            "| experiment | seeds | loss (α) | MAP@all i→t | MAP@all t→i | MAP@all avg | "
            + " | ".join(f"R@{k} {d}" for d in ("i→t", "t→i") for k in RECALL_K)
            + " |"
        )
        parts.append("|---" * (6 + 2 * len(RECALL_K)) + "|")
        for name, rs in sorted(groups.items(), key=lambda kv: -statistics.mean(r["metrics"]["map_avg"] for r in kv[1])):
            rs = sorted(rs, key=lambda r: r["seed"])
            loss = rs[0]["exp"]["train"].get("loss", {})
            loss_txt = loss.get("name", "?") + (
                f" ({loss['alpha']})" if loss.get("name") == "weighted_pairwise" and "alpha" in loss else ""
            )
            cols = [mean_std([r["metrics"][k] for r in rs]) for k in ("map_i2t", "map_t2i", "map_avg", *RECALL_KEYS)]
            parts.append(
                f"| {name} | {', '.join(str(r['seed']) for r in rs)} | {loss_txt} | " + " | ".join(cols) + " |"
            )
        baselines = {}
        for rs in groups.values():
            for r in rs:
                for bname, b in (r["metrics"].get("baselines") or {}).items():
                    if isinstance(b, dict) and "map_avg" in b:
                        baselines.setdefault(bname, b)
        if baselines:
            parts.append(
                "\nClassical baselines, computed by `fgcmr eval --baselines=true` on the same test samples "
                "(fitted on the train split; regularisation by cross-validation on train):\n"
            )
            parts.append("| baseline | inputs | MAP@all i→t | MAP@all t→i | MAP@all avg |")
            parts.append("|---|---|---|---|---|")
            for bname, b in sorted(baselines.items()):
                parts.append(
                    f"| {bname} | image features + {b.get('text_input')} | "
                    f"{b['map_i2t']:.4f} | {b['map_t2i']:.4f} | {b['map_avg']:.4f} |"
                )
        parts.append("\nCommands (wall time of the stages that ran):\n")
        parts.append("```")
        for rs in groups.values():
            for r in sorted(rs, key=lambda r: r["seed"]):
                parts.append(f"{command(r)}   # {seconds(r):.0f} s")
        parts.append("```\n")
    return "\n".join(parts)


def selection_table(runs: list[dict]) -> str:
    """Candidates of a model selection, best first: what each changes and its score over seeds on its eval split."""
    if not runs:
        return ""
    split = runs[0]["exp"].get("eval", {}).get("split", "test")
    candidates: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        changes = tuple((k, v) for k, v in (r["status"].get("overrides") or {}).items() if k != "train.seed")
        candidates[changes].append(r)
    parts = [
        f"## Model selection ({runs[0]['name']}, scored on split `{split}`)\n",
        "Each candidate is one pipeline run per seed that changes the options shown; "
        f"`{split}` is carved from the train "
        "split (`shard.holdout`), so the test split plays no part in the choice. Best mean first.\n",
        "| changes | seeds | MAP@all i→t | MAP@all t→i | MAP@all avg |",
        "|---|---|---|---|---|",
    ]
    for changes, rs in sorted(
        candidates.items(), key=lambda kv: -statistics.mean(r["metrics"]["map_avg"] for r in kv[1])
    ):
        rs = sorted(rs, key=lambda r: r["seed"])
        cols = [mean_std([r["metrics"][k] for r in rs]) for k in ("map_i2t", "map_t2i", "map_avg")]
        text = ", ".join(f"`{k}={v}`" for k, v in changes) or "(the experiment file as is)"
        parts.append(f"| {text} | {', '.join(str(r['seed']) for r in rs)} | " + " | ".join(cols) + " |")
    parts += ["\nCommands:\n", "```", *(command(r) for r in runs), "```\n"]
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default=str(REPO / "runs"))
    parser.add_argument(
        "--selection", default=str(REPO / "runs" / "val"), help="model-selection runs (validation carve)"
    )
    parser.add_argument("--out", default=str(REPO / "docs" / "results.md"))
    parser.add_argument(
        "--notes",
        default=str(REPO / "docs" / "results_notes.md"),
        help="hand-written analysis appended verbatim, if present",
    )
    args = parser.parse_args()
    runs = load_runs(Path(args.runs))
    if not runs:
        sys.exit(f"no finished runs under {args.runs}")
    header = (
        "# Results\n\nGenerated by `python scripts/make_results.py` from the run directories; do not edit by hand "
        "(analysis lives in `docs/results_notes.md` and is appended). MAP@all uses relevance = same category "
        "(Wikipedia/TVGraz protocol) where the data has categories, else same image; "
        "Recall@K uses relevance = same image (an image query is a hit when any of its "
        "texts is in the top K). Mean ± sample standard deviation over seeds.\n\n"
    )
    notes = Path(args.notes)
    body = (
        header
        + tables(runs)
        + selection_table(load_runs(Path(args.selection)))
        + ("\n" + notes.read_text() if notes.is_file() else "")
    )
    atomic_write_text(args.out, body)
    print(f"wrote {args.out} from {len(runs)} runs")


if __name__ == "__main__":
    main()
