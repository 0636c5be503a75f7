"""fgcmr submit: rendering (no cluster needed), and a failing chain against a real Slurm cluster."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fgcmr.config import ConfigError
from fgcmr.slurm import SlurmConfig, chain_status, submit_pipeline
from fgcmr.slurm.chain import EXIT_REQUEUE, plan

from slurm_cluster import REPO, cancel_after, job_field, slurm, wait_state  # noqa: F401  (fixtures)

SLURM = {
    "nodes": 2,
    "gpus_per_node": 4,
    "cpus_per_task": 8,
    "partition": "gpu",
    "account": "proj42",
    "time": "01:00:00",
    "shard_tasks": 3,
    "signal_seconds": 240,
    "extra": ["--constraint=a100", "#SBATCH --exclusive"],
    "setup": ["module load cuda/12.4"],
    "train": {"time": "2-00:00:00"},
    "shard": {"partition": "cpu"},
}


def write_experiment(tmp_path: Path, **sections) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"name": "t", **sections}))
    return path


def scripts_from_dry_run(capsys, path: Path, out: Path, **overrides) -> dict[str, str]:
    assert submit_pipeline(str(path), dry_run=True, out=str(out), overrides=overrides) == []
    text = capsys.readouterr().out
    assert not (out / "slurm").exists(), "--dry-run must not write or submit anything"
    parts = text.split("# ---- ")[1:]
    return {Path(p.split()[0]).stem: p for p in parts}


def sbatch_lines(script: str) -> list[str]:
    return [line.split(None, 1)[1] for line in script.splitlines() if line.startswith("#SBATCH")]


def test_dry_run_renders_every_stage_from_the_slurm_section(tmp_path, capsys):
    path = write_experiment(
        tmp_path,
        shard={"source": "synthetic"},
        tokenizer={},
        label={},
        infer={},
        train={},
        export={},
        eval={},
        slurm=SLURM,
    )
    scripts = scripts_from_dry_run(capsys, path, tmp_path / "out", **{"slurm.nodes": 3})
    assert list(scripts) == ["shard", "merge", "label", "infer", "train", "eval"]
    shard, train, ev = sbatch_lines(scripts["shard"]), sbatch_lines(scripts["train"]), sbatch_lines(scripts["eval"])
    assert "--array=0-2" in shard and "--nodes=1" in shard and "--partition=cpu" in shard
    assert not any(o.startswith("--gpus") for o in shard)
    for opts in (train, ev):
        assert {
            "--nodes=3",
            "--ntasks-per-node=4",
            "--gpus-per-node=4",
            "--cpus-per-task=8",
            "--account=proj42",
            "--constraint=a100",
            "--exclusive",
            "--partition=gpu",
        } <= set(opts)
    assert {"--requeue", "--signal=B:USR1@240", "--time=2-00:00:00", "--open-mode=append"} <= set(train)
    assert "--time=01:00:00" in ev and "--requeue" not in ev
    assert f"(( rc == {EXIT_REQUEUE} ))" in scripts["train"] and "--resume=auto" in scripts["train"]
    assert "--dependency=afterok:<merge>" in scripts["label"]
    for name, script in scripts.items():
        assert "{{" not in script and "module load cuda/12.4" in script
        assert f"{sys.executable} -m fgcmr.cli" in script
        body = script.split("\n", 1)[1]
        first_command = next(i for i, line in enumerate(body.splitlines()) if line and not line.startswith("#"))
        assert all(not line.startswith("#SBATCH") for line in body.splitlines()[first_command:]), (
            f"{name}: #SBATCH after a command is ignored"
        )
        subprocess.run(["bash", "-n"], input=body, text=True, check=True)


def test_scratch_is_exported_to_every_job(tmp_path, capsys):
    path = write_experiment(
        tmp_path,
        shard={"source": "synthetic"},
        train={"loss": {"name": "pairwise"}},
        slurm={"scratch": "/local/$SLURM_JOB_ID"},
    )
    scripts = scripts_from_dry_run(capsys, path, tmp_path / "out")
    assert all('export FGCMR_SCRATCH="/local/$SLURM_JOB_ID"' in script for script in scripts.values())
    path = write_experiment(tmp_path, shard={"source": "synthetic"}, train={"loss": {"name": "pairwise"}})
    assert "FGCMR_SCRATCH=" not in "".join(scripts_from_dry_run(capsys, path, tmp_path / "out2").values())


def test_requeue_code_matches_the_trainer():
    from fgcmr.train.signals import EXIT_REQUEUE as trainer_code

    assert EXIT_REQUEUE == trainer_code


def test_chain_leaves_out_stages_the_experiment_lacks():
    jobs = plan({"shard": {}, "train": {}}, SlurmConfig())
    assert [j.name for j in jobs] == ["shard", "merge", "train"]
    label = plan({"label": {}}, SlurmConfig())[0]
    assert label.values["with_tokenizer"] == "false"


def test_bad_stage_option_fails_before_submitting(tmp_path):
    path = write_experiment(tmp_path, shard={"source": "wikipedia"}, train={}, eval={})
    with pytest.raises(ConfigError, match="shard: --root is required"):
        submit_pipeline(str(path), dry_run=True, out=str(tmp_path / "out"))
    path = write_experiment(tmp_path, shard={"source": "synthetic"}, train={}, eval={})
    with pytest.raises(ConfigError, match="train.data.micro_batch must be an integer"):
        submit_pipeline(str(path), dry_run=True, out=str(tmp_path / "out"), overrides={"train.data.micro_batch": "abc"})


def test_jobs_read_the_stage_table():
    from fgcmr.slurm.config import JOBS
    from fgcmr.stages import STAGES

    assert JOBS == ("shard", "merge", "label", "infer", "train", "eval")
    assert {f.name for f in dataclasses.fields(SlurmConfig)} >= set(JOBS)
    assert {s.slurm_job for s in STAGES} <= set(JOBS)


@pytest.mark.parametrize(
    "slurm_section, message",
    [
        ({"time": "soon"}, "not a Slurm time"),
        ({"train": {"nodez": 2}}, "slurm.train.nodez"),
        ({"signal_seconds": 1}, "signal_seconds"),
        ({"shard_tasks": 0}, "shard_tasks"),
    ],
)
def test_bad_slurm_section_fails_before_submitting(tmp_path, slurm_section, message):
    path = write_experiment(tmp_path, shard={}, slurm=slurm_section)
    with pytest.raises(ConfigError, match=message):
        submit_pipeline(str(path), dry_run=True, out=str(tmp_path / "out"))


@pytest.mark.slurm
def test_failed_job_stops_its_dependents_and_status_names_it(tmp_path, capsys, slurm, cancel_after):  # noqa: F811
    # A corpus folder that is not there: the config is valid (so it is submitted), the shard array fails at once.
    path = write_experiment(
        tmp_path,
        shard={"source": "folder", "root": str(tmp_path / "missing"), "out": str(tmp_path / "shards")},
        train={"shards": str(tmp_path / "shards"), "out": str(tmp_path / "run"), "loss": {"name": "pairwise"}},
        eval={"run": str(tmp_path / "run")},
        slurm={"shard_tasks": 2, "cpus_per_task": 1, "time": "00:05:00"},
    )
    out = tmp_path / "out"
    jobs = {j["name"]: j for j in submit_pipeline(str(path), out=str(out))}
    for j in jobs.values():
        cancel_after(j["job_id"])
    assert list(jobs) == ["shard", "merge", "train", "eval"]
    for name in ("merge", "train", "eval"):
        wait_state(jobs[name]["job_id"], {"CANCELLED"}, timeout=600)
        assert job_field(jobs[name]["job_id"], "Reason") == "DependencyNeverSatisfied"
        assert not Path(jobs[name]["log"]).exists(), f"{name} must never have started"
    capsys.readouterr()
    states = chain_status(str(out))
    text = capsys.readouterr().out
    failed = [t for t in states if t.state == "FAILED"]
    assert [t.job_id for t in failed] == [f"{jobs['shard']['job_id']}_{i}" for i in (0, 1)]
    for t in failed:
        assert t.exit_code == "2:0" and Path(t.log).is_file()
        assert f"FAILED: job shard ({t.job_id}) ended FAILED with exit code 2:0; log: {t.log}" in text
    assert "does not exist" in text
    assert "never started (a job they depend on failed): merge, train, eval" in text
    cli = subprocess.run(
        [sys.executable, "-m", "fgcmr.cli", "submit", "status", f"--out={out}"], capture_output=True, text=True
    )
    assert cli.returncode == 1 and "FAILED: job shard" in cli.stdout
