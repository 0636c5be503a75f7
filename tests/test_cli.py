"""The command line: help for every command and group (complete, never paged), and a config error exits
non-zero with the field named."""

from __future__ import annotations

import dataclasses
import os
import pty
import subprocess
import sys
import typing

from waits import run_following

from fgcmr import cli
from fgcmr import help as h

ENV = {"PAGER": "cat", "PATH": "/usr/bin:/bin", **{k: os.environ[k] for k in ("PYTHONPATH",) if k in os.environ}}


def fgcmr(*args: str) -> subprocess.CompletedProcess:
    return run_following([sys.executable, "-m", "fgcmr", *args], env=ENV)


def commands(obj=cli.COMMANDS, words=()):
    """(words, group members) for every group and (words, command) for every command, depth first."""
    members = cli._members(obj)
    if members:
        yield list(words), members
        for name, member in members.items():
            yield from commands(member, (*words, name))
    else:
        yield list(words), obj


def fields(cls: type, prefix: str = "") -> list[str]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        nested = dataclasses.is_dataclass(hints[f.name])
        out += fields(hints[f.name], f"{prefix}{f.name}.") if nested else [f"{prefix}{f.name}"]
    return out


def test_help_of_every_command_and_group_is_complete():
    seen = 0
    for words, obj in commands():
        text = cli.help_text(words)
        if isinstance(obj, dict):  # a group: every subcommand with its line
            for name, member in obj.items():
                line = next(x for x in text.splitlines() if x.split()[:1] == [name])
                assert len(line.split()) > 3 and h.first_line(member) in line, (words, name)
            continue
        seen += 1
        spec = getattr(obj, "spec", None)
        options = h.config_options(spec.config_class) if spec else h.signature_options(obj)
        if spec:  # every field of the config is an option, and so are --config and --scratch
            assert [o.flag for o in options] == fields(spec.config_class)
            options += h.config_options(cli.CommonOptions)
        for o in options:
            line = next((x for x in text.splitlines() if x.split()[:1] == [f"--{o.flag}"]), None)
            assert line is not None, (words, o.flag)
            assert o.note and o.note in line, f"fgcmr {' '.join(words)} --{o.flag} has no description"
    assert seen >= 20  # every command was walked
    train = cli.help_text(["train"])
    for flag, choice in [
        ("--model", "pretrained_lite0_minilm"),
        ("--deepspeed", "zero3_bf16"),
        ("--loss.name", "clip"),
        ("--config", "configs/train/tiny.yaml"),
    ]:
        assert choice in next(x for x in train.splitlines() if x.split()[:1] == [flag]), flag
    assert "configs/experiments/synthetic.yaml" in cli.help_text(["pipeline"])
    assert "zero3_fp32" in cli.help_text(["bench", "memory"])


def _on_a_terminal(args: list[str], env: dict) -> str:
    """Run ``fgcmr args`` with a pseudo-terminal as stdin, stdout and stderr (where fire would page)."""
    main, child = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "fgcmr", *args], stdin=child, stdout=child, stderr=child, env=env)
    os.close(child)
    out = b""
    while True:
        try:
            chunk = os.read(main, 65536)
        except OSError:  # EIO: the child side is closed
            break
        if not chunk:
            break
        out += chunk
    os.close(main)
    assert proc.wait(timeout=600) == 0, out.decode(errors="replace")
    return out.decode(errors="replace")


def test_help_never_opens_a_pager(tmp_path):
    marker = tmp_path / "paged"
    env = {**os.environ, "PAGER": f"touch {marker}; cat"}  # fire pipes help through $PAGER on a terminal
    for args, shown in [
        (["--help"], "Commands:"),
        (["label"], "tokenizer"),
        (["submit", "status", "--help"], "--out"),
        (["verify", "--", "--help"], "Usage: fgcmr verify"),  # fire's own help flag, on a command
    ]:
        text = _on_a_terminal(args, env)
        assert shown in text and not marker.exists(), (args, text[-500:])


def test_every_spelling_of_help_prints_ours(monkeypatch, capsys):
    """--help, -h, fire's ``-- --help`` and a bare group all print fgcmr's help of the words before them."""
    for args in [
        ["--help"],
        ["-h"],
        ["--", "--help"],
        ["label"],
        ["label", "--help"],
        ["label", "--", "--help"],
        ["label", "train", "--help"],
        ["label", "train", "--", "--help"],
        ["submit"],
        ["submit", "--help"],
        ["submit", "pipeline", "--", "--help"],
        ["bench"],
        ["bench", "gpu", "-h"],
        ["pipeline", "--help"],
        ["pipeline", "--", "--help"],
        ["verify", "--", "--help"],
        ["train", "--shards=s", "--help"],
    ]:
        monkeypatch.setattr(sys, "argv", ["fgcmr", *args])
        cli.main()
        words = args[: next((i for i, a in enumerate(args) if a.startswith("-")), len(args))]
        assert capsys.readouterr().out == cli.help_text(words) + "\n", args


def test_top_level_help_lists_every_stage():
    res = fgcmr("--help")
    text = res.stdout + res.stderr
    for command in ("shard", "label", "train", "export", "eval", "pipeline", "submit", "bench"):
        assert command in text


def test_subcommand_help_and_unknown_command():
    res = fgcmr("label", "infer", "--help")
    assert res.returncode == 0 and "--labeler" in res.stdout
    res = fgcmr("lable", "train")
    assert res.returncode == 2 and "no command 'lable'" in res.stderr


def test_bad_config_value_is_a_clear_error(tmp_path):
    res = fgcmr("shard", "--source=nonsense", f"--out={tmp_path / 'x'}")
    assert res.returncode == 2
    assert "source='nonsense' is not allowed" in res.stderr
    assert "synthetic" in res.stderr
