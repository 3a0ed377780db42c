"""The driver's side of a Ray sweep (`analyses.sweep_ray`): hand unfinished examples to the actors,
store each result as it arrives, requeue the examples of an actor that died, and retire actors
whose restarts are used up.
"""

from __future__ import annotations

import math
import time
import warnings
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .sweep import _is_done, _store
from .sweep_examples import BadExampleError, SweepExample, _guarded
from .sweep_keys import example_key

if TYPE_CHECKING:
    from .sweep_ray import RaySweepPool

MAX_ATTEMPTS = 3  # tries of one example whose worker dies before the sweep gives up on it
DEPTH = 2  # examples queued per actor, so it never waits for the driver between two
PROBE_S = 0.5  # seconds between probes of a restarting actor


def _todo(examples: list[SweepExample], done_dir: Path, bad: dict, skip_bad: bool) -> list[tuple[SweepExample, dict]]:
    """The unfinished examples with their content keys (the driver reads what keys need)."""
    todo = []
    for ex in examples:
        try:
            if not _is_done(done_dir, ex):
                todo.append((ex, _guarded("key", ex, lambda ex=ex: example_key(ex))))
        except BadExampleError as err:
            if not skip_bad:
                raise
            bad[ex.id] = {"id": ex.id, "origin": ex.origin, "error": str(err)}
    return todo


class _Run:
    """The driver's loop: keep every live actor `DEPTH` examples busy and store results as they come.

    An actor whose task failed rests until a probe (`pid`) answers: Ray refuses calls while it
    restarts, and an actor whose restarts are used up is retired. Its examples are queued again.
    """

    def __init__(self, pool: RaySweepPool, done_dir: Path, args: tuple, on_example: Callable | None, bad: dict,
                 stop_on_bad: bool):  # fmt: skip
        self.pool, self.done_dir, self.args, self.on_example = pool, done_dir, args, on_example
        self.bad, self.stop_on_bad = bad, stop_on_bad
        self.attempts: dict[str, int] = {}
        self.inflight: dict[Any, tuple[int, SweepExample, dict]] = {}
        self.probes: dict[Any, int] = {}  # probe ref -> actor
        self.resting: dict[int, float] = {}  # actor -> when to probe it next (inf while a probe is out)
        self.retired: set[int] = set()

    def _fill(self, queue: deque) -> None:
        for i, actor in enumerate(self.pool.actors):
            if i in self.retired or i in self.resting:
                continue
            busy = sum(1 for a, _, _ in self.inflight.values() if a == i)
            while queue and busy < DEPTH:
                ex, key = queue.popleft()
                self.inflight[actor.compute.remote(ex, *self.args)] = (i, ex, key)
                busy += 1

    def _probe(self) -> None:
        now = time.monotonic()
        for i, due in list(self.resting.items()):
            if due <= now:
                self.probes[self.pool.actors[i].pid.remote()] = i
                self.resting[i] = math.inf

    def go(self, todo: list, bar: Any) -> None:
        import ray

        queue, failure = deque(todo), None
        while self.inflight or (queue and failure is None):
            if failure is None:
                self._fill(queue)
            self._probe()
            if not self.inflight and not self.resting:
                raise RuntimeError(f"every Ray sweep worker died; {len(queue)} examples left (rerun to resume).")
            ready, _ = ray.wait(list(self.inflight) + list(self.probes), num_returns=1, timeout=PROBE_S)
            for ref in ready:
                if ref in self.probes:
                    self._probed(ref)
                else:
                    failure = self._finished(ref, queue, bar) or failure
        if failure is not None:
            raise failure

    def _probed(self, ref: Any) -> None:
        import ray

        i = self.probes.pop(ref)
        try:
            ray.get(ref)
            del self.resting[i]  # restarted: back to work
        except ray.exceptions.ActorUnavailableError:
            self.resting[i] = time.monotonic() + PROBE_S  # still restarting
        except ray.exceptions.RayActorError:
            del self.resting[i]
            self.retired.add(i)

    def _finished(self, ref: Any, queue: deque, bar: Any) -> BadExampleError | None:
        """Store a result, or requeue the example of a dead actor; a bad example when it should stop the sweep."""
        import ray

        i, ex, key = self.inflight.pop(ref)
        try:
            status, payload = ray.get(ref)
        except ray.exceptions.RayActorError as err:
            self._died(i, ex, key, queue, err)
            return None
        if status == "bad":
            self.bad[ex.id] = {"id": ex.id, "origin": ex.origin, "error": payload}
            return BadExampleError(payload) if self.stop_on_bad else None
        _store(self.done_dir, ex.id, key, payload)
        bar.update(1)
        if self.on_example is not None:
            self.on_example(ex)
        return None

    def _died(self, i: int, ex: SweepExample, key: dict, queue: deque, err: Exception) -> None:
        self.attempts[ex.id] = self.attempts.get(ex.id, 0) + 1
        if self.attempts[ex.id] >= MAX_ATTEMPTS:
            raise RuntimeError(f"example {ex.id} ({ex.origin or 'no origin'}) was lost with its Ray worker "
                               f"{MAX_ATTEMPTS} times; the last error: {err}") from err  # fmt: skip
        warnings.warn(f"a Ray sweep worker died ({type(err).__name__}); example {ex.id} is run again.", stacklevel=2)
        self.resting.setdefault(i, 0.0)
        queue.appendleft((ex, key))
