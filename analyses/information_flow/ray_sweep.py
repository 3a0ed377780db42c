"""Study B's sweep sharded over Ray actors, writing the same resumable store as `run_sweep`.

Each actor loads its own copy of the model from the name or path the driver was given (and the
same `from_pretrained` arguments) on its own device: one GPU per actor where the cluster has GPUs,
the CPU otherwise. The driver keeps the store: it takes the folder's lock (as `run_sweep` does),
claims the folder (`settings.json`, with the fingerprint the actors report), skips finished
examples, hands the others out, and writes every result that comes back with the same atomic
writes as the single-process sweep. A cluster run therefore resumes a local one and the other way
round, and the tables are identical.

Faults lose nothing. An actor that dies (killed, out of memory) is restarted by Ray; the examples it
held are handed out again (a result is stored once, when it arrives, so none is counted twice). An
example that kills its worker `MAX_ATTEMPTS` times stops the sweep naming it. A killed driver is
rerun on the same folder and resumes from the store. Workers read example images themselves: a GQA
CSV's image folder must be readable on every node (a shared file system, as on a SLURM cluster).

The driver's loop (`_Run`) is at the end of this module. Ray is imported only by this module, and only
when a sweep asks for it (`pip install -e ".[ray]"`).
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from analyses.information_flow.examples import BadExampleError, SweepExample, _check_ids
from analyses.information_flow.keys import claim_folder, settings_digest
from analyses.information_flow.lock import sweep_lock
from analyses.information_flow.sweep import (
    DEFAULT_FLOWS,
    _compute,
    _is_done,
    _key,
    _store,
    check_sweep_arguments,
    collect,
    sweep_settings,
)

__all__ = ["DEPTH", "MAX_ATTEMPTS", "PROBE_S", "WAIT_S", "RaySweepPool", "run_sweep_ray"]

MAX_ATTEMPTS = 3  # tries of one example whose worker dies before the sweep gives up on it
DEPTH = 2  # examples queued per actor, so it never waits for the driver between two
PROBE_S = 0.5  # seconds between probes of a restarting actor
WAIT_S = 600  # longest wait for restarting actors before `pids` or `settings` gives up


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as err:
        raise ImportError(
            'sweeps on Ray need the ray extra: pip install -e ".[ray]" (or pip install "ray>=2.9").'
        ) from err
    return ray


class _Worker:
    """What runs inside one Ray actor: a model on the actor's device, one example at a time."""

    def __init__(self, model: str, load: Mapping[str, Any]):
        import ray
        import torch

        from hooked_llava import HookedLlava

        device = "cuda" if ray.get_gpu_ids() else "cpu"
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        torch.set_num_threads(max(1, int(cpus)))  # its share of the node: workers do not oversubscribe it
        self.model = HookedLlava.from_pretrained(model, device=device, **dict(load))
        torch.set_grad_enabled(False)

    def settings(self, flows: list[str], window: int, lens: bool, data: Mapping[str, Any] | None) -> dict:
        return sweep_settings(self.model, flows, window, lens, data)

    def compute(self, ex: SweepExample, flows: list[str], window: int, lens: bool) -> tuple[str, Any]:
        """("ok", tables) or ("bad", message) for an example that cannot be swept."""
        try:
            return "ok", _compute(self.model, ex, flows, window, lens)
        except BadExampleError as err:
            return "bad", str(err)

    def pid(self) -> int:
        return os.getpid()


class RaySweepPool:
    """Ray actors that each hold one model; `sweep` runs a resumable sweep on them.

    Args:
        model: a shipped name, local directory or hub id, loaded by every actor with `from_pretrained`.
        workers: number of actors (default: one per GPU of the cluster, else 1).
        address: a Ray cluster address; None or True: `RAY_ADDRESS` or a new local cluster. A process
            that already runs Ray (`ray.init` was called) uses its session.
        load: further `from_pretrained` arguments (dtype, fold_ln, ...); the device is the actor's.
        gpus_per_worker: default 1 when the cluster has GPUs, else 0.
        cpus_per_worker: CPUs reserved per actor (torch uses that many threads).
        max_restarts: how often Ray restarts a dead actor.

    Example:
        >>> with RaySweepPool("shapes-llava", workers=2) as pool:
        ...     tables = pool.sweep(shapes_examples(5), "runs/shapes")  # same tables as run_sweep
    """

    def __init__(self, model: str | Path, workers: int | None = None, address: str | bool | None = None,
                 load: Mapping[str, Any] | None = None, gpus_per_worker: float | None = None,
                 cpus_per_worker: float = 1.0, max_restarts: int = 4):  # fmt: skip
        if workers is not None and workers < 1:
            raise ValueError(f"workers must be at least 1 (got {workers}).")
        ray = _import_ray()
        self._started = not ray.is_initialized()
        if self._started:
            ray.init(address=None if address in (None, True) else str(address), include_dashboard=False)
        gpus = ray.cluster_resources().get("GPU", 0)
        gpus_per_worker = (1 if gpus else 0) if gpus_per_worker is None else gpus_per_worker
        workers = workers or (int(gpus) if gpus else 1)
        actor = ray.remote(_Worker).options(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker,
                                            max_restarts=max_restarts, max_task_retries=0)  # fmt: skip
        self.actors = [actor.remote(str(model), dict(load or {})) for _ in range(workers)]

    def __enter__(self) -> RaySweepPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Stop the actors (and the local cluster this pool started)."""
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        if self._started:
            ray.shutdown()

    def pids(self) -> list[int]:
        """The process id of every actor (tests kill one to check that nothing is lost)."""
        return self._ask("pid")

    def _ask(self, method: str, *args: Any) -> list:
        """Call `method` on every actor, waiting (up to WAIT_S) for any that is restarting."""
        import ray

        deadline = time.monotonic() + WAIT_S
        while True:
            try:
                return ray.get([getattr(actor, method).remote(*args) for actor in self.actors])
            except ray.exceptions.ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(PROBE_S)

    def settings(self, flows: list[str], window: int, lens: bool, data: Mapping[str, Any] | None) -> dict:
        """The sweep settings as the actors see them; actors that loaded different models are an error."""
        found = self._ask("settings", flows, window, lens, data)
        fingerprints = sorted({s["model"] for s in found})
        if len(fingerprints) > 1:
            raise RuntimeError(f"Ray workers loaded different models (fingerprints {fingerprints}): "
                               "give every node the same checkpoint.")  # fmt: skip
        return found[0]

    def sweep(self, examples: Iterable[SweepExample], out_dir: str | Path, flows: list[str] | None = None,
              window: int = 9, lens: bool = False, progress: bool = True,
              on_example: Callable[[SweepExample], None] | None = None, data: Mapping[str, Any] | None = None,
              force: bool = False, bad_rows: list[dict[str, str]] | None = None) -> dict[str, pd.DataFrame]:  # fmt: skip  # noqa: E501
        """`run_sweep` on the actors: same arguments (but the model), same store, same tables.
        `bad_rows` are listed in example order; without it, the first bad example raises
        `BadExampleError` once the examples in flight are stored."""
        examples, flows = list(examples), list(flows or DEFAULT_FLOWS)
        check_sweep_arguments(flows, window)
        _check_ids(examples)
        with sweep_lock(out_dir):  # the same lock as run_sweep: one sweep per folder
            settings = self.settings(flows, window, lens, data)
            claim_folder(out_dir, settings, force)
            done_dir = Path(out_dir) / "examples"
            done_dir.mkdir(parents=True, exist_ok=True)
            bad: dict[str, dict[str, str]] = {}
            todo = _todo(examples, done_dir, settings_digest(settings), bad, bad_rows is not None)
            run = _Run(self, done_dir, (flows, window, lens), on_example, bad, stop_on_bad=bad_rows is None)
            with tqdm(total=len(examples), initial=len(examples) - len(todo), desc="sweep (ray)",
                      disable=not progress) as bar:  # fmt: skip
                run.go(todo, bar)
            if bad_rows is not None:
                bad_rows.extend(bad[ex.id] for ex in examples if ex.id in bad)
            return collect(out_dir, [ex.id for ex in examples])


def run_sweep_ray(model: str | Path, examples: Iterable[SweepExample], out_dir: str | Path, *,
                  workers: int | None = None, address: str | bool | None = None,
                  load: Mapping[str, Any] | None = None, cpus_per_worker: float = 1.0,
                  **sweep: Any) -> dict[str, pd.DataFrame]:  # fmt: skip
    """`run_sweep` sharded over `workers` Ray actors that each load `model` (see `RaySweepPool`);
    the other keyword arguments are `run_sweep`'s. The actors stop when it returns.

    Example:
        >>> tables = run_sweep_ray("shapes-llava", shapes_examples(5), "runs/shapes", workers=2)
    """
    with RaySweepPool(model, workers=workers, address=address, load=load, cpus_per_worker=cpus_per_worker) as pool:
        return pool.sweep(examples, out_dir, **sweep)


# --- the driver's loop: hand out examples, store results, requeue what a dead actor held -----------------------


def _todo(examples: list[SweepExample], done_dir: Path, settings: str, bad: dict,
          skip_bad: bool) -> list[tuple[SweepExample, dict]]:  # fmt: skip
    """The unfinished examples with their keys (the driver reads what keys need)."""
    todo = []
    for ex in examples:
        try:
            key = _key(ex, settings)
            if not _is_done(done_dir, ex, key):
                todo.append((ex, key))
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
