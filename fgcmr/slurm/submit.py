"""``fgcmr submit pipeline`` and ``fgcmr submit status``: submit a job chain and report on it.

The jobs read ``<out>/experiment.yaml``, the experiment resolved as ``fgcmr pipeline`` resolves it
(so editing the original after submitting changes nothing, and outputs land where a local run puts
them). ``<out>/slurm/`` holds one sbatch script per job, ``logs/`` and ``chain.json`` (job ids,
scripts, log paths), which ``submit status`` reads.
"""

from __future__ import annotations

import dataclasses
import datetime
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

from fgcmr.config import build, dump_yaml, to_dict
from fgcmr.io import atomic_write_json, atomic_write_text, read_json
from fgcmr.pipeline import resolve_experiment, stage_configs
from fgcmr.pipeline import plan as pipeline_plan
from fgcmr.run import Layout
from fgcmr.slurm.chain import Job, plan, render
from fgcmr.slurm.config import SlurmConfig

FAILED = {"FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def resolve(config_path: str, out: str | None, overrides: dict[str, Any]) -> tuple[dict, Layout, SlurmConfig]:
    """The experiment wired exactly as ``fgcmr pipeline`` wires it (same paths, same ``experiment.yaml``),
    with its ``slurm:`` section resolved in place."""
    exp, layout = resolve_experiment(config_path, out, overrides)
    cfg = build(SlurmConfig, exp.get("slurm") or {}, "slurm")
    exp["slurm"] = to_dict(cfg)
    return exp, layout, cfg


def submit_pipeline(
    config_path: str, dry_run: bool = False, overrides: dict[str, Any] | None = None, out: str | None = None
) -> list[dict]:
    """Render the chain's scripts and submit them with ``afterok`` dependencies (or only print them).

    Jobs whose stages are already done (the same checks as ``fgcmr pipeline``) are left out, so
    resubmitting after a failure runs only what is missing. Every stage's config is validated first,
    and a training run made with another config is refused, as ``fgcmr pipeline`` does.
    """
    exp, layout, cfg = resolve(config_path, out, {k: v for k, v in (overrides or {}).items() if v is not None})
    configs = stage_configs(exp)
    checks = {stage.name: c for stage, c in pipeline_plan(exp, layout, configs)}
    chain_dir = layout.out / "slurm"
    logs = Path(cfg.logs).absolute() if cfg.logs else chain_dir / "logs"
    jobs, done = [], []
    for job in plan(exp, cfg):
        (done if not jobs and all(checks[s].done for s in job.stages(exp)) else jobs).append(job)
    if done:
        print(f"already done, not submitted: {', '.join(j.name for j in done)}")
    if not jobs:
        print(f"nothing to submit: every stage of {exp['name']} is done under {layout.out}")
        return []
    scripts = {job.name: render(job, cfg, exp["name"], layout.experiment, Path.cwd(), logs) for job in jobs}
    if dry_run:
        for job, prev in zip(jobs, [None, *jobs]):
            print(f"# ---- {chain_dir / (job.name + '.sbatch')}   ({sbatch_command(job, prev and f'<{prev.name}>')})")
            print(scripts[job.name])
        return []
    if not shutil.which("sbatch"):
        raise FileNotFoundError(
            "sbatch not found: submit from a Slurm login node (or use --dry-run to see the scripts)"
        )
    atomic_write_text(layout.experiment, dump_yaml(exp))
    logs.mkdir(parents=True, exist_ok=True)
    submitted: list[dict] = []
    try:
        for job in jobs:
            script = chain_dir / f"{job.name}.sbatch"
            atomic_write_text(script, scripts[job.name])
            job_id = sbatch(script, submitted[-1]["job_id"] if submitted else None)
            submitted.append(
                {
                    "name": job.name,
                    "job_id": job_id,
                    "array": job.array,
                    "script": str(script),
                    "log": job.log_pattern(logs).replace("%A", job_id).replace("%j", job_id),
                }
            )
    except (OSError, subprocess.CalledProcessError) as e:
        if submitted:
            subprocess.run(["scancel", *(j["job_id"] for j in submitted)], check=False)
        detail = (getattr(e, "stderr", "") or str(e)).strip()
        raise RuntimeError(
            f"sbatch failed for job {job.name!r} ({detail}); cancelled the jobs already submitted"
        ) from None
    chain = {
        "name": exp["name"],
        "experiment": str(layout.experiment),
        "out": str(layout.out),
        "submitted": datetime.datetime.now().isoformat(timespec="seconds"),
        "jobs": submitted,
    }
    atomic_write_json(chain_dir / "chain.json", chain)
    for j in submitted:
        print(f"{j['name']:<6} job {j['job_id']:<8} log {j['log']}")
    inside = layout.data_dir == layout.out or layout.out in layout.data_dir.parents
    logdir = f"--logdir {layout.out}" if inside else f"--logdir_spec run:{layout.out},data:{layout.data_dir}"
    print(f"TensorBoard: tensorboard {logdir}")
    print(f"Status:      fgcmr submit status --out={shlex.quote(str(layout.out))}")
    return submitted


def sbatch_args(after: str | None) -> list[str]:
    """Dependents of a failed job are cancelled by Slurm (they never start) instead of pending forever."""
    return ["--parsable", "--kill-on-invalid-dep=yes", *([f"--dependency=afterok:{after}"] if after else [])]


def sbatch_command(job: Job, after: str | None) -> str:
    return " ".join(["sbatch", *sbatch_args(after), f"{job.name}.sbatch"])


def sbatch(script: Path, after: str | None) -> str:
    """Submit one script; returns its job id."""
    done = subprocess.run(["sbatch", *sbatch_args(after), str(script)], capture_output=True, text=True, check=True)
    return done.stdout.strip().split(";")[0]


@dataclasses.dataclass
class TaskState:
    job: str  # the chain's job name
    job_id: str  # e.g. 12 or 12_0 for an array task
    state: str
    exit_code: str
    reason: str
    log: str


def chain_status(out: str) -> list[TaskState]:
    """Print the state of every job (and array task) of the chain under ``out``; name failures and their logs."""
    chain_file = Path(out) / "slurm" / "chain.json"
    if not chain_file.is_file():
        raise FileNotFoundError(
            f"{chain_file} not found: submit with `fgcmr submit pipeline <experiment.yaml> --out={out}`"
        )
    chain = read_json(chain_file)
    states = [t for j in chain["jobs"] for t in query(j)]
    print(f"chain {chain['name']} submitted {chain['submitted']}")
    print(f"{'job':<6} {'id':<10} {'state':<11} {'exit':<6} {'reason':<26} log")
    for t in states:
        print(f"{t.job:<6} {t.job_id:<10} {t.state:<11} {t.exit_code:<6} {t.reason:<26} {t.log}")
    for t in states:
        if t.state in FAILED:
            print(f"FAILED: job {t.job} ({t.job_id}) ended {t.state} with exit code {t.exit_code}; log: {t.log}")
            for line in _tail(t.log, 3):
                print(f"    | {line}")
    never = [t.job for t in states if t.reason == "DependencyNeverSatisfied"]
    if never:
        print(f"never started (a job they depend on failed): {', '.join(dict.fromkeys(never))}")
    return states


def _tail(path: str, n: int) -> list[str]:
    try:
        return Path(path).read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return []


def query(job: dict) -> list[TaskState]:
    """The Slurm records of one chain job: ``scontrol`` while the controller holds it, else ``sacct``."""
    records = _scontrol(job["job_id"]) or _sacct(job["job_id"])
    if not records:
        return [TaskState(job["name"], job["job_id"], "UNKNOWN", "-", "not known to scontrol or sacct", job["log"])]
    out = []
    for r in sorted(records, key=lambda r: int(r["ArrayTaskId"]) if r.get("ArrayTaskId", "").isdigit() else -1):
        task = r.get("ArrayTaskId", "")
        job_id = f"{r.get('ArrayJobId', job['job_id'])}_{task}" if task else r.get("JobId", job["job_id"])
        log_path = job["log"].replace("%a", task or "*")
        log_shown = log_path if Path(log_path).exists() else "- (none yet)"
        out.append(
            TaskState(
                job["name"], job_id, r.get("JobState", "?"), r.get("ExitCode", "-"), r.get("Reason", ""), log_shown
            )
        )
    return out


def _scontrol(job_id: str) -> list[dict[str, str]]:
    done = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
    if done.returncode != 0:
        return []
    return [
        dict(tok.split("=", 1) for tok in line.split() if "=" in tok)
        for line in done.stdout.splitlines()
        if line.strip()
    ]


def _sacct(job_id: str) -> list[dict[str, str]]:
    done = subprocess.run(
        ["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "JobID,State,ExitCode,Reason"], capture_output=True, text=True
    )
    if done.returncode != 0:
        return []
    rows = []
    for line in done.stdout.splitlines():
        jid, state, code, reason = (line.split("|") + ["", "", "", ""])[:4]
        base, _, task = jid.partition("_")
        rows.append(
            {
                "JobId": jid,
                "ArrayJobId": base,
                "ArrayTaskId": task,
                "JobState": state.split()[0] if state else "?",
                "ExitCode": code,
                "Reason": reason,
            }
        )
    return rows
