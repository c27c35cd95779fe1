"""The serving settings, the top-k KL bound and the request gate, without a server (tests/test_vllm.py starts
one)."""

import math
import random
import threading
import time

import pytest

from utils.core.errors import ProfileError
from utils.core.profiles import read_settings
from utils.core.serving import read_serving


def test_the_default_is_the_in_process_engine():
    serving = read_settings({}).serving
    assert serving.backend == "local" and not serving.remote and not serving.parity_available


def test_a_vllm_url_is_normalised_and_parity_follows_from_both_backends(tmp_path):
    env = {"LORA_LENS_VLLM_URL": "http://127.0.0.1:8000/v1/"}
    serving = read_serving(env, tmp_path)
    assert serving.vllm_url == "http://127.0.0.1:8000" and serving.parity_available
    remote = read_serving({**env, "LORA_LENS_BACKEND": "vllm"}, tmp_path)
    assert remote.remote and not remote.parity_available
    assert read_serving(
        {**env, "LORA_LENS_BACKEND": "vllm", "LORA_LENS_PARITY": "1"}, tmp_path
    ).parity_available
    assert remote.copy_dir == tmp_path / "scaled-adapters"


@pytest.mark.parametrize(
    "env, message",
    [
        ({"LORA_LENS_BACKEND": "triton"}, "LORA_LENS_BACKEND"),
        ({"LORA_LENS_BACKEND": "vllm"}, "needs LORA_LENS_VLLM_URL"),
        ({"LORA_LENS_VLLM_URL": "file:///etc/passwd"}, "not an http"),
        ({"LORA_LENS_VLLM_URL": "http://x", "LORA_LENS_VLLM_TIMEOUT_S": "0"}, "LORA_LENS_VLLM_TIMEOUT_S"),
        ({"LORA_LENS_VLLM_URL": "http://x", "LORA_LENS_VLLM_MODEL": "a b"}, "LORA_LENS_VLLM_MODEL"),
        ({"LORA_LENS_VLLM_URL": "http://x", "LORA_LENS_VLLM_CONCURRENCY": "many"}, "CONCURRENCY"),
    ],
)
def test_bad_serving_settings_are_refused_by_name(env, message, tmp_path):
    with pytest.raises(ProfileError, match=message):
        read_serving(env, tmp_path)


def _table(probabilities: dict[int, float], k: int) -> dict[int, tuple[float, int]]:
    ranked = sorted(probabilities.items(), key=lambda x: -x[1])
    return {t: (math.log(p), rank + 1) for rank, (t, p) in enumerate(ranked[:k])}


def test_the_top_k_kl_is_a_lower_bound_and_exact_with_everything_listed():
    from utils.serving.answers import bucketed_kl as _bucketed_kl

    rng = random.Random(0)
    for _ in range(200):
        vocab = 50
        a = [rng.random() ** 4 for _ in range(vocab)]
        b = [x * rng.uniform(0.2, 5) for x in a]
        a = {i: x / sum(a) for i, x in enumerate(a)}
        b = {i: x / sum(b) for i, x in enumerate(b)}
        exact = sum(p * math.log(p / b[t]) for t, p in a.items())
        actual = rng.randrange(vocab)
        table_a, table_b = _table(a, 10), _table(b, 10)
        table_a.setdefault(actual, (math.log(a[actual]), 99))
        table_b.setdefault(actual, (math.log(b[actual]), 99))
        bound, unseen = _bucketed_kl(table_a, table_b, actual)
        assert bound <= exact + 1e-12 and 0 <= unseen <= 1
        full, rest = _bucketed_kl(_table(a, vocab), _table(b, vocab), actual)
        assert full == pytest.approx(exact, abs=1e-9) and rest == pytest.approx(0, abs=1e-9)


def test_a_request_that_runs_alone_waits_for_the_others_and_holds_new_ones_back():
    from utils.serving.answers import Gate as _Gate

    gate, log = _Gate(), []
    first_in, release = threading.Event(), threading.Event()

    def shared(name, hold: threading.Event):
        with gate.shared():
            log.append(f"{name} in")
            first_in.set()
            hold.wait(timeout=60)
            log.append(f"{name} out")

    def alone():
        with gate.alone():
            log.append("alone in")
            log.append("alone out")

    a = threading.Thread(target=shared, args=("a", release))
    a.start()
    first_in.wait()
    b = threading.Thread(target=alone)
    b.start()
    while not gate._waiting:  # the lone request is queued behind a
        time.sleep(0.001)
    done = threading.Event()
    done.set()
    c = threading.Thread(target=shared, args=("c", done))
    c.start()
    release.set()
    for t in (a, b, c):
        t.join()
    assert log == ["a in", "a out", "alone in", "alone out", "c in", "c out"]
