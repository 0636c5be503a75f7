"""``fgcmr bench startup``: a training job's time to its first step, next to what any torch job pays.

Every side is ``nproc`` local ranks started in ``launch_env`` and timed from the launch to the moment rank 0
is ready; repeats take the sides in turn (the machine is noisy) and report medians:

- **fgcmr train** under **fgcmr.launch** (as ``fgcmr pipeline`` starts a stage) and under **torchrun**:
  ``fgcmr train --max_steps=1`` with the trainer's defaults on the README's synthetic corpus, into a fresh
  run directory (so it fits its tokenizer, as a first run does); its first-step line (``fgcmr.startup``)
  gives the phases.
- **floor**: torchrun ranks that import torch and join a gloo group, nothing else: the launcher's, the
  interpreter's and torch's share, which no torch training job under torchrun avoids.

"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable

from fgcmr.config import Validated
from fgcmr.launch import launch_env, local_command, torchrun_command

LAUNCHERS = {"fgcmr.launch": local_command, "torchrun": torchrun_command}
FIRST_STEP = re.compile(r"first step after ([\d.]+) s \((.*?); of the first step")
FLOOR_RANK = """
import time
import torch, torch.distributed as dist
dist.init_process_group("gloo")
dist.barrier()
if dist.get_rank() == 0:
    print(f"ready {time.time():.3f}", flush=True)
dist.destroy_process_group()
"""


@dataclasses.dataclass
class BenchStartupConfig(Validated):
    nproc: int = 2  # local ranks of each launch
    repeats: int = 3  # launches of each side (medians reported)
    model: str = "tiny"  # configs/models/<name>.yaml of the fgcmr side
    items: int = 2000  # synthetic corpus items (its texts train the tokenizer), as in the README's quickstart
    out: str | None = None  # scratch directory (default: a temporary one, removed afterwards)
    json: bool = False  # print one JSON object instead of the table

    def validate(self) -> None:
        if self.nproc < 1 or self.repeats < 1 or self.items < 20:
            raise ValueError("nproc and repeats must be positive, items at least 20")


def run(cfg: BenchStartupConfig) -> dict:
    from fgcmr.bench.host import machine
    from fgcmr.shard.job import ShardConfig, run as shard_run

    with tempfile.TemporaryDirectory(dir=cfg.out) as scratch:
        scratch = Path(scratch)
        with contextlib.redirect_stdout(io.StringIO()):
            shard_run(ShardConfig(source="synthetic", out=str(scratch / "shards"), items=cfg.items))
        floor_script = scratch / "floor_rank.py"
        floor_script.write_text(FLOOR_RANK)
        runs: dict[str, list[dict]] = {name: [] for name in LAUNCHERS}
        floors = []
        for i in range(cfg.repeats):
            floors.append(_time_floor(cfg.nproc, floor_script))
            for name, command in LAUNCHERS.items():  # each run's own line counts from its launcher's start
                runs[name].append(_time_first_step(cfg, command, scratch / "shards", scratch / f"{name}{i}"))
    floor = statistics.median(floors)
    sides = {}
    for name, side in runs.items():
        sides[name] = {
            "first_step_s": round(statistics.median(r["total_s"] for r in side), 2),
            "runs_s": [r["total_s"] for r in side],
            "phases_s": {k: round(statistics.median(r["phases"][k] for r in side), 2) for k in side[0]["phases"]},
        }
    result = {
        "nproc": cfg.nproc,
        "model": cfg.model,
        "repeats": cfg.repeats,
        "fgcmr_train": sides,
        "floor_torchrun_s": round(floor, 2),
        "floor_runs_s": floors,
        "ratio_torchrun_to_floor": round(sides["torchrun"]["first_step_s"] / floor, 2),
        "machine": machine(),
    }
    if cfg.json:
        print(json.dumps(result))
        return result
    lines = [
        f"fgcmr bench startup on {result['machine']}",
        f"  {cfg.nproc} ranks, model {cfg.model}, median of {cfg.repeats}",
    ]
    for name, side in sides.items():
        lines.append(
            f"  fgcmr train under {name:12s} → first step {side['first_step_s']:6.2f} s (runs: {side['runs_s']})"
        )
        lines.append("      phases (s): " + ", ".join(f"{k} {v}" for k, v in side["phases_s"].items()))
    lines.append(f"  torch + gloo group, torchrun  → ready      {floor:6.2f} s (runs: {floors})")
    lines.append(f"  ratio fgcmr train / floor, both under torchrun: {result['ratio_torchrun_to_floor']:.2f}")
    print("\n".join(lines))
    return result


def _time_floor(nproc: int, script: Path) -> float:
    start = time.time()
    done = subprocess.run(
        torchrun_command(nproc, [str(script)]), env=launch_env(nproc), capture_output=True, text=True, check=True
    )
    ready = float(re.search(r"ready ([\d.]+)", done.stdout).group(1))
    return round(ready - start, 2)


def _time_first_step(cfg: BenchStartupConfig, command: Callable, shards: Path, out: Path) -> dict:
    args = ["-m", "fgcmr.cli", "train", f"--shards={shards}", f"--out={out}", f"--model={cfg.model}"]
    args += ["--loss.name=pairwise", "--max_steps=1"]  # otherwise the trainer's defaults
    done = subprocess.run(command(cfg.nproc, args), env=launch_env(cfg.nproc), capture_output=True, text=True)
    line = first_step(done.stderr + done.stdout)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"fgcmr train failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return line


def first_step(log: str) -> dict | None:
    """``{"total_s", "phases": {phase: s}}`` from the first-step line of a training log (``fgcmr.startup``)."""
    line = FIRST_STEP.search(log)
    if line is None:
        return None
    phases = {}
    for part in line.group(2).split(", "):
        name, seconds = part.rsplit(" ", 1)
        phases[name] = float(seconds)
    return {"total_s": float(line.group(1)), "phases": phases}
