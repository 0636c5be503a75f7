"""The ``fgcmr`` command line (python-fire).

Every stage command takes ``--config=<yaml>`` (a stage file, or an experiment file whose matching
section is used) plus any option of the stage's config as ``--name=value`` or ``--a.b=value``.
Modules are imported only when their command runs, so ``fgcmr --help`` is instant.
Every stage also takes ``--scratch=<dir>``: node-local disk for the ranks' temporary files
(``fgcmr.distributed.use_scratch``; default: none, the system's temp dir).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import inspect
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from fgcmr.config import ConfigError, load_config
from fgcmr.io import CorruptFileError


@dataclasses.dataclass(frozen=True)
class Spec:
    """What a configured command runs: pipeline stage ``stage`` (``fgcmr.stages``) or ``module:Config:function``."""

    stage: str = ""
    target: str = ""
    section: str | None = None  # the experiment section a target's --config reads (a stage reads its own)
    configs: str = ""  # the shipped files for its --config: configs/<configs>/*.yaml
    log: str = ""  # the config field naming the directory whose logs/<name>.log records the run
    name: str = ""  # the log file's name; default: the stage's

    @property
    def config_class(self) -> type:
        if self.stage:
            from fgcmr.stages import stage

            return stage(self.stage).config_class
        module, cls, _ = self.target.split(":")
        return getattr(importlib.import_module(module), cls)

    def load(self, config: str | None, options: dict[str, Any]) -> Any:
        if self.stage:
            from fgcmr.stages import stage

            return stage(self.stage).load(config, _aliases(self.stage, options))
        return load_config(self.config_class, config, options, section=self.section)

    def run(self, cfg: Any) -> Any:
        if self.stage:
            from fgcmr.stages import stage

            return stage(self.stage).run(cfg)
        module, _, fn = self.target.split(":")
        return getattr(importlib.import_module(module), fn)(cfg)


@dataclasses.dataclass
class CommonOptions:
    """The options every configured command takes besides its config's fields (documented for --help)."""

    config: str | None = None  # a YAML file of these options (a stage file, or an experiment file: its section)
    scratch: str | None = None  # node-local disk for the ranks' temporary files; default: the system's temp dir


def configured(spec: Spec) -> Callable:
    """Make a command that loads ``spec``'s typed config from ``--config`` and options and runs it (logged to
    its output's ``logs/`` when ``spec.log``); the decorated function contributes its name and docstring."""

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def command(*args: Any, **kwargs: Any) -> Any:
            bound = inspect.signature(fn).bind(*args, **kwargs).arguments
            options = dict(bound.get("options", {}))
            _scratch(options)
            cfg = spec.load(bound.get("config"), options)
            if spec.log:
                _logged(spec, cfg, " ".join(["fgcmr", *sys.argv[1:]]) if sys.argv[1:] else fn.__name__)
            else:
                spec.run(cfg)

        command.spec = spec  # type: ignore[attr-defined]
        return command

    return wrap


def _logged(spec: Spec, cfg: Any, command: str) -> None:
    """Run with the log also in ``<output>/logs/<name>.log``; end with one summary line naming the next command."""
    from fgcmr.distributed import resolve_env
    from fgcmr.progress import log_file

    name = spec.name or spec.stage
    out = Path(getattr(cfg, spec.log))
    task = f".task{cfg.task_index}" if getattr(cfg, "num_tasks", 1) > 1 and not getattr(cfg, "merge", True) else ""
    path = out / "logs" / f"{name}{task}.log"
    t0 = time.monotonic()
    with log_file(path, f"started: {command} (pid {os.getpid()})", resolve_env().rank):
        spec.run(cfg)
        after = NEXT[name](cfg) if name in NEXT else ""
        logging.getLogger("fgcmr").info(
            "%s: done in %s → %s (log: %s)%s",
            name,
            _duration(time.monotonic() - t0),
            out,
            path,
            f"; next: {after}" if after else "",
        )


def _duration(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{s:02d}s" if m else f"{s}s"


def _shard_next(c: Any) -> str:
    if c.num_tasks > 1 and not c.merge:
        return f"fgcmr shard --merge --out={c.out} --num_tasks={c.num_tasks} (once every task is done)"
    return f"fgcmr label train --shards={c.out} --out=<labeler dir>"


# The command a person runs after each stage (the order `fgcmr pipeline` follows); "" when there is none.
NEXT: dict[str, Callable[[Any], str]] = {
    "shard": _shard_next,
    "tokenizer": lambda c: f"fgcmr label train --shards={c.shards} --tokenizer={c.out} --out=<labeler dir>",
    "label": lambda c: f"fgcmr label infer --shards={c.shards} --labeler={c.out}",
    "infer": lambda c: (
        "" if c.verify_only else f"fgcmr train --shards={c.shards} --labels={c.labeler_name} --out=<run>"
    ),
    "train": lambda c: f"fgcmr export --run={c.out}",
    "export": lambda c: f"fgcmr eval --run_dir={c.run}",
    "eval": lambda c: f"fgcmr embed --export={c.export or Path(c.run) / 'export'} --shards=<dataset dir> --out=<dir>",
    "embed": lambda c: f"fgcmr index --embeddings={c.out} --out=<index dir>",
    "index": lambda c: f'fgcmr search --index={c.out} --text="…"',
}


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


def help_text(words: list[str]) -> str:
    """The help of ``fgcmr <words…>``: a group lists its commands, a command its docstring and every option."""
    from fgcmr import help as h

    obj, title = _resolve(words)
    members = _members(obj)
    if members:
        doc = h.first_line(obj) if obj is not COMMANDS else h.first_line(sys.modules["fgcmr"]).removeprefix("fgcmr: ")
        return h.render_group(title, doc, members)
    spec: Spec | None = getattr(obj, "spec", None)
    if spec is None:
        options, usage = h.signature_options(obj), f"{title} [--name=value ...]"
    else:
        common = h.config_options(CommonOptions)
        if spec.configs:
            common[0] = dataclasses.replace(common[0], choices=tuple(h.config_files(spec.configs)))
        options = common + h.config_options(spec.config_class)
        usage = f"{title} [--config=<yaml>] [--name=value ...]"
    return "\n".join(
        [f"Usage: {usage}", "", inspect.getdoc(obj) or "", "", "Options (--name=value; nested: --section.name=value):"]
        + h.render_options(options)
    )


def _resolve(words: list[str]) -> tuple[Any, str]:
    """The command or group ``fgcmr <words…>`` names, and its full name; an unknown command is a usage error."""
    obj: Any = COMMANDS
    path = ["fgcmr"]
    for word in words:
        members = _members(obj)
        if not members:
            break  # a command's positional value: fgcmr verify <dir> --help
        if word not in members:
            raise UsageError(f"{' '.join(path)} has no command {word!r}; its commands: {', '.join(members)}")
        obj = members[word]
        path.append(word)
    return obj, " ".join(path)


class UsageError(ValueError):
    """The command line names no command."""


def _members(obj: Any) -> dict[str, Any]:
    """The subcommands of the top level (a dict) or of a group (a class's public methods)."""
    if isinstance(obj, dict):
        return obj
    if inspect.isclass(obj):
        return {k: v for k, v in vars(obj).items() if not k.startswith("_") and callable(v)}
    return {}


@configured(Spec(stage="shard", log="out", configs="datasets"))
def shard(config: str | None = None, **options: Any) -> None:
    """Write a corpus as verified WebDataset shards with a manifest.

    fgcmr shard --source=<wikipedia|folder|karpathy|jsonl|csv|parquet|img2dataset|webdataset|synthetic>
                --root=<input> --out=<dataset dir> [--group_by=url|sha256|none] [--features=<file>]
                [--workers=N] [--task_index=I --num_tasks=T] [--data.max_items_per_shard=N]
    fgcmr shard --source=synthetic --out=<dataset dir> --items=N [--seed=S]
    fgcmr shard --merge --out=<dataset dir>   (after a Slurm array of --num_tasks tasks)
    """


class Label:
    """The label stage: train the siamese text labeler, then write fine-grained label sidecars."""

    @configured(Spec(stage="tokenizer", log="out"))
    def tokenizer(self, config: str | None = None, **options: Any) -> None:
        """Train a WordPiece tokenizer (English and Chinese) on a dataset's train texts: --shards=<dir> --out=<dir>."""

    @configured(Spec(stage="label", log="out", configs="labelers"))
    def train(self, config: str | None = None, **options: Any) -> None:
        """Train the siamese labeler: --shards=<dataset dir> --out=<labeler dir> [--init=<pretrained dir>]."""

    @configured(Spec(stage="infer", log="labeler"))
    def infer(self, config: str | None = None, **options: Any) -> None:
        """Distributed inference: --shards=<dataset dir> --labeler=<labeler dir> → <dataset dir>/labels/<name>/."""


@configured(Spec(stage="train", log="out", configs="train"))
def train(config: str | None = None, **options: Any) -> None:
    """Train the two-tower model with DeepSpeed: --shards=<dataset dir> --out=<run dir> [--resume=auto].

    A run directory that holds checkpoints is continued only with --resume=auto (alias latest: its newest
    complete checkpoint) or --resume=<tag>; Ctrl-C / SIGTERM / SIGUSR1 checkpoint and exit 75.
    """


@configured(Spec(stage="export", log="run"))
def export(config: str | None = None, **options: Any) -> None:
    """Consolidate a (ZeRO) checkpoint into <run dir>/export/model.safetensors: --run=<run dir> (or --run_dir=)."""


@configured(Spec(stage="eval", log="run"))
def eval(config: str | None = None, **options: Any) -> None:  # noqa: A001 - the command's name
    """Retrieval metrics (MAP@all, MAP@R, Recall@K, median rank) and a PNG report: --run_dir=<run dir> (or --run=).

    Under torchrun spell it --run_dir: torchrun reads --run=… as its own --run-path.
    """


@configured(Spec(target="fgcmr.retrieval.embed:EmbedConfig:run", section="embed", log="out", name="embed"))
def embed(config: str | None = None, **options: Any) -> None:
    """Embed a sharded dataset with an export on N ranks (clip-retrieval layout, resumable).

    fgcmr embed --export=<export dir> --shards=<dataset dir> --out=<dir> [--splits=test,train] [--dtype=float32]
    """


@configured(Spec(target="fgcmr.retrieval.index:IndexConfig:run", section="index", log="out", name="index"))
def index(config: str | None = None, **options: Any) -> None:
    """Build faiss indexes (images, captions) from an embed output: --embeddings=<dir> --out=<dir>.

    Exact (IndexFlatIP) below --exact_below vectors, else IVF with nlist and nprobe chosen from the size
    and checked on held-out queries; prints recall@10 against exact search and the memory.
    """


@configured(Spec(target="fgcmr.retrieval.search:SearchConfig:run", section="search"))
def search(config: str | None = None, **options: Any) -> None:
    """Text → top-k images or image → top-k captions: --index=<dir> (--text="…" | --image=<path>) [--k=10] [--json]."""


@configured(Spec(target="fgcmr.retrieval.serve:ServeConfig:run", section="serve"))
def serve(config: str | None = None, **options: Any) -> None:
    """A local search page (text → image grid, image upload → captions):
    --index=<dir> [--port=8765] [--host=127.0.0.1]."""


def pipeline(
    config: str | None = None,  # the experiment file: configs/experiments/*.yaml or one of your own
    nproc: int = 1,  # local processes of each distributed stage
    out: str | None = None,  # output dir; default: runs/<experiment name>
    force: bool = False,  # a training run made with another config is deleted and redone instead of refused
    **options: Any,
) -> None:
    """shard → label (train + infer) → train → export → eval from one experiment config, on N local processes.

    fgcmr pipeline --config=<experiment.yaml> [--nproc=N] [--out=<dir>] [--force] [--<section>.<option>=value ...]
    Stages whose outputs are complete and made from the same config and inputs are skipped, so rerunning
    after a crash continues; a changed stage is redone with everything downstream. A training run made
    with another config is refused unless --force (which deletes it) or a new --out.
    """
    if config is None:
        print(help_text(["pipeline"]))
        sys.exit(2)
    from fgcmr.pipeline import run_pipeline

    _scratch(options)
    run_pipeline(config, nproc=nproc, out=out, overrides=options, force=force)


def verify(
    path: str,  # a dataset, label, run, export or pipeline output dir (every one below it is checked)
) -> None:
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

    def pipeline(
        self,
        config: str,  # the experiment file: configs/experiments/*.yaml or one of your own
        dry_run: bool = False,  # print the scripts, submit nothing
        out: str | None = None,  # output dir (scripts, logs, chain.json under <out>/slurm/); default: runs/<name>
        **options: Any,
    ) -> None:
        """Submit shard → merge → label → infer → train → eval as an afterok job chain.

        fgcmr submit pipeline <experiment.yaml> [--out=<dir>, default runs/<name>] [--dry-run] [--slurm.nodes=4 ...]
        Scripts, logs and chain.json go to <out>/slurm/; --dry-run prints the scripts and submits nothing.
        """
        from fgcmr.slurm import submit_pipeline

        submit_pipeline(config, dry_run=dry_run, overrides=options, out=out)

    def status(
        self,
        out: str,  # the --out dir of `fgcmr submit pipeline`
    ) -> None:
        """Show the state of each job of a submitted chain, and which failed with its log: --out=<dir>."""
        from fgcmr.slurm import FAILED, chain_status

        if any(t.state in FAILED for t in chain_status(out)):
            sys.exit(1)


class Bench:
    """Benchmarks that print side-by-side ratios measured in one run (--json for one JSON object)."""

    @configured(Spec(target="fgcmr.bench.train:BenchTrainConfig:run"))
    def train(self, config: str | None = None, **options: Any) -> None:
        """fgcmr training samples/s vs a bare forward+backward+step loop (and --peer=open_clip)."""

    @configured(Spec(target="fgcmr.bench.label:BenchLabelConfig:run"))
    def label(self, config: str | None = None, **options: Any) -> None:
        """Label inference samples/s vs a bare forward loop of the same encoder on the same batches."""

    @configured(Spec(target="fgcmr.bench.shard:BenchShardConfig:run"))
    def shard(self, config: str | None = None, **options: Any) -> None:
        """Sharding items/s vs plain tarfile, and peak memory at two corpus sizes."""

    @configured(Spec(target="fgcmr.bench.data:BenchDataConfig:run"))
    def data(self, config: str | None = None, **options: Any) -> None:
        """The training input pipeline's samples/s vs the machine's decode ceiling."""

    @configured(Spec(target="fgcmr.bench.embed:BenchEmbedConfig:run"))
    def embed(self, config: str | None = None, **options: Any) -> None:
        """fgcmr embed samples/s vs a bare forward of the same towers on the same batches: --export= --shards=."""

    @configured(Spec(target="fgcmr.bench.index:BenchIndexConfig:run"))
    def index(self, config: str | None = None, **options: Any) -> None:
        """The IVF index at --vectors=1000000 synthetic embeddings: recall@10 vs exact, memory,
        p50 latency per query."""

    @configured(Spec(target="fgcmr.bench.memory:BenchMemoryConfig:run"))
    def memory(self, config: str | None = None, **options: Any) -> None:
        """Per-rank peak memory of a few steps, model state vs activations, vs ZeRO's bytes/param:
        --model= --deepspeed= --nproc=."""

    @configured(Spec(target="fgcmr.bench.startup:BenchStartupConfig:run"))
    def startup(self, config: str | None = None, **options: Any) -> None:
        """A training job's time from launch to its first step (and each phase's share) vs torchrun ranks
        that only import torch and join a gloo group: --nproc=2 --repeats=3."""

    @configured(Spec(target="fgcmr.bench.gpu:BenchGpuConfig:run", configs="bench"))
    def gpu(self, config: str | None = None, **options: Any) -> None:
        """Training samples/s, step time, peak memory and MFU of one process: --config=configs/bench/gpu_h200.yaml."""


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
        args = sys.argv[1:]
        words = args[: next((i for i, a in enumerate(args) if a.startswith("-")), len(args))]
        # ours, also for fire's own `-- --help`: listed, complete, never paged
        if {"--help", "-h"} & set(args) or _members(_resolve(words)[0]):
            with contextlib.suppress(BrokenPipeError):  # fgcmr train --help | head
                print(help_text(words))
            return
        fire.core.Display = _unpaged  # what fire still prints itself (a usage error's usage, -- --trace)
        fire.Fire(COMMANDS, name="fgcmr")
    except ConfigError as e:
        print(f"fgcmr: config error: {e}", file=sys.stderr)
        sys.exit(2)
    except UsageError as e:
        print(f"fgcmr: {e} (fgcmr --help lists them)", file=sys.stderr)
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


def _unpaged(lines: list[str], out: Any) -> None:
    """fire's ``Display`` without its pager: on a terminal fire pipes its text through $PAGER or less."""
    out.write("\n".join(lines) + "\n")


def _own_message(e: BaseException) -> str:
    """The error's own message: a DataLoader re-raises a worker's error with the worker's traceback in its text."""
    lines = str(e).strip().splitlines()
    if len(lines) > 1 and lines[0].startswith("Caught ") and "DataLoader worker" in lines[0]:
        return lines[-1].split(": ", 1)[-1]
    return str(e)


if __name__ == "__main__":
    main()
