"""The trained WordPiece tokenizer is reproducible: same texts → byte-identical tokenizer.json."""

from __future__ import annotations

import os
import sys
from collections import Counter
from pathlib import Path

from fgcmr.wordpiece import SPECIAL_TOKENS, wordpiece_vocab
from waits import run_following

REPO = Path(__file__).resolve().parents[1]
TRAIN = """
import sys
from fgcmr.text import ensure_tokenizer
texts = [f"the {a} {b} jumped over {c} fences 你好世界 ready" for a in ("quick", "slow", "brown", "lazy", "red")
         for b in ("fox", "dog", "cat", "hen") for c in ("tall", "low", "wooden", "old", "new", "many")]
ensure_tokenizer(texts * 3, sys.argv[1], 120, min_frequency=0)
"""


def test_tokenizer_bytes_identical_across_processes(tmp_path):
    """Two processes with different hash seeds (the upstream trainer's ordering followed them) agree byte for byte."""
    out = []
    for seed in ("1", "2"):
        d = tmp_path / f"tok{seed}"
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=str(REPO))
        done = run_following([sys.executable, "-c", TRAIN, str(d)], env=env, cwd=REPO)
        assert done.returncode == 0, done.stderr[-2000:]
        out.append((d / "tokenizer.json").read_bytes())
    assert out[0] == out[1]
    assert b'"##ox"' in out[0] or b'"fox"' in out[0]


def test_vocab_ties_broken_by_text():
    """Equal pair counts merge in the pairs' text order; specials and the alphabet come first."""
    vocab = wordpiece_vocab(Counter({"ab": 2, "cd": 2, "xy": 1}), vocab_size=len(SPECIAL_TOKENS) + 8)
    assert vocab[: len(SPECIAL_TOKENS)] == SPECIAL_TOKENS
    assert vocab[len(SPECIAL_TOKENS) :] == ["##b", "##d", "##y", "a", "c", "x", "ab", "cd"]
    assert wordpiece_vocab(Counter({"ab": 2, "cd": 2, "xy": 1}), 100, min_frequency=2)[-2:] == ["ab", "cd"]
