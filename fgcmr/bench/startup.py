"""``fgcmr bench startup``: a training job's time to its first step, next to what any torch job pays.

Both sides are launched the same way (``torchrun`` on ``nproc`` local ranks, ``launch_env``) and timed from
the launch to the moment rank 0 is ready:

- **fgcmr**: ``fgcmr train --max_steps=1`` with the trainer's defaults on the README's synthetic corpus, into a
  fresh run directory (so it fits its tokenizer, as a first run does); its first-step line (``fgcmr.startup``)
  gives the phases.
- **floor**: ranks that import torch and join a gloo group, nothing else: the launcher's, the interpreter's
  and torch's share, which no torch training job avoids.

Repeats alternate the two sides (the machine is noisy) and report medians.
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

from fgcmr.config import Validated
from fgcmr.distributed import launch_env, torchrun_command

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
        fgcmr_runs, floors = [], []
        for i in range(cfg.repeats):
            floors.append(_time_floor(cfg.nproc, floor_script))
            fgcmr_runs.append(_time_first_step(cfg, scratch / "shards", scratch / f"run{i}"))  # from torchrun's start
    total = statistics.median(r["total_s"] for r in fgcmr_runs)
    floor = statistics.median(floors)
    phases = {
        name: round(statistics.median(r["phases"][name] for r in fgcmr_runs), 2) for name in fgcmr_runs[0]["phases"]
    }
    result = {
        "nproc": cfg.nproc,
        "model": cfg.model,
        "repeats": cfg.repeats,
        "first_step_s": round(total, 2),
        "floor_s": round(floor, 2),
        "ratio": round(total / floor, 2),
        "phases_s": phases,
        "first_step_runs_s": [r["total_s"] for r in fgcmr_runs],
        "floor_runs_s": floors,
        "machine": machine(),
    }
    if cfg.json:
        print(json.dumps(result))
    else:
        print(
            f"fgcmr bench startup on {result['machine']}\n"
            f"  {cfg.nproc} ranks under torchrun, model {cfg.model}, median of {cfg.repeats}\n"
            f"  fgcmr train, launch → first step   {total:6.2f} s  (runs: {result['first_step_runs_s']})\n"
            f"  torch + gloo group, launch → ready {floor:6.2f} s  (runs: {floors})\n"
            f"  ratio                              {result['ratio']:6.2f}\n"
            "  fgcmr's phases (s): " + ", ".join(f"{k} {v}" for k, v in phases.items())
        )
    return result


def _time_floor(nproc: int, script: Path) -> float:
    start = time.time()
    done = subprocess.run(
        torchrun_command(nproc, [str(script)]), env=launch_env(nproc), capture_output=True, text=True, check=True
    )
    ready = float(re.search(r"ready ([\d.]+)", done.stdout).group(1))
    return round(ready - start, 2)


def _time_first_step(cfg: BenchStartupConfig, shards: Path, out: Path) -> dict:
    args = ["-m", "fgcmr.cli", "train", f"--shards={shards}", f"--out={out}", f"--model={cfg.model}"]
    args += ["--loss.name=pairwise", "--max_steps=1"]  # otherwise the trainer's defaults
    done = subprocess.run(torchrun_command(cfg.nproc, args), env=launch_env(cfg.nproc), capture_output=True, text=True)
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
