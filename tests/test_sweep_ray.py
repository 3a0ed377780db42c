"""Sweeps sharded over Ray actors (`analyses.information_flow.ray_sweep`): on a local cluster, the tables equal the
single-process sweep's; a cluster run resumes a local one and the other way round; a killed worker
loses nothing; a killed driver is rerun and recomputes nothing it finished. Skipped without ray."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

ray = pytest.importorskip("ray")

from analyses.information_flow.gqa import ImageFile  # noqa: E402
from analyses.information_flow.ray_sweep import RaySweepPool  # noqa: E402
from analyses.information_flow.sweep import BadExampleError, SweepExample, collect, run_sweep, shapes_examples  # noqa: E402
from hooked_llava import HookedLlava  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FLOWS, WINDOW, SEED = ["image->last", "question->last"], 3, 5
SETTINGS = dict(flows=FLOWS, window=WINDOW, data={"source": "shapes", "seed": SEED})  # what the CLI records


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster: two CPUs for the shared pool, two for the killed driver's own workers."""
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def pool(cluster):
    with RaySweepPool("shapes-llava", workers=2) as workers:
        yield workers


@pytest.fixture(scope="module")
def examples():
    return shapes_examples(2, seed=SEED)  # 14 examples, all answered correctly by the shipped model


@pytest.fixture(scope="module")
def single(examples, tmp_path_factory):
    """The single-process sweep: its tables and its folder."""
    out = tmp_path_factory.mktemp("single")
    model = HookedLlava.from_pretrained("shapes-llava")
    return run_sweep(model, examples, out, progress=False, **SETTINGS), out


def _assert_same(tables, reference):
    for name in ("examples", "knockout"):
        pd.testing.assert_frame_equal(tables[name], reference[name])


def _recorder():
    """A list, and an `on_example` callback that appends each finished example's id to it."""
    ids: list[str] = []
    return ids, lambda ex: ids.append(ex.id)


def _forget(out, ids):
    for path in (Path(out) / "examples").iterdir():
        if path.name.split(".")[0] in ids:
            path.unlink()


def test_two_workers_give_the_single_process_tables_and_resume_each_other(pool, examples, single, tmp_path):
    reference, local_dir = single
    assert len(reference["knockout"]) == len(examples) * len(FLOWS) * 8  # every example swept, 8 layers
    tables = pool.sweep(examples, tmp_path / "ray", progress=False, **SETTINGS)
    _assert_same(tables, reference)
    assert (tmp_path / "ray" / "settings.json").read_text() == (local_dir / "settings.json").read_text()
    shutil.copytree(local_dir, tmp_path / "from-local")  # a cluster run resumes a local one ...
    forgotten = {ex.id for ex in examples[3:6]}
    _forget(tmp_path / "from-local", forgotten)
    recomputed, record = _recorder()
    tables = pool.sweep(examples, tmp_path / "from-local", progress=False, on_example=record, **SETTINGS)
    assert sorted(recomputed) == sorted(forgotten)
    _assert_same(tables, reference)
    _forget(tmp_path / "ray", {examples[0].id})  # ... and the other way round
    recomputed, record = _recorder()
    model = HookedLlava.from_pretrained("shapes-llava")
    tables = run_sweep(model, examples, tmp_path / "ray", progress=False, on_example=record, **SETTINGS)
    assert recomputed == [examples[0].id]
    _assert_same(tables, reference)


def test_a_killed_worker_loses_nothing(pool, examples, single, tmp_path):
    pids, finished = pool.pids(), []

    def kill_first_worker(ex):
        finished.append(ex.id)
        if len(finished) == 1:  # both workers still hold examples: the killed one's go to the other
            os.kill(pids[0], signal.SIGKILL)

    with pytest.warns(UserWarning, match=r"a Ray sweep worker died .* is run again"):
        tables = pool.sweep(examples, tmp_path, progress=False, on_example=kill_first_worker, **SETTINGS)
    assert sorted(finished) == sorted(ex.id for ex in examples)  # each stored once
    assert len(list((tmp_path / "examples").glob("*.key.json"))) == len(examples)
    _assert_same(tables, single[0])


def test_the_driver_takes_the_folder_lock(pool, examples, tmp_path):
    """A folder in use by another sweep is refused by the Ray driver too, before anything is written."""
    import threading

    from analyses.information_flow.lock import SweepLockedError, sweep_lock

    held, release = threading.Event(), threading.Event()

    def hold():
        with sweep_lock(tmp_path):
            held.set()
            release.wait()

    thread = threading.Thread(target=hold)
    thread.start()
    held.wait()
    try:
        with pytest.raises(SweepLockedError, match="is in use by another sweep"):
            pool.sweep(examples[:1], tmp_path, progress=False, **SETTINGS)
        assert not (tmp_path / "settings.json").exists()
    finally:
        release.set()
        thread.join()


def test_a_bad_example_on_a_worker_is_listed_or_stops_the_sweep(pool, examples, single, tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")  # the driver keys it; the worker cannot decode it
    bad = SweepExample("bad", "Colour", examples[0].prompt, "red", ImageFile(tmp_path / "broken.jpg"), [], "row 9")
    listed: list[dict] = []
    tables = pool.sweep([*examples[:3], bad, examples[3]], tmp_path / "a", progress=False, bad_rows=listed, **SETTINGS)
    assert [row["id"] for row in listed] == ["bad"] and "row 9: the image could not be read" in listed[0]["error"]
    ids = [ex.id for ex in examples[:4]]
    _assert_same(tables, {n: t[t["id"].isin(ids)].reset_index(drop=True) for n, t in single[0].items() if len(t)})
    with pytest.raises(BadExampleError, match="row 9: the image could not be read"):
        pool.sweep([bad, *examples[:2]], tmp_path / "b", progress=False, **SETTINGS)
    assert set(collect(tmp_path / "b")["examples"]["id"]) <= {ex.id for ex in examples[:2]}  # none half-written


def test_a_killed_driver_resumes_without_recomputing(cluster, pool, examples, single, tmp_path):
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "hooked_llava.cli.main", "sweep", "--ray", cluster, "--workers", "2", "--shapes", "2",
            "--seed", str(SEED), "--window", str(WINDOW), "--flows", ",".join(FLOWS), "--out", str(out)]  # fmt: skip
    driver = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_examples(out / "examples", 2, driver)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    done = {p.name[: -len(".key.json")]: p.stat().st_mtime_ns for p in (out / "examples").glob("*.key.json")}
    assert 2 <= len(done) < len(examples), "the driver should be killed mid-sweep"
    recomputed, record = _recorder()
    tables = pool.sweep(examples, out, progress=False, on_example=record, **SETTINGS)
    assert sorted(recomputed) == sorted(ex.id for ex in examples if ex.id not in done)
    assert {i: (out / "examples" / f"{i}.key.json").stat().st_mtime_ns for i in done} == done
    _assert_same(tables, single[0])
    _assert_same(collect(out, [ex.id for ex in examples]), single[0])


def _wait_for_examples(folder, n, driver, timeout=240):
    """Poll until `n` examples are stored (the driver is then killed while it still has work)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if folder.is_dir() and len(list(folder.glob("*.key.json"))) >= n:  # the key file marks an example done
            return
        assert driver.poll() is None, "the driver exited before it stored any example"
        time.sleep(0.02)
    raise AssertionError(f"no {n} examples stored in {timeout} s")
