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
stage as a subprocess (on N ranks under ``fgcmr.launch`` for the distributed ones). Every stage's config
is built and validated before anything runs. A stage is skipped when its ``done`` check (``fgcmr.stages``)
says its output is complete and made from the same config and inputs, so a rerun after a crash continues
where it stopped. Otherwise it runs, saying why ("eval: config changed (split test→val), redoing"), and
so does everything downstream whose inputs it changes. Output that is expensive or shared is never
replaced silently: a finished or started training run made with another config or data is refused
(``--force`` retrains, deleting ``<out>/run``; or use a new ``--out``), and so are shards made with
another config. The tokenizer and label stages run only when their section is present. Per-stage
status and wall time go to ``<out>/pipeline.json``. A training stage stopped by a signal (Ctrl-C,
SIGTERM to this process) checkpoints and the pipeline exits 75; rerun the same command to continue.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fgcmr.config import ConfigError, apply_overrides, dump_yaml, read_yaml
from fgcmr.launch import launch_env, local_command
from fgcmr.io import atomic_write_json, atomic_write_text, read_json
from fgcmr.run import EXIT_REQUEUE, LABELER, Check, Layout
from fgcmr.stages import SECTIONS, STAGES, Stage

log = logging.getLogger("fgcmr.pipeline")

DEFAULT_DATA_ROOT = "../shared/data"
__all__ = ["LABELER", "Layout", "plan", "resolve_experiment", "run_pipeline", "stage_configs"]


def resolve_experiment(
    config_path: str | Path, out: str | None, overrides: dict[str, Any] | None
) -> tuple[dict, Layout]:
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
        exp["infer"] = {
            **(exp.get("infer") or {}),
            "shards": str(layout.shards),
            "labeler": str(layout.labeler),
            "name": LABELER,
        }
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


# ---- which stages to run ---------------------------------------------------------------------


def stages_of(exp: dict) -> list[Stage]:
    return [s for s in STAGES if not s.optional or s.name in exp]


def stage_configs(exp: dict) -> dict[str, Any]:
    """Every stage's typed config, built (and validated) before anything runs: a bad option fails now."""
    return {s.name: s.build(exp.get(s.name) or {}) for s in stages_of(exp)}


def check(stage: Stage, cfg: Any) -> Check:
    """The stage's ``done`` check; a check that cannot read what it inspects says so instead of failing."""
    try:
        return stage.done(cfg)
    except ConfigError:
        raise
    except (OSError, KeyError, ValueError) as e:
        return Check(False, f"cannot tell ({type(e).__name__}: {e})", exists=True)


def refusal(stage: Stage, check: Check, layout: Layout, upstream: str | None) -> str:
    """The one-line refusal for a protected stage whose existing output would be replaced (``""``: go ahead)."""
    if not stage.protect or not check.exists or not (check.changed or upstream):
        return ""
    why = check.reason if check.changed else f"{upstream} changed"
    return f"{stage.name}: {why} for the output in {getattr(layout, stage.output)}, {stage.protect}"


def plan(exp: dict, layout: Layout, configs: dict[str, Any], force: bool = False) -> list[tuple[Stage, Check]]:
    """Each stage with its check now; refuses (ConfigError) up front where work would be lost."""
    out, upstream = [], None
    for stage in stages_of(exp):
        c = check(stage, configs[stage.name])
        why = refusal(stage, c, layout, upstream)
        if why and not (force and stage.forceable):
            raise ConfigError(why)
        if c.changed and upstream is None:
            upstream = stage.name
        out.append((stage, c))
    return out


# ---- running ------------------------------------------------------------------------------------


def stage_command(stage: Stage, experiment: Path, nproc: int) -> list[str]:
    """The subprocess for one stage: ``python -m fgcmr.cli …``, on ``nproc`` ranks if it is distributed."""
    args = ["-m", "fgcmr.cli", *stage.words, f"--config={experiment}", *stage.rerun_args]
    return local_command(nproc, args) if stage.distributed else [sys.executable, *args]


def run_stage(cmd: list[str], env: dict[str, str]) -> tuple[int, bool]:
    """Run one stage; SIGTERM/SIGUSR1 to the pipeline go on to it (Ctrl-C reaches it from the terminal).
    Returns its exit code (``fgcmr.launch`` keeps a rank's ``EXIT_REQUEUE``) and whether the pipeline was
    interrupted."""
    child = subprocess.Popen(cmd, env=env)
    interrupted = False

    def forward(signum, frame) -> None:
        nonlocal interrupted
        interrupted = True
        if signum != signal.SIGINT:
            child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    try:
        rc = child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return rc, interrupted


def run_pipeline(
    config_path: str,
    nproc: int = 1,
    out: str | None = None,
    overrides: dict[str, Any] | None = None,
    force: bool = False,
    until: str | None = None,
) -> dict:
    """Run every stage that is not done; print the final metrics table. Returns the metrics, or ``{}``
    when ``until`` names the last stage to run (e.g. ``infer``: shards and label sidecars only)."""
    if nproc < 1:
        raise ConfigError(f"--nproc must be ≥ 1, got {nproc}")
    exp, layout = resolve_experiment(config_path, out, overrides)
    configs = stage_configs(exp)
    if until is not None and until not in configs:
        raise ConfigError(f"{config_path}: no stage {until!r} to stop after; stages are {', '.join(configs)}")
    plan(exp, layout, configs, force)
    layout.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(layout.experiment, dump_yaml(exp))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    status: dict[str, dict] = {}
    started = time.monotonic()
    names = [s.name for s in stages_of(exp)]
    for stage in stages_of(exp)[: names.index(until) + 1 if until else None]:
        c = check(stage, configs[stage.name])  # again: an upstream stage may have just changed its inputs
        if c.done:
            log.info("pipeline: %s already done (same config and inputs), skipped", stage.name)
            status[stage.name] = {"status": "skipped"}
            continue
        why = refusal(stage, c, layout, None)
        if why and not (force and stage.forceable):
            raise ConfigError(why)
        if why:
            log.warning(
                "pipeline: %s: %s; --force: deleting %s and redoing it",
                stage.name,
                c.reason,
                getattr(layout, stage.output),
            )
            shutil.rmtree(getattr(layout, stage.output))
        elif c.exists:
            log.warning("pipeline: %s: %s, %s", stage.name, c.reason, "resuming" if stage.rerun_args else "redoing")
        cmd = stage_command(stage, layout.experiment, nproc)
        log.info("pipeline: %s: %s", stage.name, " ".join(cmd))
        t0 = time.monotonic()
        stage_env = launch_env(nproc, env) if stage.distributed else env
        rc, interrupted = run_stage(cmd, stage_env)
        status[stage.name] = {"status": "ran", "seconds": round(time.monotonic() - t0, 1), "returncode": rc}
        _write_status(layout, config_path, nproc, overrides, status, started)
        if rc == EXIT_REQUEUE:
            print(
                f"fgcmr pipeline: {stage.name} stopped by a signal after checkpointing; "
                "rerun the same command to continue",
                file=sys.stderr,
            )
            sys.exit(EXIT_REQUEUE)
        if interrupted:
            print(
                f"fgcmr pipeline: interrupted during {stage.name}; rerun the same command to continue", file=sys.stderr
            )
            sys.exit(130)
        if rc != 0:
            print(
                f"fgcmr pipeline: stage {stage.name!r} failed (exit {rc}); "
                "fix it and rerun the same command to continue",
                file=sys.stderr,
            )
            sys.exit(rc if 0 < rc < 128 else 1)
        c = check(stage, configs[stage.name])
        if not c.done:
            raise RuntimeError(f"pipeline stage {stage.name!r} exited 0 but is not done: {c.reason}")
    _write_status(layout, config_path, nproc, overrides, status, started)
    if until is not None:
        return {}
    metrics = read_json(layout.eval / "metrics.json")
    from fgcmr.evaluate.job import format_table

    print(f"\n{exp['name']}: {layout.eval / 'metrics.json'}{format_table(metrics)}")
    logdir = (
        f"--logdir {layout.out}"
        if _inside(layout.data_dir, layout.out)
        else f"--logdir_spec run:{layout.out},data:{layout.data_dir}"
    )
    print(f"\nTensorBoard: tensorboard {logdir}")
    print(f"Report: {layout.eval / 'report.png'}")
    return metrics


def _inside(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


def _write_status(
    layout: Layout, config_path: str, nproc: int, overrides: dict | None, status: dict, started: float
) -> None:
    atomic_write_json(
        layout.out / "pipeline.json",
        {
            "experiment": str(Path(config_path).absolute()),
            "nproc": nproc,
            "overrides": overrides or {},
            "stages": status,
            "seconds": round(time.monotonic() - started, 1),
            "python": sys.executable,
        },
    )
