"""The WordPiece vocabulary of ``fgcmr.text``'s tokenizer, learnt here rather than by ``tokenizers``'
``WordPieceTrainer``: that trainer numbers its ``##`` pieces in hash-map order, which breaks ties between
equally frequent merges differently from run to run (huggingface/tokenizers#1794), so two identical runs
got different tokenizers. ``wordpiece_vocab`` runs the same BPE-style merges with every tie broken by the
pieces' text: the same texts always give a byte-identical ``tokenizer.json``.

Plain Python, so that a tokenizer config is checked without torch or transformers.
"""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PREFIX = "##"


def wordpiece_vocab(word_counts: Counter, vocab_size: int, min_frequency: int = 0) -> list[str]:
    """Special tokens, the alphabet (word-initial characters and ``##`` continuations, sorted), then
    merged pieces in merge order: the most frequent adjacent pair first, ties broken by the pair's text."""
    words = [[w[0]] + [PREFIX + c for c in w[1:]] for w in sorted(word_counts)]
    counts = [word_counts[w] for w in sorted(word_counts)]
    vocab = list(SPECIAL_TOKENS) + sorted({p for w in words for p in w} - set(SPECIAL_TOKENS))
    known = set(vocab)
    pairs: Counter = Counter()
    where: dict[tuple[str, str], set[int]] = defaultdict(set)
    for i, w in enumerate(words):
        for pair in zip(w, w[1:]):
            pairs[pair] += counts[i]
            where[pair].add(i)
    heap = [(-n, pair) for pair, n in pairs.items()]
    heapq.heapify(heap)
    while len(vocab) < vocab_size and heap:
        neg, pair = heapq.heappop(heap)
        if pairs.get(pair, 0) != -neg:  # stale entry: the count changed since it was pushed
            continue
        if -neg < max(1, min_frequency):
            break
        a, b = pair
        merged = a + b[len(PREFIX) :]
        if merged not in known:
            vocab.append(merged)
            known.add(merged)
        touched: set[tuple[str, str]] = set()
        for i in sorted(where.pop(pair, ())):
            w, n = words[i], counts[i]
            for old in zip(w, w[1:]):
                pairs[old] -= n
                touched.add(old)
            j, out = 0, []
            while j < len(w):
                if j + 1 < len(w) and w[j] == a and w[j + 1] == b:
                    out.append(merged)
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            words[i] = out
            for new in zip(out, out[1:]):
                pairs[new] += n
                where[new].add(i)
                touched.add(new)
        pairs.pop(pair, None)
        for p in sorted(touched):
            if pairs.get(p, 0) > 0:
                heapq.heappush(heap, (-pairs[p], p))
            else:
                pairs.pop(p, None)
    return vocab
