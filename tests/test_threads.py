"""One model shared by several threads: each call sees only its own hooks and fills only its own cache."""

from __future__ import annotations

import copy
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import pytest
import torch

from hooked_llava.testing import random_images

QUESTIONS = [
    "What is the color of the circle?",
    "Is the square red or blue?",
    "Which shape is on the left side of the picture?",
    "What?",
]


def _shift(x, hook, value):
    time.sleep(0.001)  # give other threads a chance to run inside this call
    return x + value


def _cached(name):
    return name.endswith(("hook_resid_pre", "hook_pattern", "hook_embed"))


def _job(model, inputs, k, i):
    """Call `i` of thread `k`: alternately a hooked run and a cached run, each unique to (k, i)."""
    with torch.no_grad():
        if i % 2 == 0:
            hooks = [(f"blocks.{k % 2}.hook_resid_pre", partial(_shift, value=float(k + 1 + i)))]
            return model.run_with_hooks(inputs[k], fwd_hooks=hooks), None
        logits, cache = model.run_with_cache(inputs[k], names_filter=_cached)
        return logits, {name: cache[name] for name in cache.keys()}


def _same(a, b):
    assert torch.equal(a[0], b[0])
    assert (a[1] is None) == (b[1] is None)
    if a[1] is not None:
        assert a[1].keys() == b[1].keys()
        for name in a[1]:
            assert a[1][name].shape == b[1][name].shape, name
            assert torch.equal(a[1][name], b[1][name]), name


@pytest.fixture(scope="module")
def per_thread(tiny):
    model, _ = tiny
    images = random_images(4, seed=5)
    return [model.prepare(images=[im], questions=[q]) for im, q in zip(images, QUESTIONS, strict=True)]


def test_four_threads_give_the_sequential_results(tiny, per_thread):
    model, _ = tiny
    lengths = {x.input_ids.shape[1] for x in per_thread}
    assert len(lengths) == 4, "prompts of different lengths make leaked cache entries visible"
    expected = {(k, i): _job(model, per_thread, k, i) for k in range(4) for i in range(8)}
    start = threading.Barrier(4)

    def worker(k):
        start.wait()
        return [_job(model, per_thread, k, i) for i in range(8)]

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(worker, range(4)))
    for k in range(4):
        for i in range(8):
            _same(results[k][i], expected[k, i])
            if i % 2:  # the cache holds this prompt's activations, at its own length
                assert results[k][i][1]["blocks.0.hook_resid_pre"].shape[1] == per_thread[k].input_ids.shape[1]
    assert not any(hp.has_hooks() for hp in model.hook_dict.values())


def test_hooks_context_keeps_other_threads_out(tiny, per_thread):
    model, _ = tiny
    x = per_thread[0]
    with torch.no_grad():
        clean = model(x)
    entered, other = threading.Event(), {}

    def other_thread():
        entered.wait()
        with torch.no_grad():
            other["logits"] = model(x)

    thread = threading.Thread(target=other_thread)
    thread.start()
    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", lambda t, hook: t * 0)]):
        entered.set()
        time.sleep(0.05)  # without the lock the other thread's forward would run under this hook
        with torch.no_grad():
            hooked = model(x)
    thread.join()
    assert not torch.equal(hooked, clean)
    assert torch.equal(other["logits"], clean)


def test_an_exception_in_a_hook_releases_the_lock_and_the_hooks(tiny, per_thread):
    model, _ = tiny

    def boom(t, hook):
        raise RuntimeError("boom")

    def failing():
        with pytest.raises(RuntimeError, match="boom"):
            model.run_with_hooks(per_thread[1], fwd_hooks=[("blocks.1.hook_resid_mid", boom)])

    thread = threading.Thread(target=failing)
    thread.start()
    thread.join()
    assert model.lock.acquire(blocking=False), "the failed call left the lock held"
    model.lock.release()
    assert not any(hp.has_hooks() for hp in model.hook_dict.values())
    with ThreadPoolExecutor(1) as pool:  # another thread can use the model
        assert pool.submit(lambda: model(per_thread[1]).shape).result() == model(per_thread[1]).shape


def test_a_copied_model_has_its_own_lock(tiny, per_thread):
    model, _ = tiny
    clone = copy.deepcopy(model)
    assert clone.lock is not model.lock
    with model.lock, ThreadPoolExecutor(1) as pool:  # the clone is usable while the original is busy
        with torch.no_grad():
            assert torch.equal(pool.submit(clone, per_thread[2]).result(), model(per_thread[2]))
