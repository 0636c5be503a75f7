"""``fgcmr pipeline``: shard → label tokenizer → label train → label infer → train → export → eval.

One experiment file drives it. Its sections are named like the CLI's config sections (``shard``,
``tokenizer``, ``label``, ``infer``, ``train``, ``export``, ``eval``); top-level keys:

- ``base``: another experiment file (relative to this one) that this one changes: sections merge
  key by key, so a variant states only what differs;
- ``name``: the experiment's name (default: the file's stem); output goes to ``runs/<name>`` unless
  ``--out`` is given;
- ``data_root``: where the real data sets live. ``$FGCMR_DATA`` wins over it; default
  ``../shared/data``. Relative paths are taken from the current directory (run from the repository
  root). Section values may say ``${data_root}/...``;
- ``slurm``: options of ``fgcmr submit pipeline`` (ignored here);
- ``data_dir``: where the dataset shards and the labeler go (default ``<out>/data``). Variants of one
  experiment point it at one place so they share the shards and the label sidecars.

The pipeline fills in every path between stages, writes the resolved file to ``<out>/experiment.yaml``
(so any stage can be rerun by hand: ``fgcmr train --config=<out>/experiment.yaml``), and runs each
stage as a subprocess (``torchrun --nproc_per_node N`` for the distributed ones). A stage whose
verified output already exists is skipped, so a rerun after a crash continues where it stopped;
delete a stage's output to redo it. The tokenizer and label stages run only when their section is
present. Per-stage status and wall time go to ``<out>/pipeline.json``.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from fgcmr.config import ConfigError, apply_overrides, dump_yaml, read_yaml
from fgcmr.distributed import free_port
from fgcmr.io import atomic_write_json, atomic_write_text, read_json, sha256_file

log = logging.getLogger("fgcmr.pipeline")

DEFAULT_DATA_ROOT = "../shared/data"
LABELER = "labeler"
SECTIONS = ("shard", "tokenizer", "label", "infer", "train", "export", "eval")
# stage → (CLI words, distributed?)
COMMANDS: dict[str, tuple[list[str], bool]] = {
    "shard": (["shard"], False),
    "tokenizer": (["label", "tokenizer"], False),
    "label": (["label", "train"], True),
    "infer": (["label", "infer"], True),
    "train": (["train", "--resume=auto"], True),
    "export": (["export"], False),
    "eval": (["eval"], True),
}


class Layout:
    """Where every stage's output lives."""

    def __init__(self, out: Path, data_dir: Path):
        self.out, self.data_dir = out, data_dir
        self.shards = data_dir / "shards"
        self.tokenizer = data_dir / "tokenizer"
        self.labeler = data_dir / LABELER
        self.run = out / "run"
        self.export = self.run / "export"
        self.eval = self.run / "eval"
        self.experiment = out / "experiment.yaml"


def resolve_experiment(config_path: str | Path, out: str | None, overrides: dict[str, Any] | None) -> tuple[dict, Layout]:
    """Read the experiment, apply overrides and ``${data_root}``, and wire every stage's paths."""
    raw = apply_overrides(read_experiment(config_path), {k: v for k, v in (overrides or {}).items() if v is not None})
    unknown = sorted(set(raw) - set(SECTIONS) - {"name", "data_root", "data_dir", "description", "slurm"})
    if unknown:
        raise ConfigError(f"{config_path}: unknown top-level key {unknown[0]!r}; sections are {', '.join(SECTIONS)}")
    name = raw.get("name") or Path(config_path).stem
    data_root = Path(os.environ.get("FGCMR_DATA") or raw.get("data_root") or DEFAULT_DATA_ROOT).resolve()
    exp = _substitute(raw, {"${data_root}": str(data_root)})
    out_dir = Path(out or f"runs/{name}").absolute()
    layout = Layout(out_dir, Path(exp.get("data_dir") or out_dir / "data").absolute())
    exp.update(name=name, data_root=str(data_root), data_dir=str(layout.data_dir))
    for section in ("shard", "train", "export", "eval"):
        exp[section] = dict(exp.get(section) or {})
    exp["shard"]["out"] = str(layout.shards)
    exp["shard"].setdefault("name", name)
    if "tokenizer" in exp:
        exp["tokenizer"] = {**(exp["tokenizer"] or {}), "shards": str(layout.shards), "out": str(layout.tokenizer)}
    if "label" in exp:
        exp["label"] = {**(exp["label"] or {}), "shards": str(layout.shards), "out": str(layout.labeler)}
        if "tokenizer" in exp:
            exp["label"]["tokenizer"] = str(layout.tokenizer)
        exp["infer"] = {**(exp.get("infer") or {}), "shards": str(layout.shards), "labeler": str(layout.labeler), "name": LABELER}
        exp["train"]["labels"] = LABELER
    exp["train"].update(shards=str(layout.shards), out=str(layout.run))
    exp["export"]["run"] = str(layout.run)
    exp["eval"]["run"] = str(layout.run)
    return exp, layout


def read_experiment(path: str | Path) -> dict:
    """An experiment file, merged over its ``base`` file (a path relative to it) when it names one."""
    data = read_yaml(path)
    base = data.pop("base", None)
    return _merge(read_experiment(Path(path).parent / base), data) if base else data


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _substitute(node: Any, table: dict[str, str]) -> Any:
    if isinstance(node, dict):
        return {k: _substitute(v, table) for k, v in node.items()}
    if isinstance(node, list):
        return [_substitute(v, table) for v in node]
    if isinstance(node, str):
        for key, value in table.items():
            node = node.replace(key, value)
    return node


# ---- is a stage's output there and whole? -------------------------------------------------------

def shard_done(layout: Layout) -> bool:
    path = layout.shards / "manifest.json"
    if not path.is_file():
        return False
    splits = read_json(path)["splits"].values()
    return all((layout.shards / s["file"]).is_file() and (layout.shards / s["file"]).stat().st_size == s["bytes"] for sp in splits for s in sp["shards"])


def tokenizer_done(layout: Layout) -> bool:
    return (layout.tokenizer / "tokenizer.json").is_file() and (layout.tokenizer / "config.yaml").is_file()


def label_done(layout: Layout) -> bool:
    return (layout.labeler / "metrics.json").is_file()


def infer_done(layout: Layout) -> bool:
    from fgcmr.dataset import open_dataset
    from fgcmr.labels import labels_dir, sidecar_path

    if not (labels_dir(layout.shards, LABELER) / "manifest.json").is_file():
        return False
    ds = open_dataset(layout.shards)
    return all(sidecar_path(layout.shards, LABELER, s.file).is_file() for split in ds.split_names for s in ds.shard_infos(split))


def train_done(layout: Layout) -> bool:
    summary, config = layout.run / "train_metrics.json", layout.run / "config.yaml"
    if not (summary.is_file() and config.is_file()):
        return False
    total = (read_yaml(config).get("schedule") or {}).get("total_steps")
    return total is not None and read_json(summary).get("step", -1) >= total


def export_done(layout: Layout) -> bool:
    weights = layout.export / "model.safetensors"
    return weights.is_file() and (layout.export / "model_config.json").is_file() and \
        weights.stat().st_mtime >= (layout.run / "train_metrics.json").stat().st_mtime


def eval_done(layout: Layout) -> bool:
    path = layout.eval / "metrics.json"
    return path.is_file() and read_json(path).get("model", {}).get("sha256") == sha256_file(layout.export / "model.safetensors")


DONE: dict[str, Callable[[Layout], bool]] = {
    "shard": shard_done, "tokenizer": tokenizer_done, "label": label_done, "infer": infer_done,
    "train": train_done, "export": export_done, "eval": eval_done,
}


# ---- running ------------------------------------------------------------------------------------

def stage_command(stage: str, experiment: Path, nproc: int) -> list[str]:
    """The subprocess for one stage: ``python -m fgcmr.cli …`` or the same under torchrun."""
    words, distributed = COMMANDS[stage]
    args = ["-m", "fgcmr.cli", *words, f"--config={experiment}"]
    if not distributed:
        return [sys.executable, *args]
    torchrun = Path(sys.executable).with_name("torchrun")
    launcher = [str(torchrun)] if torchrun.is_file() else [sys.executable, "-m", "torch.distributed.run"]
    return [*launcher, "--nnodes=1", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1", f"--master_port={free_port()}", *args]


def run_pipeline(config_path: str, nproc: int = 1, out: str | None = None, overrides: dict[str, Any] | None = None) -> dict:
    """Run every stage that is not already done; print the final metrics table. Returns the metrics."""
    if nproc < 1:
        raise ConfigError(f"--nproc must be ≥ 1, got {nproc}")
    exp, layout = resolve_experiment(config_path, out, overrides)
    layout.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(layout.experiment, dump_yaml(exp))
    stages = [s for s in SECTIONS if s not in ("tokenizer", "label", "infer") or s in exp]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    status: dict[str, dict] = {}
    started = time.monotonic()
    for stage in stages:
        if DONE[stage](layout):
            log.info("pipeline: %s already done, skipped", stage)
            status[stage] = {"status": "skipped"}
            continue
        cmd = stage_command(stage, layout.experiment, nproc)
        log.info("pipeline: %s: %s", stage, " ".join(cmd))
        t0 = time.monotonic()
        rc = subprocess.run(cmd, env=env).returncode
        status[stage] = {"status": "ran", "seconds": round(time.monotonic() - t0, 1), "returncode": rc}
        _write_status(layout, config_path, nproc, overrides, status, started)
        if rc != 0:
            raise RuntimeError(f"pipeline stage {stage!r} failed (exit {rc}); fix it and rerun the same command to continue")
        if not DONE[stage](layout):
            raise RuntimeError(f"pipeline stage {stage!r} exited 0 but its output is incomplete under {layout.out}")
    _write_status(layout, config_path, nproc, overrides, status, started)
    metrics = read_json(layout.eval / "metrics.json")
    from fgcmr.evaluate.job import format_table

    print(f"\n{exp['name']}: {layout.eval / 'metrics.json'}{format_table(metrics)}")
    logdir = f"--logdir {layout.out}" if _inside(layout.data_dir, layout.out) else f"--logdir_spec run:{layout.out},data:{layout.data_dir}"
    print(f"\nTensorBoard: tensorboard {logdir}")
    print(f"Report: {layout.eval / 'report.png'}")
    return metrics


def _inside(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


def _write_status(layout: Layout, config_path: str, nproc: int, overrides: dict | None, status: dict, started: float) -> None:
    atomic_write_json(layout.out / "pipeline.json", {
        "experiment": str(Path(config_path).absolute()), "nproc": nproc, "overrides": overrides or {}, "stages": status,
        "seconds": round(time.monotonic() - started, 1), "python": sys.executable,
        "torchrun": shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun")),
    })
