"""Turning a vLLM server's answers into the seam's values: prompt log-probabilities per position, the top k,
KL from two top-k lists (a lower bound, with the probability it could not see), and the gate that lets a
request run alone (utils/serving/backend.py says why)."""

from __future__ import annotations

import math
import threading
from contextlib import contextmanager

from utils.core.seam import NextTokenView


class Gate:
    """Many shared holders at once, or one alone (a writer-preferring readers-writer lock): a request that must
    run alone waits for the running ones to end, and holds new ones back meanwhile."""

    def __init__(self):
        self._cond = threading.Condition()
        self._shared = 0
        self._alone = False
        self._waiting = 0

    @contextmanager
    def shared(self):
        with self._cond:
            while self._alone or self._waiting:
                self._cond.wait()
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    @contextmanager
    def alone(self):
        with self._cond:
            self._waiting += 1
            while self._alone or self._shared:
                self._cond.wait()
            self._waiting -= 1
            self._alone = True
        try:
            yield
        finally:
            with self._cond:
                self._alone = False
                self._cond.notify_all()


def position_tables(answer: dict) -> list[dict[int, tuple[float, int]]]:
    """Per prompt position, {token id: (log-probability, rank)} as the server listed it (position 0: {})."""
    entries = answer["choices"][0].get("prompt_logprobs") or []
    return [
        {int(t): (float(v["logprob"]), int(v.get("rank") or 0)) for t, v in (entry or {}).items()}
        for entry in entries
    ]


def ranked(table: dict[int, tuple[float, int]], top_k: int) -> list[tuple[int, float]]:
    ranked = sorted(((t, lp) for t, (lp, rank) in table.items() if 0 < rank <= top_k), key=lambda x: -x[1])
    return [(t, math.exp(lp)) for t, lp in ranked[:top_k]]


def bucketed_kl(a: dict, b: dict, actual: int) -> tuple[float, float]:
    """(KL(a || b) over the tokens both list plus one bucket for all others, a's probability in that bucket)."""
    shared = (set(a) & set(b)) | ({actual} if actual in a and actual in b else set())
    pa = {t: math.exp(a[t][0]) for t in shared}
    pb = {t: math.exp(b[t][0]) for t in shared}
    kl = sum(p * (math.log(p) - math.log(pb[t])) for t, p in pa.items() if p > 0)
    rest_a = max(1.0 - sum(pa.values()), 0.0)
    rest_b = max(1.0 - sum(pb.values()), 1e-12)
    if rest_a > 0:
        kl += rest_a * (math.log(rest_a) - math.log(rest_b))
    return max(kl, 0.0), rest_a


def token_id(token: str) -> int:
    """A token as return_tokens_as_token_ids writes it. Example: _token_id("token_id:198") -> 198"""
    return int(token.rsplit(":", 1)[1])


def first_view(tokenizer, key: str, answer: dict, top_k: int) -> NextTokenView:
    """The next-token candidates of a completion's first position (its `logprobs`), most likely first."""
    logprobs = answer["choices"][0].get("logprobs") or {}
    first = (logprobs.get("top_logprobs") or [{}])[0] or {}
    best = sorted(((token_id(t), lp) for t, lp in first.items()), key=lambda x: -x[1])[:top_k]
    ids = [t for t, _ in best]
    return NextTokenView(key, [tokenizer.decode([t]) for t in ids], ids, [math.exp(lp) for _, lp in best])
