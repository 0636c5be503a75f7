"""The command line: help for every command, and a config error exits non-zero with the field named."""

from __future__ import annotations

import subprocess
import sys

import pytest
from waits import run_following


def fgcmr(*args: str) -> subprocess.CompletedProcess:
    return run_following([sys.executable, "-m", "fgcmr", *args], env={"PAGER": "cat", "PATH": "/usr/bin:/bin"})


def test_top_level_help_lists_every_stage():
    res = fgcmr("--help")
    text = res.stdout + res.stderr
    for command in ("shard", "label", "train", "export", "eval", "pipeline", "submit", "bench"):
        assert command in text


@pytest.mark.parametrize(
    "command", [["shard"], ["label", "train"], ["label", "infer"], ["train"], ["eval"], ["pipeline"]]
)
def test_subcommand_help(command):
    res = fgcmr(*command, "--help")
    assert res.returncode == 0
    assert "--" in res.stdout + res.stderr


def test_bad_config_value_is_a_clear_error(tmp_path):
    res = fgcmr("shard", "--source=nonsense", f"--out={tmp_path / 'x'}")
    assert res.returncode == 2
    assert "source='nonsense' is not allowed" in res.stderr
    assert "synthetic" in res.stderr
