"""Study B's sweep sharded over Ray actors, writing the same resumable store as `run_sweep`.

Each actor loads its own copy of the model from the name or path the driver was given (and the
same `from_pretrained` arguments) on its own device: one GPU per actor where the cluster has GPUs,
the CPU otherwise. The driver keeps the store: it claims the folder (`settings.json`, with the
fingerprint the actors report), skips finished examples, hands the others out, and writes every
result that comes back with the same atomic writes as the single-process sweep. A cluster run
therefore resumes a local one and the other way round, and the tables are identical.

Faults lose nothing. An actor that dies (killed, out of memory) is restarted by Ray; the examples it
held are handed out again (a result is stored once, when it arrives, so none is counted twice). An
example that kills its worker `MAX_ATTEMPTS` times stops the sweep naming it. A killed driver is
rerun on the same folder and resumes from the store. Workers read example images themselves: a GQA
CSV's image folder must be readable on every node (a shared file system, as on a SLURM cluster).

The driver's loop is `analyses.sweep_ray_run`. Ray is imported only by these two modules, and only
when a sweep asks for it (`pip install -e ".[ray]"`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from .sweep import DEFAULT_FLOWS, _compute, collect, sweep_settings
from .sweep_examples import BadExampleError, SweepExample, _check_ids
from .sweep_keys import claim_folder
from .sweep_ray_run import DEPTH, MAX_ATTEMPTS, PROBE_S, _Run, _todo

__all__ = ["DEPTH", "MAX_ATTEMPTS", "PROBE_S", "WAIT_S", "RaySweepPool", "run_sweep_ray"]

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
        from .flows import resolve_flows

        examples, flows = list(examples), list(flows or DEFAULT_FLOWS)
        resolve_flows(flows)
        _check_ids(examples)
        claim_folder(out_dir, self.settings(flows, window, lens, data), force)
        done_dir = Path(out_dir) / "examples"
        done_dir.mkdir(parents=True, exist_ok=True)
        bad: dict[str, dict[str, str]] = {}
        todo = _todo(examples, done_dir, bad, bad_rows is not None)
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
