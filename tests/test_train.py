"""Training end to end on 2 gloo processes: ZeRO 0/2/3, weighted loss with sidecars, SIGTERM, resume, export.

Launches are few and short (each costs ~10 s): one launch per check group, asserting several things each.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fgcmr.dataset import iter_samples, open_dataset
from fgcmr.launch import free_port, local_rank_envs
from fgcmr.labels import read_sidecar, sidecar_path, write_head, write_sidecar
from waits import run_following, wait_procs, wait_until

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
LABELER = "random-test-labels"


def write_random_sidecars(dataset_dir: Path, name: str = LABELER, dim: int = 16) -> None:
    """Sidecars in the ``fgcmr.labels`` format with random embeddings (the real labeler lands separately)."""
    ds = open_dataset(dataset_dir)
    rng = np.random.default_rng(0)
    for split in ds.split_names:
        for shard in ds.shards(split):
            samples = list(iter_samples(shard))
            counts = [len(s.texts) for s in samples]
            write_sidecar(
                sidecar_path(dataset_dir, name, shard.name),
                [s.key for s in samples],
                rng.standard_normal((sum(counts), dim)),
                np.concatenate([[0], np.cumsum(counts)]),
                rng.standard_normal((len(samples), dim)),
            )
    write_head(dataset_dir, name, rng.standard_normal(dim), 0.1)


def launch(args: list[str], port: int, log_dir: Path, nproc: int = 2) -> list[subprocess.Popen]:
    """Start ``fgcmr train`` on ``nproc`` local ranks (torchrun's variables, no launcher in between)."""
    procs = []
    for rank, rank_env in enumerate(local_rank_envs(nproc, port)):
        env = dict(os.environ, **rank_env, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
        log = open(log_dir / f"rank{rank}.log", "w")
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "fgcmr", "train", *args], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        )
    return procs


def wait(procs: list[subprocess.Popen], log_dir: Path) -> list[int]:
    """Exit codes, waiting as long as the ranks' logs or the run grow (``waits``: a hang guard only)."""
    return wait_procs(procs, [log_dir, *log_dir.parent.glob("run*")])


def logs(log_dir: Path) -> str:
    return "\n".join(p.read_text() for p in sorted(log_dir.glob("rank*.log")))


def train_args(dataset: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"--config={REPO / 'configs/train/tiny.yaml'}",
        f"--shards={dataset}",
        f"--out={out}",
        "--data.micro_batch=16",
        "--data.workers=1",
        "--log_every=1",
        "--hist_every=2",
        "--optim.warmup_steps=2",
        "--optim.lr=0.002",
        *extra,
    ]


def scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def assert_loss_went_down(run_dir: Path) -> None:
    losses = [v for _, v in scalars(run_dir, "train/loss")]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses


def embed_probe(model, inputs, dataset: Path) -> tuple[torch.Tensor, torch.Tensor]:
    samples = list(iter_samples(open_dataset(dataset).shards("test")[0]))[:8]
    with torch.no_grad():
        img = model.encode_image(torch.stack([inputs.image(s) for s in samples]))
        txt = model.encode_text(inputs.collate_texts([inputs.text(s, 0) for s in samples]))
    return img, txt


def _wait_for(pred, log_dir: Path, procs: list[subprocess.Popen]) -> None:
    wait_until(pred, procs, [log_dir])


def _adam_steps(tag_dir: Path) -> set[int]:
    """Adam's per-parameter step counters in every rank's ZeRO optimizer shard."""
    steps = set()
    for f in tag_dir.glob("*optim_states.pt"):
        state = torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        for group in state["base_optimizer_state"]["state"].values():
            steps.add(int(group["step"]))
    return steps


def test_zero2_weighted_sigterm_resume_export(synthetic_dataset: Path, tmp_path: Path):
    write_random_sidecars(synthetic_dataset)
    run = tmp_path / "run"
    args = train_args(
        synthetic_dataset,
        run,
        "--deepspeed=zero2_fp32",
        f"--labels={LABELER}",
        "--loss.name=weighted_pairwise",
        "--max_steps=12",
        "--checkpoint_every=4",
        "--keep_last=2",
    )
    first = tmp_path / "first"
    first.mkdir()
    procs = launch(args, free_port(), first)
    _wait_for(lambda: "step 5/12" in logs(first), first, procs)
    for p in procs:
        p.send_signal(signal.SIGTERM)
    assert wait(procs, first) == [75, 75], logs(first)
    stopped = int((run / "checkpoints" / "latest").read_text().strip().removeprefix("step_"))
    assert 5 <= stopped < 12
    assert (run / "config.yaml").is_file() and (run / "tokenizer" / "tokenizer.json").is_file()

    second = tmp_path / "second"
    second.mkdir()
    assert wait(launch([*args, "--resume=auto"], free_port(), second), second) == [0, 0], logs(second)
    assert f"at step {stopped}" in logs(second)
    from fgcmr.bench.startup import first_step

    said = first_step(logs(second))  # where the start-up went, as `fgcmr bench startup` reads it
    assert list(said["phases"]) == [
        "python + imports",
        "process group",
        "tokenizer",
        "model + DeepSpeed",
        "loader + resume",
        "first step",
    ]
    assert said["total_s"] == pytest.approx(sum(said["phases"].values()), abs=0.35)  # each rounded to 0.1
    tags = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert tags[-1] == "step_00000012" and len(tags) == 2  # keep_last
    assert _adam_steps(run / "checkpoints" / "step_00000012") == {12}  # optimizer state carried over the resume
    third = tmp_path / "third"
    third.mkdir()
    assert wait(launch([*args, "--resume=auto"], free_port(), third, nproc=1), third) == [
        2
    ]  # ZeRO-2 partitions: a usage error
    assert "written by 2 ranks under ZeRO stage 2" in logs(third) and "Resume it with 2 ranks" in logs(third)
    lr = dict(scalars(run, "train/lr"))
    from fgcmr.runtime.engine import warmup_cosine

    factor = warmup_cosine(12, 2, 0.0)
    assert [lr[s] for s in range(1, 13)] == pytest.approx(
        [0.002 * factor(s - 1) for s in range(1, 13)], rel=1e-5
    )  # scheduler resumed too
    steps = [s for s, _ in scalars(run, "train/loss")]
    assert steps == list(range(1, 13))
    for tag in (
        "train/mu_pos",
        "train/mu_neg",
        "train/var_pos",
        "train/var_neg",
        "train/grad_norm",
        "perf/samples_per_s",
        "perf/step_time_s",
        "perf/data_wait_frac",
    ):
        assert len(scalars(run, tag)) == 12, tag
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"histograms": 0})
    acc.Reload()
    assert {"similarity/positive", "similarity/negative", "weights/omega"} <= set(acc.Tags()["histograms"])
    omega = acc.Histograms("weights/omega")[-1].histogram_value
    assert 1.0 <= omega.min and omega.max <= 2.0

    # export (ZeRO-2 partitions of 2 ranks merged in one process) == the full module weights DeepSpeed kept
    from fgcmr.model import build_model, load_export
    from fgcmr.train.export import ExportConfig
    from fgcmr.train.export import run as export

    out = export(ExportConfig(run=str(run)))
    model, cfg, inputs = load_export(out)
    reference = build_model(cfg).eval()
    module = torch.load(
        run / "checkpoints" / "step_00000012" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False
    )["module"]
    reference.load_state_dict(module)
    for a, b in zip(embed_probe(model, inputs, synthetic_dataset), embed_probe(reference, inputs, synthetic_dataset)):
        torch.testing.assert_close(a, b)
    # and it loads in a fresh process that never imports DeepSpeed
    code = (
        f"import sys, torch; from fgcmr.model import load_export; m, c, i = load_export({str(out)!r}); "
        "print(round(m.encode_image(torch.zeros(1, 3, 64, 64)).norm().item(), 4), 'deepspeed' in sys.modules)"
    )
    res = run_following([sys.executable, "-c", code], cwd=REPO, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert res.stdout.split()[-2:] == ["1.0", "False"], res.stderr[-2000:]


def assert_log_reads_well(terminal: str, run: Path, validation: bool) -> None:
    """No library noise on the terminal; the run's own log in <run>/logs/, ending with the next command."""
    from fgcmr.progress import NOISE

    noise = [
        line for line in terminal.splitlines() if NOISE.search(line) or "compilers.C.base" in line or "it/s]" in line
    ]
    assert not noise, noise
    log = (run / "logs" / "train.log").read_text().splitlines()
    assert "started: fgcmr train" in log[0] and "[rank0]" in log[0]
    assert "train: done in" in log[-1] and log[-1].endswith(f"; next: fgcmr export --run={run}")
    said = "validation: every 6 steps on split 'test'" if validation else "validation: off"
    assert any(said in line for line in log), log
    assert not validation or any("step 6: validation on split 'test'" in line for line in log)


def test_zero0_and_zero3_loss_goes_down(synthetic_dataset: Path, tmp_path: Path):
    for stage, loss in (("zero0_fp32", "pairwise"), ("zero3_fp32", "clip")):
        run, logdir = tmp_path / stage, tmp_path / f"{stage}-logs"
        logdir.mkdir()
        validation = (
            ["--eval_every=6", "--eval_max_images=32"] if stage.startswith("zero3") else []
        )  # forwards on partitioned weights
        args = train_args(
            synthetic_dataset,
            run,
            f"--deepspeed={stage}",
            f"--loss.name={loss}",
            "--max_steps=12",
            "--checkpoint_every=100",
            *validation,
        )
        assert wait(launch(args, free_port(), logdir), logdir) == [0, 0], logs(logdir)
        assert_loss_went_down(run)
        assert_log_reads_well(logs(logdir), run, bool(validation))
    acc = EventAccumulator(str(tmp_path / "zero3_fp32" / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    val = acc.Scalars("val/map_avg")
    assert [e.step for e in val] == [6, 12]
    assert all(0.0 < e.value <= 1.0 for e in val)
    assert [e.step for e in acc.Scalars("val/chance_map")] == [6, 12]
    assert "val/r1_t2i" in json.loads((tmp_path / "zero3_fp32" / "train_metrics.json").read_text())
    from fgcmr.model import load_export
    from fgcmr.train.export import ExportConfig
    from fgcmr.train.export import run as export

    model, _, inputs = load_export(
        export(ExportConfig(run=str(tmp_path / "zero3_fp32")))
    )  # ZeRO-3 partitions consolidated
    img, txt = embed_probe(model, inputs, synthetic_dataset)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(len(img)))


def test_an_error_in_a_rank_ends_the_job(synthetic_dataset: Path, tmp_path: Path):
    """Defect 6a: a SidecarError raised in a DataLoader worker was printed, then the job hung for good (the
    workers ignore SIGTERM and the failing rank joined them forever); one process hung too."""
    write_random_sidecars(synthetic_dataset, "broken")
    for shard in open_dataset(synthetic_dataset).shards("train"):  # keys no sample has: fails at the first batch
        path = sidecar_path(synthetic_dataset, "broken", shard.name)
        sc = read_sidecar(path)
        write_sidecar(path, [f"x{k}" for k in sc.keys], sc.text_emb, sc.text_offsets, sc.desc_emb, sc.labeler)
    args = train_args(
        synthetic_dataset, tmp_path / "run", "--labels=broken", "--loss.name=weighted_pairwise", "--max_steps=4"
    )
    for nproc in (2, 1):
        logdir = tmp_path / f"logs{nproc}"
        logdir.mkdir()
        procs = launch(args, free_port(), logdir, nproc=nproc)
        wait_until(
            lambda logdir=logdir: "has no entry in its label sidecar" in logs(logdir),
            procs,
            [logdir],
            early_exit_ok=True,
        )
        codes = wait_procs(procs, [logdir], stall=300)  # no output for 5 minutes after the error: the old hang
        assert all(c != 0 for c in codes), (codes, logs(logdir))
        # the error itself, naming the sample and its shard (as a traceback under torchrun, one line from the CLI)
        assert re.search(r"sample synth\d+ of \S+/train-\d+\.tar has no entry in its label sidecar", logs(logdir))
