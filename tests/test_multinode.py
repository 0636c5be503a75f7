"""Across nodes on one machine: two "nodes" of ranks that must find each other over TCP, split the data by
global rank, write each shared output once, get stopped, resume — each checked against a one-node run.

A node here is one launcher group on 127.0.0.1: the README's torchrun multi-node form, exactly as
written (``NNODES=2 NODE_RANK=<i> MASTER_ADDR=<node0> launchers/torchrun.sh -n R <command>``), or
``launchers/deepspeed.sh`` with a hostfile (``HOSTFILE=… NODE_RANK=<i>``, no ssh). Each node's ranks
get their own ``--scratch``; every process records the files it writes (``tests/write_audit``), so
the tests see which rank wrote what. The whole chain on the real 2-node Slurm cluster, with a
preemption of the 2-node train job, is ``test_slurm_pipeline.py``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

from fgcmr.dataset import iter_samples, open_dataset
from fgcmr.launch import free_port
from fgcmr.io import read_json
from fgcmr.labels import labels_dir, read_sidecar, sidecar_path
from fgcmr.train.data import key_id

from test_distributed import _clean_env
from test_train import launch as launch_one_node
from test_train import logs as one_node_logs
from test_train import scalars, train_args

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
AUDIT = REPO / "tests" / "write_audit"
HANG = 600  # safety timeout of one launch (a hang guard, not the expected duration)
STEPS = 10


SCRATCH = Path(f"/tmp/fgcmr-scratch-{os.getpid()}")


@pytest.fixture(scope="module", autouse=True)
def _remove_scratch():
    yield
    shutil.rmtree(SCRATCH, ignore_errors=True)


class Nodes:
    """``nodes`` launcher groups on this machine, one log, scratch dir and agent process per node."""

    def __init__(
        self,
        tmp: Path,
        name: str,
        launcher: str,
        nproc: int,
        command: list[str],
        nodes: int = 2,
        scratch: bool = True,
        env: dict[str, str] | None = None,
    ):
        self.dir = tmp / name
        self.audit = self.dir / "audit"
        self.audit.mkdir(parents=True)
        port = free_port()
        self.procs: list[subprocess.Popen] = []
        self.logs = [self.dir / f"node{i}.log" for i in range(nodes)]
        self.scratch = [SCRATCH / f"{name}-{port}-n{i}" for i in range(nodes)]  # short: Unix sockets live under TMPDIR
        for i in range(nodes):
            node_env = _clean_env() | {
                "PYTHON": sys.executable,
                "NNODES": str(nodes),
                "NODE_RANK": str(i),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "RDZV_ID": f"{name}-{port}",
                "OMP_NUM_THREADS": "1",
                "HF_HUB_OFFLINE": "1",
                "PYTHONWARNINGS": "ignore",
                "PYTHONPATH": os.pathsep.join([str(AUDIT), str(REPO)]),
                "FGCMR_WRITE_AUDIT": str(self.audit),
                **(env or {}),
            }
            args = [*command, f"--scratch={self.scratch[i]}"] if scratch else command
            with open(self.logs[i], "w") as log:
                self.procs.append(
                    subprocess.Popen(
                        [str(REPO / f"launchers/{launcher}.sh"), "-n", str(nproc), *args],
                        cwd=REPO,
                        env=node_env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )

    def text(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')}" for p in self.logs)

    def wait(self) -> list[int]:
        try:
            return [p.wait(timeout=HANG) for p in self.procs]
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"a node hung for {HANG} s:\n{self.text()[-6000:]}")

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)

    def wait_for_log(self, needle: str) -> None:
        deadline = time.monotonic() + HANG
        # any node's log: torchrun's c10d rendezvous numbers ranks by arrival, so global rank 0 (which logs
        # the steps) may sit on either node
        while not any(needle in log.read_text(errors="replace") for log in self.logs):
            if any(p.poll() is not None for p in self.procs) or time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"{needle!r} never logged:\n{self.text()[-6000:]}")
            time.sleep(0.2)

    def workers(self, node: int) -> list[int]:
        """PIDs of the ranks the node's launcher started (its agent's children)."""
        agent = self.procs[node].pid
        return [int(p) for p in Path(f"/proc/{agent}/task/{agent}/children").read_text().split()]

    def writes(self) -> list[dict]:
        return [json.loads(line) for f in self.audit.glob("*.jsonl") for line in f.read_text().splitlines()]


def writers(records: list[dict], root: Path) -> dict[str, set[str]]:
    """path under ``root`` (relative) → the ranks that wrote, renamed onto or removed it."""
    out: dict[str, set[str]] = defaultdict(set)
    for r in records:
        path = Path(r["path"])
        if path.is_relative_to(root):
            out[str(path.relative_to(root))].add(r["rank"])
    return out


def assert_written_once(records: list[dict], root: Path, owners: dict[str, str]) -> dict[str, set[str]]:
    """No file under ``root`` was written by two ranks (or by a launcher, rank "?"); ``owners`` names who wrote some."""
    by_path = writers(records, root)
    shared = {p: sorted(ranks) for p, ranks in by_path.items() if len(ranks) > 1 or "?" in ranks}
    assert not shared, f"files under {root} written by several ranks: {shared}"
    for path, rank in owners.items():
        assert by_path.get(path) == {rank}, f"{path}: written by {sorted(by_path.get(path, []))}, expected rank {rank}"
    return by_path


def assert_scratch_left_clean(nodes: Nodes) -> None:
    """Each node's ranks made their temp dirs in that node's scratch and removed them at exit."""
    for i, scratch in enumerate(nodes.scratch):
        assert scratch.is_dir(), f"node {i} never used its --scratch {scratch}"
        assert not [p for p in scratch.iterdir() if p.name.startswith("fgcmr-rank")], list(scratch.iterdir())
    tmp_writes = [r for r in nodes.writes() if any(Path(r["path"]).is_relative_to(s) for s in nodes.scratch)]
    for r in tmp_writes:  # a rank writes temp files only in its own node's scratch
        assert any(
            Path(r["path"]).is_relative_to(s) and f"fgcmr-rank{r['rank']}-" in r["path"] for s in nodes.scratch
        ), r


# ---- the data split -----------------------------------------------------------------------------------------

SPLIT_WORKER = """
import json, sys
import torch
from fgcmr.dataset import open_dataset
from fgcmr.distributed import init
from fgcmr.model import build_inputs
from fgcmr.train.config import DataConfig, load_model_config
from fgcmr.train.data import build_loader

d = init()
dataset, tokenizer, out = sys.argv[1:4]
cfg = load_model_config("tiny")
cfg.text.tokenizer_dir = tokenizer
inputs = build_inputs(cfg, train=False)
ds = open_dataset(dataset)


# the loader dies with this frame: its workers ignore SIGTERM, one alive at exit would hang
def read(resampled, batches, shuffle):
    data = DataConfig(micro_batch=8, workers=1, resampled=resampled, shuffle_buffer=shuffle)
    loader = build_loader(ds, inputs, data, d.world_size, batches_per_rank=batches, seed=0)
    return [b["image_id"].tolist() for b in loader]


seen = {"False": read(False, 10, 1), "True": read(True, 3, 10)}  # unshuffled: one pass over its shards comes first
json.dump({"rank": d.rank, "local_rank": d.local_rank, "world": d.world_size, "seen": seen},
          open(f"{out}/rank{d.rank}.json", "w"))
"""


@pytest.fixture(scope="module")
def tokenizer(synthetic_dataset, tmp_path_factory) -> Path:
    """One WordPiece tokenizer for every run here (training one per run is not reproducible across runs)."""
    from fgcmr.text import ensure_tokenizer

    texts = [t for s in open_dataset(synthetic_dataset).shards("train") for x in iter_samples(s) for t in x.texts]
    return ensure_tokenizer(texts, tmp_path_factory.mktemp("multinode-tok") / "tokenizer", 500, min_frequency=0)


def stream(dataset: Path, tokenizer: Path, rank: int, world: int, monkeypatch) -> list[list[int]]:
    """What global rank ``rank`` of ``world`` draws with resampled shards, computed in this one process."""
    from fgcmr.model import build_inputs
    from fgcmr.train.config import DataConfig, load_model_config
    from fgcmr.train.data import build_loader

    cfg = load_model_config("tiny")
    cfg.text.tokenizer_dir = str(tokenizer)
    with monkeypatch.context() as m:
        m.setenv("RANK", str(rank))
        m.setenv("WORLD_SIZE", str(world))
        data = DataConfig(micro_batch=8, workers=0, shuffle_buffer=10)
        loader = build_loader(open_dataset(dataset), build_inputs(cfg, train=False), data, world, 3, seed=0)
        return [b["image_id"].tolist() for b in loader]


def test_data_split_follows_the_global_rank_across_nodes(tokenizer, tmp_path, monkeypatch):
    """2 nodes × 2 ranks under launchers/deepspeed.sh with a hostfile: without resampling the ranks read
    disjoint shards that together are the split (each sample once); resampled, each rank draws the
    stream of its global rank (not of its local rank: ranks 0 and 2 differ). 8 train shards: without
    resampling the shard count must divide among ranks × workers (checked before training)."""
    from fgcmr.shard.job import ShardConfig, run

    synthetic_dataset = tmp_path / "synth8"
    cfg = ShardConfig(source="synthetic", out=str(synthetic_dataset), items=240, seed=0)
    cfg.data.max_items_per_shard = 24
    run(cfg)
    assert len(open_dataset(synthetic_dataset).shards("train")) == 8
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=2\nnode1 slots=2\n")
    out = tmp_path / "ranks"
    out.mkdir()
    script = tmp_path / "split_worker.py"
    script.write_text(SPLIT_WORKER)
    nodes = Nodes(
        tmp_path,
        "split",
        "deepspeed",
        2,
        [str(script), str(synthetic_dataset), str(tokenizer), str(out)],
        scratch=False,
        env={"HOSTFILE": str(hostfile)},
    )
    assert nodes.wait() == [0, 0], nodes.text()[-6000:]
    ranks = sorted((json.loads(p.read_text()) for p in out.glob("rank*.json")), key=lambda r: r["rank"])
    assert [(r["rank"], r["local_rank"], r["world"]) for r in ranks] == [(0, 0, 4), (1, 1, 4), (2, 0, 4), (3, 1, 4)]

    ds = open_dataset(synthetic_dataset)
    shard_of = {key_id(s.key): shard.name for shard in ds.shards("train") for s in iter_samples(shard)}
    read = [[i for b in r["seen"]["False"] for i in b] for r in ranks]
    shards = [{shard_of[i] for i in ids} for ids in read]
    for a in range(4):
        for b in range(a + 1, 4):
            assert not shards[a] & shards[b], f"ranks {a} and {b} both read {shards[a] & shards[b]}"
    assert set().union(*shards) == {s.name for s in ds.shards("train")}
    passes = [
        ids[: sum(1 for i in shard_of if shard_of[i] in mine)] for ids, mine in zip(read, shards)
    ]  # one pass each
    assert sorted(i for ids in passes for i in ids) == sorted(
        shard_of
    )  # together: every sample of the split exactly once

    resampled = [r["seen"]["True"] for r in ranks]
    assert all(len(s) == 3 for s in resampled)
    assert len({json.dumps(s) for s in resampled}) == 4, "two ranks drew the same stream"
    for rank in (2, 3):  # the second node's ranks draw what global ranks 2 and 3 draw on any topology
        assert resampled[rank] == stream(synthetic_dataset, tokenizer, rank, 4, monkeypatch)


# ---- training: ZeRO-2 and ZeRO-3 on 2 nodes vs 1 node, stopped and resumed -------------------------------------


def seed_run(run: Path, tokenizer: Path) -> None:
    """A run dir with the shared tokenizer already in place (the trainer then uses it as is)."""
    shutil.copytree(tokenizer, run / "tokenizer")


def one_node(tmp: Path, name: str, args: list[str]) -> str:
    logdir = tmp / f"{name}-logs"
    logdir.mkdir()
    codes = [p.wait(timeout=HANG) for p in launch_one_node(args, free_port(), logdir)]
    assert codes == [0, 0], one_node_logs(logdir)[-6000:]
    return one_node_logs(logdir)


def losses(run: Path) -> dict[int, float]:
    return dict(scalars(run, "train/loss"))


@pytest.fixture(scope="module")
def reference(synthetic_dataset, tokenizer, tmp_path_factory):
    """stage → the same global batch on one node: 1 node × 2 ranks, uninterrupted, same ZeRO stage (ZeRO-3
    builds the model under zero.Init, which draws its initial weights differently)."""
    cache: dict[str, Path] = {}

    def run_stage(stage: str) -> Path:
        if stage not in cache:
            tmp = tmp_path_factory.mktemp(f"multinode-ref-{stage}")
            run = tmp / "run"
            seed_run(run, tokenizer)
            one_node(tmp, "ref", stage_args(synthetic_dataset, run, stage))
            cache[stage] = run
        return cache[stage]

    return run_stage


def stage_args(dataset: Path, run: Path, stage: str) -> list[str]:
    """The training both the 2-node run and its one-node reference do, under one ZeRO stage."""
    return train_args(
        dataset, run, f"--deepspeed={stage}", "--loss.name=pairwise", f"--max_steps={STEPS}", "--checkpoint_every=100"
    )


@pytest.fixture(scope="module")
def trained(synthetic_dataset, tokenizer, tmp_path_factory) -> dict:
    """stage → the 2-node run: started, stopped by SIGTERM to the second node's rank, resumed; plus one node
    resuming from a copy of its checkpoint (the reference for the resumed part)."""
    cache: dict[str, dict] = {}

    def run_stage(stage: str) -> dict:
        if stage in cache:
            return cache[stage]
        tmp = tmp_path_factory.mktemp(f"multinode-{stage}")
        run = tmp / "run"
        seed_run(run, tokenizer)
        args = ["train", *stage_args(synthetic_dataset, run, stage)]
        first = Nodes(tmp, "first", "torchrun", 1, args)
        first.wait_for_log(f"step 3/{STEPS} loss")
        for pid in first.workers(1):  # only node 1 is told to stop: node 0 must stop at the same step
            os.kill(pid, signal.SIGTERM)
        codes = first.wait()
        text = first.text()
        assert all(c != 0 for c in codes) and "exiting 75 for requeue" in text, text[-6000:]
        stopped = int((run / "checkpoints" / "latest").read_text().strip().removeprefix("step_"))
        assert 3 <= stopped < STEPS
        assert f"checkpointing at step {stopped}" in text

        copy = tmp / "one-node-resume"
        seed_run(copy, tokenizer)
        tag = f"step_{stopped:08d}"
        shutil.copytree(run / "checkpoints" / tag, copy / "checkpoints" / tag)
        (copy / "checkpoints" / "latest").write_text(tag)

        second = Nodes(tmp, "second", "torchrun", 1, [*args, "--resume=auto"])
        assert second.wait() == [0, 0], second.text()[-6000:]
        one_node(
            tmp,
            "resumed-on-one-node",
            train_args(
                synthetic_dataset,
                copy,
                f"--deepspeed={stage}",
                "--loss.name=pairwise",
                f"--max_steps={STEPS}",
                "--checkpoint_every=100",
                "--resume=auto",
            ),
        )
        cache[stage] = {"run": run, "stopped": stopped, "first": first, "second": second, "copy": copy}
        return cache[stage]

    return run_stage


@pytest.mark.parametrize("stage", ["zero2_fp32", "zero3_fp32"])
def test_train_on_two_nodes_matches_one_node_through_a_stop_and_resume(stage, trained, reference):
    t = trained(stage)
    run, stopped = t["run"], t["stopped"]
    # The loss curve: the stopped run's steps equal one node's, the resumed steps equal one node resuming
    # from the same checkpoint (fp32; ZeRO-3's partitioned reductions sum in another order).
    ref_run = reference(stage)
    curve, ref, resumed = losses(run), losses(ref_run), losses(t["copy"])
    assert sorted(curve) == list(range(1, STEPS + 1)) and sorted(resumed) == list(range(stopped + 1, STEPS + 1))
    tol = 1e-6 if stage == "zero2_fp32" else 1e-4
    assert [curve[s] for s in range(1, stopped + 1)] == pytest.approx([ref[s] for s in range(1, stopped + 1)], rel=tol)
    assert [curve[s] for s in range(stopped + 1, STEPS + 1)] == pytest.approx(
        [resumed[s] for s in range(stopped + 1, STEPS + 1)], rel=tol
    )

    # Step and sample counts as uninterrupted; each step once; the second node's log shows its topology.
    metrics, uninterrupted = read_json(run / "train_metrics.json"), read_json(ref_run / "train_metrics.json")
    for key in ("step", "samples_seen", "world_size"):
        assert metrics[key] == uninterrupted[key], key
    assert (metrics["step"], metrics["samples_seen"]) == (STEPS, STEPS * 2 * 16)
    second = t["second"].text()
    assert f"at step {stopped}" in second and "world=2 local_world=1" in second
    assert [int(s) for s in re.findall(rf"step (\d+)/{STEPS} loss", second)] == list(range(stopped + 1, STEPS + 1))
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == [f"step_{stopped:08d}", f"step_{STEPS:08d}"]

    # Shared outputs: written once, each by the rank that owns it; temp files in each node's scratch.
    owners = {
        "config.yaml": "0",
        "train_metrics.json": "0",
        "checkpoints/latest": "0",
        f"checkpoints/step_{STEPS:08d}/rng_rank1.pt": "1",
        f"checkpoints/step_{STEPS:08d}/rng_rank0.pt": "0",
    }
    by_path = {}
    for nodes in (t["first"], t["second"]):
        by_path.update(assert_written_once(nodes.writes(), run, owners if nodes is t["second"] else {}))
        assert_scratch_left_clean(nodes)
    optim = sorted(p for p in by_path if p.startswith(f"checkpoints/step_{STEPS:08d}/") and "optim_states" in p)
    assert len(optim) == 2 and {by_path[p].pop() for p in optim} == {"0", "1"}  # each rank its own ZeRO partition
    assert any(p.startswith("tensorboard/") for p in by_path)


# ---- label infer and eval over all ranks of both nodes -----------------------------------------------------------

INFER_EVAL = """
import sys
from fgcmr import cli
shards, labeler, run, scratch = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].removeprefix("--scratch=")
cli.Label().infer(shards=shards, labeler=labeler, name="multinode-4", threads=1, scratch=scratch)
cli.eval(run=run, out=f"{run}/eval-4", report=False, scratch=scratch)
"""


def test_label_infer_and_eval_on_two_nodes_equal_one_rank(synthetic_dataset, trained, tmp_path, monkeypatch):
    """2 nodes × 2 ranks, one launch: `label infer` then `eval`; sidecars and metrics equal a 1-rank run's,
    every shard's sidecar written once, by the global rank that owns it."""
    from fgcmr.config import load_config
    from fgcmr.evaluate import job as eval_job
    from fgcmr.label import infer, train
    from fgcmr.train.export import ExportConfig
    from fgcmr.train.export import run as export

    labeler = tmp_path / "labeler"
    train.run(
        load_config(
            train.LabelTrainConfig,
            REPO / "configs/labelers/tiny.yaml",
            {
                "shards": str(synthetic_dataset),
                "out": str(labeler),
                "max_steps": 4,
                "eval_every": 4,
                "max_eval_texts": 60,
                "threads": 1,
            },
        )
    )
    run = trained("zero2_fp32")["run"]
    export(ExportConfig(run=str(run)))

    script = tmp_path / "infer_eval.py"
    script.write_text(INFER_EVAL)
    nodes = Nodes(tmp_path, "infer-eval", "torchrun", 2, [str(script), str(synthetic_dataset), str(labeler), str(run)])
    assert nodes.wait() == [0, 0], nodes.text()[-6000:]

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # one thread, as each rank had: the same kernels, the same floats
    threads = torch.get_num_threads()
    try:
        one = infer.run(
            infer.LabelInferConfig(shards=str(synthetic_dataset), labeler=str(labeler), name="multinode-1", threads=1)
        )
        single = eval_job.run(eval_job.EvalConfig(run=str(run), out=str(run / "eval-1"), report=False))
    finally:
        torch.set_num_threads(threads)

    ds = open_dataset(synthetic_dataset)
    four = read_json(labels_dir(synthetic_dataset, "multinode-4") / "manifest.json")
    assert four["world_size"] == 4 and four["counts"] == one["counts"]
    for shard in (s for split in ds.split_names for s in ds.shards(split)):
        a = read_sidecar(sidecar_path(synthetic_dataset, "multinode-1", shard.name))
        b = read_sidecar(
            sidecar_path(synthetic_dataset, "multinode-4", shard.name), [s.key for s in iter_samples(shard)]
        )
        for field in ("keys", "text_offsets", "text_emb", "desc_emb"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=f"{shard.name}: {field}")
    # Round-robin by global rank within each split: train shards 0-4 → ranks 0,1,2,3,0; test shards → 0,1.
    owners = {
        f"{s.name.split('.')[0]}.npz": str(i % 4) for split in ds.split_names for i, s in enumerate(ds.shards(split))
    }
    owners.update({"manifest.json": "0", "head.npz": "0", "config.yaml": "0"})
    records = nodes.writes()
    by_path = assert_written_once(records, labels_dir(synthetic_dataset, "multinode-4"), owners)
    assert len([p for p in by_path if p.endswith(".npz") and p != "head.npz"]) == len(owners) - 3

    metrics = read_json(run / "eval-4" / "metrics.json")
    assert metrics["eval"]["world_size"] == 4 and single["eval"]["world_size"] == 1
    assert metrics["images"] == 48 == single["images"] and metrics["texts"] == single["texts"]
    assert_same(metrics, single, skip={"eval"})
    assert_written_once(records, run / "eval-4", {"metrics.json": "0", "config.yaml": "0"})
    assert_scratch_left_clean(nodes)


def assert_same(a, b, skip: set[str] = frozenset(), where: str = "") -> None:
    """Equal JSON-like values, floats to 1e-6 (one rank sums the same products in another order)."""
    if isinstance(a, dict):
        assert set(a) == set(b), where
        for k in set(a) - skip:
            assert_same(a[k], b[k], where=f"{where}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, where=f"{where}[{i}]")
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-9), where
    else:
        assert a == b, where
