"""The one-command pipeline: path wiring (fast, in-process) and one short 2-process run end to end."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import yaml

from fgcmr.config import ConfigError
from fgcmr.label.train import earliest_stop
from fgcmr.pipeline import plan, resolve_experiment, stage_configs
from waits import run_following

REPO = Path(__file__).resolve().parents[1]

TINY = {
    "name": "tiny",
    "shard": {
        "source": "synthetic",
        "items": 120,
        "seed": 0,
        "image_size": 32,
        "captions": 2,
        "data": {"max_items_per_shard": 30},
    },
    "label": {
        "vocab_size": 400,
        "model": {
            "hidden_size": 32,
            "num_layers": 1,
            "num_heads": 2,
            "intermediate_size": 64,
            "max_length": 24,
            "dim": 32,
        },
        "batch_size": 16,
        "max_steps": 6,
        "eval_every": 3,
        "max_eval_texts": 100,
    },
    "infer": {"batch_size": 64},
    "train": {
        "model": "tiny",
        "model_overrides": {"image": {"image_size": 32}},
        "loss": {"name": "weighted_pairwise"},
        "data": {"micro_batch": 16, "workers": 0, "augment": False},
        "max_steps": 4,
        "checkpoint_every": 2,
    },
    "eval": {"batch_size": 64},
}


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_paths_are_wired_and_data_root_resolves(tmp_path, monkeypatch):
    exp = {
        "name": "x",
        "data_root": "/nowhere",
        "shard": {"source": "wikipedia", "root": "${data_root}/wiki"},
        "label": {},
        "train": {},
    }
    cfg = _write(tmp_path / "x.yaml", exp)
    monkeypatch.delenv("FGCMR_DATA", raising=False)
    resolved, layout = resolve_experiment(cfg, str(tmp_path / "out"), {"train.seed": 3})
    assert resolved["shard"]["root"] == "/nowhere/wiki"
    assert (
        resolved["train"]["shards"] == resolved["label"]["shards"] == resolved["infer"]["shards"] == str(layout.shards)
    )
    assert resolved["train"]["labels"] == resolved["infer"]["name"] == "labeler"
    assert resolved["train"]["seed"] == 3 and resolved["eval"]["run"] == str(tmp_path / "out" / "run")
    assert layout.data_dir == tmp_path / "out" / "data"
    monkeypatch.setenv("FGCMR_DATA", str(tmp_path / "env"))  # the environment wins over the file
    resolved, _ = resolve_experiment(cfg, str(tmp_path / "out"), {"data_dir": str(tmp_path / "shared")})
    assert resolved["shard"]["root"] == str(tmp_path / "env" / "wiki")
    assert resolved["train"]["shards"] == str(tmp_path / "shared" / "shards")
    with pytest.raises(ConfigError, match="unknown top-level key 'trian'"):
        resolve_experiment(_write(tmp_path / "bad.yaml", {"trian": {}}), None, None)


def test_variant_merges_over_its_base(tmp_path):
    _write(
        tmp_path / "base.yaml",
        {"name": "b", "train": {"loss": {"name": "weighted_pairwise", "alpha": 1.0}, "epochs": 3}},
    )
    variant = _write(tmp_path / "v.yaml", {"base": "base.yaml", "name": "v", "train": {"loss": {"alpha": 0.0}}})
    resolved, layout = resolve_experiment(variant, None, None)
    assert resolved["name"] == "v" and layout.out.name == "v"
    assert resolved["train"]["loss"] == {"name": "weighted_pairwise", "alpha": 0.0} and resolved["train"]["epochs"] == 3


def test_experiment_configs_resolve():
    for path in sorted((REPO / "configs" / "experiments").glob("*.yaml")):
        resolved, _ = resolve_experiment(path, "/tmp/unused", None)
        assert resolved["train"]["shards"], path
        configs = stage_configs(resolved)
        assert set(configs) >= {"shard", "train", "export", "eval"}, path  # every stage's builds
        if "label" in configs:  # the labeler's early stopping can end it before its cap (issue 16)
            assert earliest_stop(configs["label"]) < configs["label"].max_steps, path


HEAVY = ("torch", "transformers", "timm", "torchvision", "deepspeed")
LIGHT_DRIVER = """
import contextlib, io, json, sys
from pathlib import Path
from fgcmr import cli
from fgcmr.pipeline import plan, resolve_experiment, stage_configs
from fgcmr.slurm.submit import submit_pipeline

rendered = {}
for path in sorted(Path("configs/experiments").glob("*.yaml")):
    out = str(Path(sys.argv[1]) / path.stem)
    exp, layout = resolve_experiment(path, out, None)
    plan(exp, layout, stage_configs(exp))
    with contextlib.redirect_stdout(io.StringIO()) as text:
        submit_pipeline(str(path), dry_run=True, out=out)
    rendered[path.stem] = text.getvalue().count("#SBATCH --job-name")
sys.argv = ["fgcmr", "pipeline", "--config=configs/experiments/synthetic.yaml", "--train.data.micro_batch=abc"]
try:
    cli.main()
except SystemExit as e:
    code = e.code
print(json.dumps({"rendered": rendered, "code": code, "heavy": sorted(m for m in sys.modules if m in HEAVY)}))
"""


def test_pipeline_and_submit_checks_import_no_torch(tmp_path):
    """Every shipped experiment's stage configs, done checks and Slurm scripts, and a usage error, without the
    training stack: the driver then starts its first stage in well under a second, not ~10 CPU-s."""
    script = f"HEAVY = {HEAVY!r}\n{LIGHT_DRIVER}"
    res = run_following([sys.executable, "-c", script, str(tmp_path)], cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    found = json.loads(res.stdout.splitlines()[-1])
    assert found["heavy"] == [], found["heavy"]
    experiments = sorted(p.stem for p in (REPO / "configs" / "experiments").glob("*.yaml"))
    assert sorted(found["rendered"]) == experiments and all(found["rendered"].values()), found["rendered"]
    assert found["code"] == 2 and res.stderr.strip().splitlines() == [
        "fgcmr: config error: train.data.micro_batch must be an integer, got 'abc'"
    ]


REPRODUCED = (  # what a second run of the same experiment must give byte for byte (the rest holds paths or times)
    "data/shards/manifest.json",
    "data/shards/*.tar",
    "data/labeler/tokenizer/tokenizer.json",
    "data/labeler/encoder/model.safetensors",
    "data/labeler/head.safetensors",
    "data/shards/labels/labeler/*.npz",
    "run/tokenizer/tokenizer.json",
    "run/checkpoints/step_*/mp_rank_*_model_states.pt",
    "run/checkpoints/step_*/rng_rank*.pt",  # every RNG seeded (Python's drives timm's augmentation)
    "run/checkpoints/step_*/complete.json",
    "run/eval/metrics.json",  # with the exported tensors' sha256
)


def reproduced(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for pattern in REPRODUCED for p in sorted(out.glob(pattern))}


def pipeline_cmd(cfg: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "fgcmr.cli", "pipeline", f"--config={cfg}", "--nproc=2", f"--out={out}"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> dict:
    """The tiny experiment run once by ``fgcmr pipeline`` on 2 ranks, with the bytes of ``REPRODUCED`` read before
    any test changes the run. No DeepSpeed op is compiled on the way (issue 11: a first start JIT-built one)."""
    tmp = tmp_path_factory.mktemp("tiny")
    cfg, out, ops = _write(tmp / "tiny.yaml", TINY), tmp / "out", tmp / "torch_extensions"
    done = run_following(pipeline_cmd(cfg, out), cwd=REPO, env={**os.environ, "TORCH_EXTENSIONS_DIR": str(ops)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert not ops.exists(), list(ops.iterdir())
    return {"cfg": cfg, "out": out, "done": done, "files": reproduced(out)}


@pytest.mark.slow
def test_two_process_pipeline_runs_then_reruns_only_what_changed(tiny_run, tmp_path, monkeypatch, capsys):
    cfg, out, done = tiny_run["cfg"], tiny_run["out"], tiny_run["done"]
    cmd = pipeline_cmd(cfg, out)
    metrics = json.loads((out / "run" / "eval" / "metrics.json").read_text())
    for key in (
        "map_i2t",
        "map_t2i",
        "map_avg",
        "r1_i2t",
        "r5_i2t",
        "r10_i2t",
        "r1_t2i",
        "r5_t2i",
        "r10_t2i",
        "chance_map",
    ):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["images"] == 24 and metrics["texts"] == 48  # the synthetic 80/20 split, 2 captions each
    assert metrics["eval"]["world_size"] == 2
    assert (out / "run" / "eval" / "report.png").stat().st_size > 10_000
    assert "MAP@all" in done.stdout and "tensorboard --logdir" in done.stdout
    stages = json.loads((out / "pipeline.json").read_text())["stages"]
    assert all(s["status"] == "ran" for s in stages.values()) and list(stages) == [
        "shard",
        "label",
        "infer",
        "train",
        "export",
        "eval",
    ]

    # One pipeline launch per kind of rerun; the refusals run in this process (nothing to launch).
    (out / "run" / "eval" / "report.png").unlink()  # as if killed between metrics.json and report.png
    exp, layout = resolve_experiment(cfg, str(out), None)
    checks = {stage.name: c for stage, c in plan(exp, layout, stage_configs(exp))}
    assert [name for name, c in checks.items() if not c.done] == ["eval"]
    assert checks["eval"].reason == f"{out / 'run' / 'eval'} is incomplete"

    # Defect 1: a changed option never shows the old results as new; a bad one fails before any stage ran.
    experiment = (out / "experiment.yaml").read_text()
    code, stdout, stderr = _cli(monkeypatch, capsys, [*cmd[3:], "--train.optim.lr=0.01"])
    assert code == 2 and "MAP@all" not in stdout
    assert "train: config changed (optim.lr 0.001→0.01) for the output in" in stderr and "--force" in stderr
    assert (out / "experiment.yaml").read_text() == experiment  # nothing touched
    code, _, stderr = _cli(monkeypatch, capsys, [*cmd[3:], "--train.data.micro_batch=abc"])
    assert code == 2 and stderr.strip().splitlines() == [
        "fgcmr: config error: train.data.micro_batch must be an integer, got 'abc'"
    ]

    evals = run_following([*cmd, "--eval.report_queries=1"], cwd=REPO)  # eval only, incomplete and changed
    assert evals.returncode == 0, evals.stderr[-3000:]
    stages = json.loads((out / "pipeline.json").read_text())["stages"]
    assert [s for s, v in stages.items() if v["status"] == "ran"] == ["eval"]
    assert "eval: config changed (report_queries 3→1), redoing" in evals.stderr
    assert json.loads((out / "run" / "eval" / "metrics.json").read_text())["map_avg"] == pytest.approx(
        metrics["map_avg"]
    )
    assert (out / "run" / "eval" / "report.png").is_file()
    forced = run_following([*cmd, "--train.optim.lr=0.01", "--force"], cwd=REPO)
    assert forced.returncode == 0, forced.stderr[-3000:]
    stages = json.loads((out / "pipeline.json").read_text())["stages"]
    assert [s for s, v in stages.items() if v["status"] == "ran"] == ["train", "export", "eval"]
    new = json.loads((out / "run" / "eval" / "metrics.json").read_text())
    assert new["model"]["weights_sha256"] != metrics["model"]["weights_sha256"]
    assert f"{new['map_avg']:.4f}" in forced.stdout

    # Defect 11: the README's eval command under torchrun (--run=… is torchrun's --run-path), here on one rank:
    # one process sees the same samples in the same pairing as the pipeline's two.
    readme = run_following(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=1",
            "-m",
            "fgcmr.cli",
            "eval",
            f"--run_dir={out / 'run'}",
            f"--out={tmp_path / 'readme-eval'}",
            "--report=false",
        ],
        cwd=REPO,
    )
    assert readme.returncode == 0, readme.stderr[-3000:]
    single = json.loads((tmp_path / "readme-eval" / "metrics.json").read_text())
    assert single["eval"]["world_size"] == 1
    keys = ("map_i2t", "map_t2i", "map_avg", "r1_i2t", "r10_t2i", "medr_i2t")
    assert {k: single[k] for k in keys} == pytest.approx({k: new[k] for k in keys}, abs=1e-5)


@pytest.mark.slow
def test_a_second_run_killed_in_export_and_eval_gives_the_same_bytes(tiny_run, tmp_path):
    """Issue 11: the job SIGKILLed while export writes its files, then while eval has written metrics.json but not
    report.png; each rerun redoes what the kill left unfinished, nothing more, and the finished run equals the
    uninterrupted one byte for byte (metrics.json, shards, both tokenizers, the labeler, the sidecars)."""
    from kills import kill_when_paused, paused_env, start

    out = (tmp_path / "out").resolve()
    cmd, marker = pipeline_cmd(tiny_run["cfg"], out), tmp_path / "paused.json"
    exp, layout = resolve_experiment(tiny_run["cfg"], str(out), None)

    def not_done() -> dict[str, str]:
        return {stage.name: c.reason for stage, c in plan(exp, layout, stage_configs(exp)) if not c.done}

    # 1. Killed in export: weights and tokenizer written into its hidden folder, model_config.json not yet.
    log = tmp_path / "1-export.log"
    env = paused_env(f"{layout.run}/.export.*/model_config.json", marker)
    kill_when_paused(start(cmd, log, env, REPO), marker, [log, out])
    assert not layout.export.exists() and list(layout.run.glob(".export.*/model.safetensors"))
    assert list(not_done()) == ["export", "eval"]

    # 2. Killed in eval between metrics.json and report.png (rank 0 paused; torchrun and both ranks killed).
    log = tmp_path / "2-eval.log"
    env = paused_env(f"{layout.eval}/report.png", marker)
    kill_when_paused(start(cmd, log, env, REPO), marker, [log, out])
    assert (layout.eval / "metrics.json").is_file() and list(layout.eval.glob(".report.png.*.tmp"))
    assert not_done() == {"eval": f"no finished evaluation in {layout.eval}"}
    assert [p.name for p in layout.run.glob(".export.*")] == [os.readlink(layout.export)]  # the killed one's: gone

    # 3. The rerun does eval only; the finished run is the uninterrupted one's, byte for byte.
    final = run_following(cmd, cwd=REPO)
    assert final.returncode == 0, final.stderr[-3000:]
    stages = json.loads((out / "pipeline.json").read_text())["stages"]
    assert [s for s, v in stages.items() if v["status"] == "ran"] == ["eval"]
    assert not not_done() and not list(out.rglob(".*.tmp"))
    got, want = reproduced(out), tiny_run["files"]
    assert sorted(got) == sorted(want) and len(want) > 10
    assert [name for name in want if got[name] != want[name]] == []


def _cli(monkeypatch, capsys, args: list[str]) -> tuple[int, str, str]:
    """``fgcmr <args>`` in this process: (exit code, stdout, stderr)."""
    from fgcmr import cli

    monkeypatch.setattr(sys, "argv", ["fgcmr", *args])
    monkeypatch.setattr("fgcmr.progress.setup_logging", lambda rank=0: None)  # keep pytest's log handlers
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    captured = capsys.readouterr()
    return exit_.value.code, captured.out, captured.err
