"""What a run tells a person: its log file beside its output, one closing line naming the next command,
no library noise, figures rather than float reprs, and which split validation uses."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from waits import run_following

from fgcmr.dataset import open_dataset
from fgcmr.progress import NOISE, figure, quiet_prints, setup_logging
from fgcmr.train.validate import validation_split


def test_shard_writes_its_log_beside_its_output_and_names_the_next_command(tmp_path: Path):
    out = tmp_path / "ds"
    cmd = [sys.executable, "-m", "fgcmr", "shard", "--source=synthetic", f"--out={out}", "--items=40"]
    res = run_following([*cmd, "--holdout.fraction=0.25"], env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr
    log = (out / "logs" / "shard.log").read_text().splitlines()
    assert f"started: fgcmr shard --source=synthetic --out={out} --items=40 --holdout.fraction=0.25 (pid" in log[0]
    assert "shard: done in " in log[-1] and f"next: fgcmr label train --shards={out} --out=<labeler dir>" in log[-1]
    assert log[-1].split("] ", 1)[1] in res.stderr  # the same line closes the terminal output
    assert subprocess.run([sys.executable, "-m", "fgcmr", "verify", str(out)], capture_output=True).returncode == 0
    # the holdout made a validation carve: periodic validation uses it unless told otherwise
    dataset = open_dataset(out)
    assert validation_split(dataset, None) == "val" and validation_split(dataset, "test") == "test"


def test_library_noise_is_dropped_and_the_rest_kept(capsys):
    setup_logging()
    # DeepSpeed's logger has its own handler and does not propagate once deepspeed is imported, so collect what
    # passes the loggers' filters directly (the same whether or not an earlier test imported deepspeed)
    kept: list[str] = []
    collect = logging.Handler()
    collect.emit = lambda record: kept.append(record.getMessage())
    loggers = [logging.getLogger(name) for name in ("DeepSpeed", "torch.utils.cpp_extension")]
    for logger in loggers:
        logger.addHandler(collect)
    try:
        loggers[0].warning("Setting accelerator to CPU. If you have GPU or other accelerator, ...")
        loggers[1].warning("No CUDA runtime is found, using CUDA_HOME='/usr/local'")
        loggers[0].warning("a real DeepSpeed warning")
    finally:
        for logger in loggers:
            logger.removeHandler(collect)
    with quiet_prints():
        print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
        print("a line of the run")
    out = capsys.readouterr()
    assert kept == ["a real DeepSpeed warning"] and "a line of the run" in out.out
    assert not NOISE.search(out.err + out.out)


def test_library_progress_bars_are_off():
    """transformers draws a bar on save ("Writing model shards") that is frames in a log file."""
    code = (
        "from fgcmr.progress import setup_logging; setup_logging()\n"
        "from transformers.utils import logging\nprint(logging.is_progress_bar_enabled())"
    )
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    res = run_following([sys.executable, "-c", code], env=env)
    assert res.returncode == 0 and res.stdout.split()[-1] == "False", res.stderr


def test_figures():
    assert figure(0.5323640163676424) == "0.5324" and figure(None) == "none"
