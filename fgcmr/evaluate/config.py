"""``fgcmr eval``'s config and ``done`` check, torch-free: the check reads only stamps and hashes files."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from fgcmr.config import Validated, read_yaml
from fgcmr.run import Check, Fingerprint, check_stamp, file_hash, fingerprint


@dataclasses.dataclass
class EvalConfig(Validated):
    run: str  # run dir of `fgcmr train` (holds export/ and config.yaml)
    shards: str | None = None  # dataset dir; default: the run's train.shards
    export: str | None = None  # default: <run>/export
    out: str | None = None  # default: <run>/eval
    split: str = "test"  # the split whose metrics are metrics.json's top level
    extra_splits: list[str] = dataclasses.field(default_factory=list)  # also evaluated, e.g. [val]
    batch_size: int = 64  # images per forward (texts: all their captions)
    embeddings: str | None = None  # an `fgcmr embed` output of this export and dataset: reused, not recomputed
    baselines: bool = False  # CCA and semantic matching on img.npy features (or the frozen pretrained tower) and texts
    baseline_train_split: str = "train"  # the split the baselines are fitted on
    baseline_hellinger: bool = False  # square-root the image features first (histograms such as SIFT BoW)
    baseline_cca_dim: int = 10  # CCA components of the baseline
    report: bool = True  # write report.png (queries and their top results)
    report_queries: int = 3  # text queries shown in report.png
    tensorboard: bool = True  # write the metrics as TensorBoard scalars

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ValueError("batch_size must be ≥ 1")
        if self.embeddings and self.baselines:
            raise ValueError(
                "baselines need the raw img.npy/txt.npy features, which --embeddings does not hold; drop one"
            )


def eval_paths(cfg: EvalConfig) -> tuple[Path, Path, Path]:
    run_dir = Path(cfg.run)
    export_dir = Path(cfg.export) if cfg.export else run_dir / "export"
    return run_dir, export_dir, Path(cfg.out) if cfg.out else run_dir / "eval"


def eval_fingerprint(cfg: EvalConfig) -> Fingerprint:
    """This config, the exported weights and the dataset's manifest."""
    run_dir, export_dir, _ = eval_paths(cfg)
    has_config = (run_dir / "config.yaml").is_file()
    shards = Path(cfg.shards) if cfg.shards else Path(run_shards(run_dir)) if has_config else None
    inputs = {
        "model": file_hash(export_dir / "model.safetensors"),
        "manifest": file_hash(shards / "manifest.json") if shards else None,
    }
    return fingerprint("eval", cfg, inputs, ("out",))


def done(cfg: EvalConfig) -> Check:
    """Done when metrics.json (and report.png when asked) were written for this model, data and config."""
    out = eval_paths(cfg)[2]
    check = check_stamp(out, eval_fingerprint(cfg), "evaluation")
    if check.done and not all((out / f).is_file() for f in ["metrics.json", *(["report.png"] if cfg.report else [])]):
        return Check(False, f"{out} is incomplete", exists=True)
    return check


def run_shards(run_dir: Path) -> str:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a training run (no config.yaml); pass --shards=<dataset dir>")
    shards = (read_yaml(path).get("train") or {}).get("shards")
    if not shards:
        raise FileNotFoundError(f"{path} names no train.shards; pass --shards=<dataset dir>")
    return shards
