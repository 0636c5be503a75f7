"""The ``fgcmr`` command line (python-fire).

Every stage command takes ``--config=<yaml>`` (a stage file, or an experiment file whose matching
section is used) plus any option of the stage's config as ``--name=value`` or ``--a.b=value``.
Modules are imported only when their command runs, so ``fgcmr --help`` is instant.
Every stage also takes ``--scratch=<dir>``: node-local disk for the ranks' temporary files
(``fgcmr.distributed.use_scratch``; default: none, the system's temp dir).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import sys
import typing
from typing import Any

from fgcmr.config import ConfigError, load_config
from fgcmr.io import CorruptFileError


def _run(target: str, section: str | None, config: str | None, overrides: dict[str, Any], command: Any = None) -> Any:
    """Load ``module:ConfigClass:function``'s typed config and call the function with it.

    ``--help`` lands in ``overrides`` (the stage takes ``**options``), so it is answered here with
    the command's docstring and every option of its config, with defaults and allowed values.
    """
    module_name, cls_name, fn_name = target.split(":")
    module = importlib.import_module(module_name)
    cls = getattr(module, cls_name)
    if overrides.keys() & {"help", "h"}:
        print(_options_help(cls, inspect.getdoc(command) or ""))
        return None
    _scratch(overrides)
    cfg = load_config(cls, config, overrides, section=section)
    return getattr(module, fn_name)(cfg)


def _stage(name: str, config: str | None, overrides: dict[str, Any], command: Any) -> Any:
    """Run pipeline stage ``name`` (``fgcmr.stages``) from its config file and options."""
    from fgcmr.stages import stage

    s = stage(name)
    if overrides.keys() & {"help", "h"}:
        print(_options_help(s.config_class, inspect.getdoc(command) or ""))
        return None
    _scratch(overrides)
    return s.run(s.load(config, _aliases(name, overrides)))


def _aliases(stage: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """``--run_dir`` is ``--run`` for export and eval: torchrun takes ``--run=…`` as its own ``--run-path``."""
    if stage in ("export", "eval") and "run_dir" in overrides:
        overrides = {("run" if k == "run_dir" else k): v for k, v in overrides.items()}
    return overrides


def _scratch(options: dict[str, Any]) -> None:
    """``--scratch=<dir>`` is not a stage option: it goes to every rank (and pipeline stage) via the environment."""
    scratch = options.pop("scratch", None)
    if scratch:
        from fgcmr.distributed import SCRATCH_ENV

        os.environ[SCRATCH_ENV] = str(scratch)


def _options_help(cls: type, doc: str) -> str:
    lines = (
        [doc, "", "Options (--name=value; nested as --section.name=value; or from --config=<yaml>):"]
        if doc
        else ["Options:"]
    )

    def walk(c: type, prefix: str) -> None:
        hints = typing.get_type_hints(c)
        for f in dataclasses.fields(c):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                walk(tp, f"{prefix}{f.name}.")
                continue
            default = (
                f.default
                if f.default is not dataclasses.MISSING
                else (f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)")
            )
            kind = (
                " | ".join(map(repr, typing.get_args(tp)))
                if typing.get_origin(tp) is typing.Literal
                else getattr(tp, "__name__", str(tp))
            )
            lines.append(f"  --{prefix}{f.name}  [{kind}]  default: {default!r}")

    walk(cls, "")
    return "\n".join(lines)


def shard(config: str | None = None, **options: Any) -> None:
    """Write a corpus as verified WebDataset shards with a manifest.

    fgcmr shard --source=<wikipedia|folder|karpathy|jsonl|csv|parquet|img2dataset|webdataset|synthetic>
                --root=<input> --out=<dataset dir> [--group_by=url|sha256|none] [--features=<file>]
                [--workers=N] [--task_index=I --num_tasks=T] [--data.max_items_per_shard=N]
    fgcmr shard --source=synthetic --out=<dataset dir> --items=N [--seed=S]
    fgcmr shard --merge --out=<dataset dir>   (after a Slurm array of --num_tasks tasks)
    """
    _stage("shard", config, options, shard)


class Label:
    """The label stage: train the siamese text labeler, then write fine-grained label sidecars."""

    def tokenizer(self, config: str | None = None, **options: Any) -> None:
        """Train a WordPiece tokenizer (English and Chinese) on a dataset's train texts: --shards=<dir> --out=<dir>."""
        _stage("tokenizer", config, options, self.tokenizer)

    def train(self, config: str | None = None, **options: Any) -> None:
        """Train the siamese labeler: --shards=<dataset dir> --out=<labeler dir> [--init=<pretrained dir>]."""
        _stage("label", config, options, self.train)

    def infer(self, config: str | None = None, **options: Any) -> None:
        """Distributed inference: --shards=<dataset dir> --labeler=<labeler dir> → <dataset dir>/labels/<name>/."""
        _stage("infer", config, options, self.infer)


def train(config: str | None = None, **options: Any) -> None:
    """Train the two-tower model with DeepSpeed: --shards=<dataset dir> --out=<run dir> [--resume=auto].

    A run directory that holds checkpoints is continued only with --resume=auto (alias latest: its newest
    complete checkpoint) or --resume=<tag>; Ctrl-C / SIGTERM / SIGUSR1 checkpoint and exit 75.
    """
    _stage("train", config, options, train)


def export(config: str | None = None, **options: Any) -> None:
    """Consolidate a (ZeRO) checkpoint into <run dir>/export/model.safetensors: --run=<run dir> (or --run_dir=)."""
    _stage("export", config, options, export)


def eval(config: str | None = None, **options: Any) -> None:  # noqa: A001 - the command's name
    """Retrieval metrics (MAP@all, MAP@R, Recall@K, median rank) and a PNG report: --run_dir=<run dir> (or --run=).

    Under torchrun spell it --run_dir: torchrun reads --run=… as its own --run-path.
    """
    _stage("eval", config, options, eval)


def embed(config: str | None = None, **options: Any) -> None:
    """Embed a sharded dataset with an export on N ranks (clip-retrieval layout, resumable).

    fgcmr embed --export=<export dir> --shards=<dataset dir> --out=<dir> [--splits=test,train] [--dtype=float32]
    """
    _run("fgcmr.retrieval.embed:EmbedConfig:run", "embed", config, options, embed)


def index(config: str | None = None, **options: Any) -> None:
    """Build faiss indexes (images, captions) from an embed output: --embeddings=<dir> --out=<dir>.

    Exact (IndexFlatIP) below --exact_below vectors, else IVF with nlist and nprobe chosen from the size
    and checked on held-out queries; prints recall@10 against exact search and the memory.
    """
    _run("fgcmr.retrieval.index:IndexConfig:run", "index", config, options, index)


def search(config: str | None = None, **options: Any) -> None:
    """Text → top-k images or image → top-k captions: --index=<dir> (--text="…" | --image=<path>) [--k=10] [--json]."""
    _run("fgcmr.retrieval.search:SearchConfig:run", "search", config, options, search)


def serve(config: str | None = None, **options: Any) -> None:
    """A local search page (text → image grid, image upload → captions):
    --index=<dir> [--port=8765] [--host=127.0.0.1]."""
    _run("fgcmr.retrieval.serve:ServeConfig:run", "serve", config, options, serve)


def pipeline(
    config: str | None = None, nproc: int = 1, out: str | None = None, force: bool = False, **options: Any
) -> None:
    """shard → label (train + infer) → train → export → eval from one experiment config, on N local processes.

    fgcmr pipeline --config=<experiment.yaml> [--nproc=N] [--out=<dir>] [--force] [--<section>.<option>=value ...]
    Stages whose outputs are complete and made from the same config and inputs are skipped, so rerunning
    after a crash continues; a changed stage is redone with everything downstream. A training run made
    with another config is refused unless --force (which deletes it) or a new --out.
    """
    if config is None or options.keys() & {"help", "h"}:
        print(inspect.getdoc(pipeline))
        if config is None and not options.keys() & {"help", "h"}:
            sys.exit(2)
        return
    from fgcmr.pipeline import run_pipeline

    _scratch(options)
    run_pipeline(config, nproc=nproc, out=out, overrides=options, force=force)


def verify(path: str) -> None:
    """Check shards (size, sha256, samples), label sidecars and exports under <path> against their records:
    fgcmr verify <dataset dir | label dir | run dir | export dir | pipeline --out dir>. Exits 1 on a problem."""
    from fgcmr.verify import verify as check

    reports = check(path)
    for r in reports:
        print(r.line())
    bad = sum(r.problem is not None for r in reports)
    print(f"fgcmr verify: {len(reports) - bad} ok, {bad} problem(s)")
    if bad:
        sys.exit(1)


class Submit:
    """Render and submit Slurm job chains."""

    def pipeline(self, config: str, dry_run: bool = False, out: str | None = None, **options: Any) -> None:
        """Submit shard → merge → label → infer → train → eval as an afterok job chain.

        fgcmr submit pipeline <experiment.yaml> [--out=<dir>, default runs/<name>] [--dry-run] [--slurm.nodes=4 ...]
        Scripts, logs and chain.json go to <out>/slurm/; --dry-run prints the scripts and submits nothing.
        """
        from fgcmr.slurm import submit_pipeline

        submit_pipeline(config, dry_run=dry_run, overrides=options, out=out)

    def status(self, out: str) -> None:
        """Show the state of each job of a submitted chain, and which failed with its log: --out=<dir>."""
        from fgcmr.slurm import FAILED, chain_status

        if any(t.state in FAILED for t in chain_status(out)):
            sys.exit(1)


class Bench:
    """Benchmarks that print side-by-side ratios measured in one run (--json for one JSON object)."""

    def train(self, config: str | None = None, **options: Any) -> None:
        """fgcmr training samples/s vs a bare forward+backward+step loop (and --peer=open_clip)."""
        _run("fgcmr.bench.train:BenchTrainConfig:run", None, config, options, self.train)

    def label(self, config: str | None = None, **options: Any) -> None:
        """Label inference samples/s vs a bare forward loop of the same encoder on the same batches."""
        _run("fgcmr.bench.label:BenchLabelConfig:run", None, config, options, self.label)

    def shard(self, config: str | None = None, **options: Any) -> None:
        """Sharding items/s vs plain tarfile, and peak memory at two corpus sizes."""
        _run("fgcmr.bench.shard:BenchShardConfig:run", None, config, options, self.shard)

    def data(self, config: str | None = None, **options: Any) -> None:
        """The training input pipeline's samples/s vs the machine's decode ceiling."""
        _run("fgcmr.bench.data:BenchDataConfig:run", None, config, options, self.data)

    def embed(self, config: str | None = None, **options: Any) -> None:
        """fgcmr embed samples/s vs a bare forward of the same towers on the same batches: --export= --shards=."""
        _run("fgcmr.bench.embed:BenchEmbedConfig:run", None, config, options, self.embed)

    def index(self, config: str | None = None, **options: Any) -> None:
        """The IVF index at --vectors=1000000 synthetic embeddings: recall@10 vs exact, memory,
        p50 latency per query."""
        _run("fgcmr.bench.index:BenchIndexConfig:run", None, config, options, self.index)

    def memory(self, config: str | None = None, **options: Any) -> None:
        """Per-rank peak memory of a few steps, model state vs activations, vs ZeRO's bytes/param:
        --model= --deepspeed= --nproc=."""
        _run("fgcmr.bench.memory:BenchMemoryConfig:run", None, config, options, self.memory)

    def gpu(self, config: str | None = None, **options: Any) -> None:
        """Training samples/s, step time, peak memory and MFU of one process: --config=configs/bench/gpu_h200.yaml."""
        _run("fgcmr.bench.gpu:BenchGpuConfig:run", None, config, options, self.gpu)


COMMANDS = {
    "shard": shard,
    "label": Label,
    "train": train,
    "export": export,
    "eval": eval,
    "embed": embed,
    "index": index,
    "search": search,
    "serve": serve,
    "pipeline": pipeline,
    "verify": verify,
    "submit": Submit,
    "bench": Bench,
}


def main() -> None:
    import fire

    from fgcmr.progress import setup_logging

    setup_logging()
    try:
        fire.Fire(COMMANDS, name="fgcmr")
    except ConfigError as e:
        print(f"fgcmr: config error: {e}", file=sys.stderr)
        sys.exit(2)
    except (FileNotFoundError, NotADirectoryError) as e:
        print(f"fgcmr: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("fgcmr: interrupted", file=sys.stderr)
        sys.exit(130)
    except CorruptFileError as e:  # a damaged shard, sidecar or manifest: the message names it and what to do
        print(f"fgcmr: {_own_message(e)}", file=sys.stderr)
        sys.exit(1)


def _own_message(e: BaseException) -> str:
    """The error's own message: a DataLoader re-raises a worker's error with the worker's traceback in its text."""
    lines = str(e).strip().splitlines()
    if len(lines) > 1 and lines[0].startswith("Caught ") and "DataLoader worker" in lines[0]:
        return lines[-1].split(": ", 1)[-1]
    return str(e)


if __name__ == "__main__":
    main()
