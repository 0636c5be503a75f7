"""Fault injection for ``fgcmr train`` under ``launchers/torchrun.sh`` on 2 gloo ranks
(issue 11, defects 2, 3, 7, 8, 9).

One run of 24 steps is interrupted four ways and continued each time with ``--resume=auto``: Ctrl-C
(SIGINT to the process group), ``kill -9`` of torchrun alone, ``kill -9`` of every process (torchrun puts
each rank in a session of its own) while a checkpoint is being written, ``kill -9`` of one rank; with
``latest`` deleted, the newest checkpoint truncated and, later, a byte flipped inside one (same size) on
the way. The finished run must count exactly what an uninterrupted one does.
Waits follow log lines and files; timeouts are hang guards only.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from fgcmr.train import checkpoint
from fgcmr.train.tags import latest_tag
from kills import torchrun_and_ranks
from test_train import scalars, train_args

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
STEPS = 24
GUARD = 600  # s: a hang guard, never the expected duration


def start(args: list[str], log: Path) -> subprocess.Popen:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(
        PYTHON=sys.executable, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1"
    )
    return subprocess.Popen(
        [str(REPO / "launchers/torchrun.sh"), "-n", "2", "train", *args],
        cwd=REPO,
        env=env,
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait_until(pred, proc: subprocess.Popen, log: Path, what: str) -> None:
    end = time.monotonic() + GUARD
    while not pred():
        assert proc.poll() is None, f"launcher exited {proc.returncode} before {what}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < end, f"{what} not reached:\n{log.read_text()[-3000:]}"
        time.sleep(0.02)


def ranks_of(proc: subprocess.Popen) -> tuple[psutil.Process, list[psutil.Process]]:
    """(torchrun, its two ranks) under the launcher script, once both have started."""
    end = time.monotonic() + GUARD
    while True:
        torchrun, ranks = torchrun_and_ranks(proc.pid)
        if torchrun is not None and len(ranks) == 2:
            return torchrun, ranks
        assert proc.poll() is None and time.monotonic() < end, f"no torchrun with two ranks (launcher: {proc.poll()})"
        time.sleep(0.1)


def newest_step(run: Path) -> int:
    tag = latest_tag(run / "checkpoints")
    return int(tag.removeprefix("step_")) if tag else 0


def test_interrupted_every_way_then_resumed_counts_like_one_run(synthetic_dataset: Path, tmp_path: Path):
    run = tmp_path / "run"
    args = train_args(
        synthetic_dataset, run, "--loss.name=pairwise", f"--max_steps={STEPS}", "--checkpoint_every=3", "--keep_last=3"
    )
    resume = [*args, "--resume=auto"]

    # 1. Ctrl-C: every process of the group gets SIGINT; the ranks checkpoint, the launcher exits 75 (not torchrun's 1).
    log = tmp_path / "1-sigint.log"
    proc = start(args, log)
    wait_until(lambda: f"step 4/{STEPS}" in log.read_text(), proc, log, "step 4")  # a tag at 3 and one at the stop
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(GUARD) == 75, log.read_text()[-3000:]
    text = log.read_text()
    assert "continue with the same command and --resume=auto" in text and "KeyboardInterrupt" not in text
    stopped = newest_step(run)
    assert 4 <= stopped < STEPS and checkpoint.problem(run / "checkpoints" / checkpoint.tag_for(stopped)) is None

    # 2. Training into it again without --resume is refused, before any start-up (defect 2).
    done = subprocess.run(
        [sys.executable, "-m", "fgcmr.cli", "train", *args], cwd=REPO, capture_output=True, text=True, timeout=GUARD
    )
    assert done.returncode == 2 and "already holds checkpoints" in done.stderr and "--resume=auto" in done.stderr

    # 3. No `latest`, the newest tag truncated (defects 3, 9): resume takes the newest intact one, saying so;
    #    then kill -9 of torchrun alone: the orphaned ranks stop (checkpointing) instead of running on (defect 7).
    tags = checkpoint.complete_tags(run / "checkpoints")
    (run / "checkpoints" / "latest").unlink()
    weights = tags[-1] / "mp_rank_00_model_states.pt"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    intact = int(tags[-2].name.removeprefix("step_"))
    log = tmp_path / "3-kill-torchrun.log"
    proc = start(resume, log)
    wait_until(lambda: f"step {intact + 1}/{STEPS}" in log.read_text(), proc, log, f"step {intact + 1}")
    text = log.read_text()
    assert f"not resuming from checkpoint file {weights} is damaged" in text
    assert f"names nothing (missing); resuming from the newest complete tag {tags[-2].name}" in text
    assert f"resumed from {tags[-2]} at step {intact}" in text
    torchrun, ranks = ranks_of(proc)
    torchrun.kill()
    gone, alive = psutil.wait_procs(ranks, timeout=GUARD)
    assert not alive, "ranks kept running after their launcher was killed"
    proc.wait(GUARD)
    assert "the launcher (pid" in log.read_text()

    # 4. kill -9 of the whole process group while a checkpoint is being written (defect 8).
    log = tmp_path / "4-kill-group-in-save.log"
    before = newest_step(run)
    proc = start(resume, log)
    ckpt = run / "checkpoints"

    def saving() -> bool:
        return any(
            t.name > checkpoint.tag_for(before) and not (t / checkpoint.COMPLETE).exists()
            for t in checkpoint.step_tags(ckpt)
        )

    torchrun, ranks = ranks_of(proc)  # torchrun starts each rank in a session of its own: kill them all
    wait_until(saving, proc, log, "a checkpoint being saved")
    for p in (*ranks, torchrun):
        p.kill()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(GUARD)
    assert "saved (step" not in log.read_text().split("resumed from")[-1]
    for tag in checkpoint.step_tags(ckpt):
        assert checkpoint.problem(tag) is None or tag.name > latest_tag(ckpt), tag  # only the interrupted one
    assert (ckpt / "latest").read_text().strip() == latest_tag(ckpt)  # never names an incomplete tag

    # 5. kill -9 of one rank: torchrun ends the other; nothing newer than the last complete tag is trusted.
    log = tmp_path / "5-kill-rank.log"
    before = newest_step(run)
    proc = start(resume, log)
    wait_until(lambda: f"step {before + 1}/{STEPS}" in log.read_text(), proc, log, f"step {before + 1}")
    _, ranks = ranks_of(proc)
    ranks[1].kill()
    assert proc.wait(GUARD) not in (0, 75)

    # 6. A same-size byte flip in the newest tag (torch.load would read it silently): resume falls back to the
    #    previous complete tag, naming the file. Then finish: the same counts as an uninterrupted run, every step
    #    logged, every kept tag complete.
    tags = checkpoint.complete_tags(ckpt)
    assert len(tags) >= 2, tags
    flipped = tags[-1] / "mp_rank_00_model_states.pt"
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x01
    flipped.write_bytes(bytes(data))
    log = tmp_path / "6-finish.log"
    proc = start(resume, log)
    assert proc.wait(GUARD) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert f"not resuming from checkpoint file {flipped} is damaged (same size, but not the sha256 written)" in text
    assert f"resumed from {tags[-2]} at step" in text
    summary = json.loads((run / "train_metrics.json").read_text())
    assert (summary["step"], summary["samples_seen"], summary["world_size"]) == (STEPS, STEPS * 2 * 16, 2)
    assert {s for s, _ in scalars(run, "train/loss")} == set(range(1, STEPS + 1))
    stamp = json.loads((run / "fgcmr-stage.json").read_text())
    assert stamp["complete"] and stamp["step"] == STEPS
    assert (ckpt / "latest").read_text().strip() == checkpoint.tag_for(STEPS)
    assert all(checkpoint.problem(t) is None for t in checkpoint.step_tags(ckpt))
    assert not list(run.glob(".*.tmp")) and not list(ckpt.glob("*/.*.tmp"))
