"""fgcmr's trainer vs open_clip's own trainer (``open_clip_train``): same model, same shards, same processes.

Both sides are the real training commands, launched with ``torchrun`` on the same WebDataset shards:
``fgcmr train`` (DeepSpeed engine) and ``open_clip_train.main`` (DDP + AdamW). The model is the same
on both: the timm image tower of a ``configs/models`` config (its ``model_kwargs`` registered as a timm
variant, since open_clip's ``TimmModel`` passes no extra arguments) and the same transformers text
encoder (a local dir with its config, random weights and the same WordPiece tokenizer: nothing is
downloaded), mean-pooled, with bias-free linear projections; the loss is CLIP's InfoNCE on both
(fgcmr ``--loss.name=clip``), fp32.

Throughput is measured the same way for both, from outside: the arrival time of each progress line
of rank 0, so samples/s = global batch × steps between the first line after ``warmup`` steps and the
last line, over the wall time between them (start-up, the first steps and the final checkpoint are
excluded; data loading, logging and every collective are included), and the median samples/s of the
windows between consecutive lines, which a burst of load from other processes moves less. Rounds
alternate the two sides.

Known differences, both inherent to the trainers: open_clip pads every text to the context length
(fgcmr pads to the longest text of the batch), and its training transform is a RandomResizedCrop
(fgcmr's tiny run uses timm's eval transform).

Run as a module, this file is the open_clip entry point of each rank: it registers the timm variant
and the model config, then calls ``open_clip_train.main.main``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fgcmr.config import Validated, dump_yaml, to_dict
from fgcmr.launch import launch_env, torchrun_command
from fgcmr.model import ModelConfig
from fgcmr.train.config import load_model_config

OPEN_CLIP_LINE = re.compile(r"Train Epoch: \d+ \[\s*(\d+)/")
FGCMR_LINE = re.compile(r"step (\d+)/\d+ loss")
TIMM_VARIANT = "timm_variant.json"


@dataclasses.dataclass
class BenchPeerConfig(Validated):
    peer: str = "open_clip"
    model: str = "tiny"  # configs/models/<name>.yaml (timm image tower + transformers text tower)
    shards: str | None = None  # dataset dir; default: synthetic shards made in a temporary dir
    items: int = 3000  # synthetic items when no shards are given
    nproc: int = 2
    micro_batch: int = 32
    steps: int = 60  # per run and side
    warmup: int = 10  # first steps of each run, not measured
    log_every: int = 5
    workers: int = 2  # data-loader workers per rank, both sides
    rounds: int = 1  # alternating fgcmr / open_clip runs
    json: bool = False

    def validate(self) -> None:
        if self.peer != "open_clip":
            raise ValueError(f"--peer={self.peer}: the only peer is open_clip")
        if min(self.nproc, self.micro_batch, self.rounds, self.log_every) < 1 or self.workers < 0:
            raise ValueError("nproc, micro_batch, rounds and log_every must be ≥ 1, workers ≥ 0")
        if self.steps < self.warmup + 2 * self.log_every:
            raise ValueError("steps must leave at least two progress lines after warmup (steps ≥ warmup + 2·log_every)")


# ----------------------------------------------------------------------------- the shared model


def timm_variant_name(model_cfg: ModelConfig) -> str:
    return f"fgcmr_{model_cfg.image.name}" if model_cfg.image.model_kwargs else model_cfg.image.name


def register_timm_variant(name: str, base: str, kwargs: dict[str, Any]) -> None:
    """Register ``name`` in timm as ``base`` built with ``kwargs`` (e.g. ``img_size``), for open_clip."""
    import timm
    from timm.models import register_model

    def entrypoint(pretrained: bool = False, **kw: Any):
        return timm.create_model(base, pretrained=pretrained, **{**kwargs, **kw})

    entrypoint.__name__ = entrypoint.__qualname__ = name
    if name not in timm.list_models(name):
        register_model(entrypoint)


def write_peer_model(model_cfg: ModelConfig, tokenizer_dir: Path, out_dir: Path) -> tuple[str, Path]:
    """The open_clip model config (JSON) and the local transformers dir of the text tower; returns
    (model name, config dir). The text encoder's config is fgcmr's, with the tokenizer's vocab and pad id."""
    from transformers import AutoConfig, AutoModel

    from fgcmr.text import load_tokenizer

    text, image = model_cfg.text, model_cfg.image
    if image.kind != "timm" or text.kind != "transformers" or text.pretrained_dir:
        raise ValueError(
            "the open_clip peer needs a timm image tower and a transformers text tower built from a config"
        )
    tok = load_tokenizer(tokenizer_dir)
    hf_dir = out_dir / "text_encoder"
    kwargs = {k: v for k, v in text.config.items() if k != "model_type"}
    kwargs.update(vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    # open_clip_train always loads the text tower "pretrained": give it a random initialisation to load
    AutoModel.from_config(
        AutoConfig.for_model(text.config["model_type"], **kwargs), add_pooling_layer=False
    ).save_pretrained(str(hf_dir))
    tok.save_pretrained(str(hf_dir))
    name = "fgcmr-peer"
    cfg = {
        "embed_dim": model_cfg.embed_dim,
        "vision_cfg": {
            "timm_model_name": timm_variant_name(model_cfg),
            "timm_model_pretrained": False,
            "timm_pool": "",
            "timm_proj": "linear",
            "image_size": image.image_size or 224,
        },
        "text_cfg": {
            "hf_model_name": str(hf_dir),
            "hf_tokenizer_name": str(hf_dir),
            "hf_model_pretrained": False,
            "hf_pooler_type": f"{text.pooling}_pooler" if text.pooling == "mean" else "cls_last_hidden_state_pooler",
            "hf_proj_type": "linear",
            "context_length": text.max_length,
        },
    }
    (out_dir / f"{name}.json").write_text(json.dumps(cfg, indent=1))
    variant = {"name": timm_variant_name(model_cfg), "base": image.name, "model_kwargs": image.model_kwargs}
    (out_dir / TIMM_VARIANT).write_text(json.dumps(variant))
    return name, out_dir


def allow_cpu_ddp() -> None:
    """open_clip_train wraps the model as ``DDP(model, device_ids=[device])``, which torch rejects for a
    CPU module; drop ``device_ids`` when they are CPU devices (what DDP on CPU expects). CUDA is untouched."""
    import torch

    base = torch.nn.parallel.DistributedDataParallel

    class CpuTolerantDDP(base):
        def __init__(self, module, device_ids=None, **kwargs):
            if device_ids and all(torch.device(d).type == "cpu" for d in device_ids):
                device_ids = None
            super().__init__(module, device_ids=device_ids, **kwargs)

    torch.nn.parallel.DistributedDataParallel = CpuTolerantDDP


def skip_shard_end_markers() -> None:
    """webdataset 1.0 ends each shard with an empty ``{}`` record, which open_clip_train 3.3's
    ``group_by_keys_nothrow`` does not expect (``KeyError: 'fname'``): drop those records before it."""
    import open_clip_train.data as data

    group = data.group_by_keys_nothrow

    def group_by_keys(files, *args, **kwargs):
        return group((f for f in files if f), *args, **kwargs)

    data.group_by_keys_nothrow = group_by_keys


def open_clip_entry(argv: list[str]) -> None:
    """One open_clip rank: ``--fgcmr-model-dir=<dir> <open_clip_train args>``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model_dir = Path(argv[0].split("=", 1)[1])
    import open_clip
    from open_clip_train.main import main

    variant = json.loads((model_dir / TIMM_VARIANT).read_text())
    if variant["model_kwargs"]:
        register_timm_variant(variant["name"], variant["base"], variant["model_kwargs"])
    allow_cpu_ddp()
    skip_shard_end_markers()
    open_clip.add_model_config(model_dir)  # skips timm_variant.json: it has no embed_dim/vision_cfg/text_cfg
    main(argv[1:])


# ----------------------------------------------------------------------------- measurement


def timed_steps(
    cmd: list[str], env: dict[str, str], pattern: re.Pattern, steps_of, log_path: Path, cwd: Path | None = None
) -> list[tuple[float, int]]:
    """Run ``cmd``; return (arrival time, steps done) for every progress line. Output goes to ``log_path``."""
    points = []
    with (
        open(log_path, "w") as log,
        subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, cwd=cwd
        ) as proc,
    ):
        for line in proc.stdout:
            now = time.perf_counter()
            log.write(line)
            m = pattern.search(line)
            if m:
                points.append((now, steps_of(int(m.group(1)))))
    log_path.with_suffix(".timing.json").write_text(json.dumps(points))
    if proc.returncode:
        lines = log_path.read_text().splitlines(True)
        first = next((i for i, line in enumerate(lines) if "Traceback" in line), max(0, len(lines) - 15))
        raise RuntimeError(
            f"{' '.join(cmd[:6])}… exited {proc.returncode}; see {log_path}:\n" + "".join(lines[first : first + 25])
        )
    return points


def throughput(points: list[tuple[float, int]], warmup: int, global_batch: int) -> dict[str, Any]:
    """Samples/s between the first progress line at ≥ ``warmup`` steps and the last line, and the
    samples/s of each window between consecutive lines (their median resists bursts of machine load)."""
    measured = [(t, s) for t, s in points if s >= warmup]
    if len(measured) < 2:
        raise RuntimeError(f"need two progress lines after step {warmup}, got steps {[s for _, s in points]}")
    (t0, s0), (t1, s1) = measured[0], measured[-1]
    windows = [(b - a) * global_batch / (tb - ta) for (ta, a), (tb, b) in zip(measured, measured[1:])]
    return {
        "samples_per_s": (s1 - s0) * global_batch / (t1 - t0),
        "step_time_s": (t1 - t0) / (s1 - s0),
        "measured_steps": s1 - s0,
        "window_samples_per_s": windows,
    }


def shard_pattern(shards: list[Path]) -> str:
    """``dir/train-{000000..000007}.tar`` for consecutively numbered shards, else open_clip's ``a::b`` list."""
    m = [re.fullmatch(r"(.*-)(\d+)(\.tar)", str(s)) for s in shards]
    if (
        all(m)
        and len({(x.group(1), x.group(3)) for x in m}) == 1
        and [int(x.group(2)) for x in m] == list(range(int(m[0].group(2)), int(m[0].group(2)) + len(m)))
    ):
        return f"{m[0].group(1)}{{{m[0].group(2)}..{m[-1].group(2)}}}{m[0].group(3)}" if len(m) > 1 else str(shards[0])
    return "::".join(str(s) for s in shards)


def _env(nproc: int) -> dict[str, str]:
    return launch_env(nproc, dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false"))


def run_open_clip_peer(
    cfg: BenchPeerConfig,
    shards_dir: str | Path,
    work_dir: str | Path | None = None,
    tokenizer_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Train ``cfg.model`` with open_clip's trainer for ``cfg.steps`` steps on the train split of ``shards_dir``.

    Returns ``samples_per_s``, ``step_time_s``, ``measured_steps``, ``processes``, ``batch_size``, ``log``.
    A WordPiece tokenizer is trained on the split's texts unless ``tokenizer_dir`` is given.
    """
    from fgcmr.dataset import open_dataset

    nproc, batch_size, steps, model = cfg.nproc, cfg.micro_batch, cfg.steps, cfg.model
    warmup, log_every, workers = cfg.warmup, cfg.log_every, cfg.workers

    work = Path(work_dir or tempfile.mkdtemp(prefix="fgcmr-peer-"))
    dataset = open_dataset(str(shards_dir))
    model_cfg = load_model_config(model)
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir else train_tokenizer(dataset, model_cfg, work / "tokenizer")
    name, model_dir = write_peer_model(model_cfg, tokenizer_dir, work / "open_clip_model")
    args = [
        "-m",
        "fgcmr.bench.peer_open_clip",
        f"--fgcmr-model-dir={model_dir}",
        "--model",
        name,
        "--dataset-type",
        "webdataset",
        "--dataset-resampled",
        "--train-data",
        shard_pattern(dataset.shards("train")),
        "--train-num-samples",
        str(steps * batch_size * nproc),
        "--batch-size",
        str(batch_size),
        "--workers",
        str(workers),
        "--epochs",
        "1",
        "--precision",
        "fp32",
        "--device",
        "cpu",
        "--dist-backend",
        "gloo",
        "--lr",
        "1e-3",
        "--warmup",
        "20",
        "--wd",
        "0.05",
        "--grad-clip-norm",
        "1.0",
        "--log-every-n-steps",
        str(log_every),
        "--save-frequency",
        "0",
        "--zeroshot-frequency",
        "0",
        "--val-frequency",
        "0",
        "--report-to",
        "",
        "--name",
        f"run{time.time_ns()}",
    ]  # logs go to <work>/logs (an explicit --logs trips torchrun's parser)
    cmd = torchrun_command(nproc, args)
    points = timed_steps(
        cmd,
        _env(nproc),
        OPEN_CLIP_LINE,
        lambda samples: samples // (batch_size * nproc),
        work / "open_clip.log",
        cwd=work,
    )
    return {
        **throughput(points, warmup, batch_size * nproc),
        "processes": nproc,
        "batch_size": batch_size,
        "log": str(work / "open_clip.log"),
    }


def run_fgcmr_train(
    cfg: BenchPeerConfig,
    shards_dir: str | Path,
    work_dir: str | Path | None = None,
    tokenizer_dir: str | Path | None = None,
) -> dict[str, Any]:
    """``fgcmr train`` of the same model on the same shards (CLIP loss, fp32, ZeRO-0), timed like the peer."""
    from fgcmr.dataset import open_dataset

    nproc, batch_size, steps, model = cfg.nproc, cfg.micro_batch, cfg.steps, cfg.model
    warmup, log_every, workers = cfg.warmup, cfg.log_every, cfg.workers

    work = Path(work_dir or tempfile.mkdtemp(prefix="fgcmr-peer-"))
    work.mkdir(parents=True, exist_ok=True)
    dataset = open_dataset(str(shards_dir))
    model_cfg = load_model_config(model)
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir else train_tokenizer(dataset, model_cfg, work / "tokenizer")
    model_file = work / "fgcmr_model.yaml"
    model_file.write_text(dump_yaml(to_dict(pin_tokenizer(model_cfg, tokenizer_dir))))
    run_dir = work / f"fgcmr_run{time.time_ns()}"
    args = [
        "-m",
        "fgcmr",
        "train",
        f"--shards={shards_dir}",
        f"--out={run_dir}",
        f"--model={model_file}",
        "--deepspeed=zero0_fp32",
        "--loss.name=clip",
        f"--data.micro_batch={batch_size}",
        f"--data.workers={workers}",
        "--data.augment=false",
        f"--max_steps={steps}",
        f"--log_every={log_every}",
        "--checkpoint_every=1000000",
        "--hist_every=1000000",
        "--optim.lr=1e-3",
        "--optim.warmup_steps=20",
    ]
    cmd = torchrun_command(nproc, args)
    points = timed_steps(cmd, _env(nproc), FGCMR_LINE, int, work / "fgcmr.log")
    return {
        **throughput(points, warmup, batch_size * nproc),
        "processes": nproc,
        "batch_size": batch_size,
        "log": str(work / "fgcmr.log"),
    }


def train_tokenizer(dataset, model_cfg: ModelConfig, out_dir: Path) -> Path:
    """The WordPiece tokenizer ``fgcmr train`` would train on the split's texts (same size, same texts)."""
    from fgcmr.dataset import iter_samples
    from fgcmr.model import fit_tokenizer

    texts = (t for shard in dataset.shards("train") for s in iter_samples(shard) for t in s.texts)
    return Path(fit_tokenizer(model_cfg.text, itertools.islice(texts, 100_000), out_dir).tokenizer_dir)


def pin_tokenizer(model_cfg: ModelConfig, tokenizer_dir: Path) -> ModelConfig:
    """fgcmr's side of the comparison: the given tokenizer and its vocabulary size, and plain linear
    heads (open_clip has no normalisation layer between the projection and the L2 norm)."""
    from fgcmr.model import bind_tokenizer

    extra = {"projection_norm": "none"} if hasattr(model_cfg, "projection_norm") else {}
    return dataclasses.replace(model_cfg, text=bind_tokenizer(model_cfg.text, tokenizer_dir), **extra)


def synthetic_shards(out_dir: Path, items: int, image_size: int) -> Path:
    if not (out_dir / "manifest.json").is_file():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "fgcmr",
                "shard",
                "--source=synthetic",
                f"--out={out_dir}",
                f"--items={items}",
                f"--image_size={image_size}",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    return out_dir


def compare(cfg: BenchPeerConfig, work_dir: str | Path | None = None) -> dict[str, Any]:
    """Both trainers in alternating rounds on the same shards; ratio = fgcmr / open_clip samples/s."""
    with tempfile.TemporaryDirectory(prefix="fgcmr-peer-") as tmp:
        work = Path(work_dir or tmp)
        model_cfg = load_model_config(cfg.model)
        shards = (
            Path(cfg.shards)
            if cfg.shards
            else synthetic_shards(work / "shards", cfg.items, model_cfg.image.image_size or 224)
        )
        from fgcmr.dataset import open_dataset

        tok = train_tokenizer(open_dataset(str(shards)), model_cfg, work / "tokenizer")
        runs: dict[str, list[dict]] = {"fgcmr": [], "open_clip": []}
        for r in range(cfg.rounds):
            runs["fgcmr"].append(run_fgcmr_train(cfg, shards, work / f"fgcmr{r}", tok))
            runs["open_clip"].append(run_open_clip_peer(cfg, shards, work / f"open_clip{r}", tok))
    fg = sum(r["measured_steps"] for r in runs["fgcmr"]) / sum(
        r["measured_steps"] * r["step_time_s"] for r in runs["fgcmr"]
    )
    oc = sum(r["measured_steps"] for r in runs["open_clip"]) / sum(
        r["measured_steps"] * r["step_time_s"] for r in runs["open_clip"]
    )
    gb = cfg.micro_batch * cfg.nproc
    median = {k: statistics.median(w for r in v for w in r["window_samples_per_s"]) for k, v in runs.items()}
    from fgcmr.bench.host import machine

    return {
        "fgcmr_samples_per_s": fg * gb,
        "open_clip_samples_per_s": oc * gb,
        "ratio": fg / oc,
        "fgcmr_median_window_samples_per_s": median["fgcmr"],
        "open_clip_median_window_samples_per_s": median["open_clip"],
        "median_ratio": median["fgcmr"] / median["open_clip"],
        "rounds": {k: [round(r["samples_per_s"], 2) for r in v] for k, v in runs.items()},
        "model": cfg.model,
        "processes": cfg.nproc,
        "micro_batch": cfg.micro_batch,
        "steps": cfg.steps,
        "warmup": cfg.warmup,
        "workers": cfg.workers,
        "log_every": cfg.log_every,
        "shards": str(cfg.shards or "synthetic"),
        "machine": machine(),
    }


def report(result: dict[str, Any]) -> str:
    return (
        f"machine: {result['machine']}\n"
        f"model {result['model']}, CLIP loss, fp32, {result['processes']} processes × batch {result['micro_batch']}, "
        f"{result['steps']} steps per run ({result['warmup']} unmeasured), shards: {result['shards']}\n"
        f"fgcmr train      : {result['fgcmr_samples_per_s']:8.1f} samples/s  (runs: {result['rounds']['fgcmr']})\n"
        f"open_clip_train  : {result['open_clip_samples_per_s']:8.1f} samples/s  "
        f"(runs: {result['rounds']['open_clip']})\n"
        f"ratio            : {result['ratio']:.3f} (goal ≥ 1.0)\n"
        f"median of {result['log_every']}-step windows: fgcmr {result['fgcmr_median_window_samples_per_s']:.1f}, "
        f"open_clip {result['open_clip_median_window_samples_per_s']:.1f} samples/s, ratio {result['median_ratio']:.3f}"
    )


def run(cfg: BenchPeerConfig) -> dict[str, Any]:
    result = compare(cfg)
    print(json.dumps(result) if cfg.json else report(result), flush=True)
    return result


if __name__ == "__main__":
    open_clip_entry(sys.argv[1:])
