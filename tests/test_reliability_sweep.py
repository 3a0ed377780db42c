"""A sweep folder belongs to one run at a time (an OS file lock, refused with a message naming the
holder, released when the holder is killed), two sweeps raced into one folder leave tables that match
its settings.json, and a resume recomputes every damaged, foreign or unreadable stored example
instead of crashing or counting it as done."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pandas as pd
import pytest
import torch

from analyses.information_flow.attention_knockout import knockout_sweep
from analyses.information_flow.keys import SweepFolderError, write_atomic
from analyses.information_flow.lock import SweepLockedError, sweep_lock
from analyses.information_flow.sweep import SweepExample, answer_token, collect, run_sweep
from hooked_llava.testing import random_images

ROOT = Path(__file__).resolve().parents[1]
FLOWS = ["image->last"]
PROMPT = "USER: <image>\nWhat is the color of the circle?\nASSISTANT:"


def _predicted(model, image, prompt=PROMPT):
    inputs = model.prepare(images=[image], prompts=[prompt])
    with torch.no_grad():
        return model.to_string([int(model(inputs)[0, -1].argmax())]).strip()


@pytest.fixture(scope="module")
def examples(tiny):
    """Three examples labelled with the tiny model's own answers, so each is swept (knockout rows)."""
    model, _ = tiny
    return [SweepExample(f"ex-{i}", "A", PROMPT, _predicted(model, im), im, [(0, 0, 16, 16)])
            for i, im in enumerate(random_images(3, seed=21))]  # fmt: skip


def _direct(model, ex, window):
    """The example's knockout computed without the sweep (the independent computation)."""
    inputs = model.prepare(images=[ex.load_image()], prompts=[ex.prompt], boxes=[ex.boxes])
    return knockout_sweep(model, inputs, FLOWS, window=window, answer=answer_token(model, ex.answer), progress=False)


def test_a_folder_in_use_is_refused_from_another_thread_and_released_after(tiny, examples, tmp_path):
    model, _ = tiny
    held, release = threading.Event(), threading.Event()

    def hold():
        with sweep_lock(tmp_path):
            held.set()
            release.wait()

    thread = threading.Thread(target=hold)
    thread.start()
    held.wait()
    try:
        with pytest.raises(SweepLockedError, match=rf"{tmp_path} is in use by another sweep \(process {os.getpid()}"):
            run_sweep(model, examples[:1], tmp_path, flows=FLOWS, window=1, progress=False)
        assert not (tmp_path / "settings.json").exists() and not (tmp_path / "examples").exists()
    finally:
        release.set()
        thread.join()
    tables = run_sweep(model, examples[:1], tmp_path, flows=FLOWS, window=1, progress=False)
    assert tables["examples"]["id"].tolist() == ["ex-0"]


HOLD = """
import sys
from analyses.information_flow.lock import sweep_lock
with sweep_lock(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_a_killed_holder_leaves_no_stale_lock(tiny, examples, tmp_path):
    model, _ = tiny
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SweepLockedError, match=f"process {holder.pid} on"):
            run_sweep(model, examples[:1], tmp_path, flows=FLOWS, window=1, progress=False)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    tables = run_sweep(model, examples[:1], tmp_path, flows=FLOWS, window=1, progress=False)
    assert tables["examples"]["id"].tolist() == ["ex-0"]


RACER = """
import sys, time
from pathlib import Path
import analyses.information_flow.sweep as sweep
from hooked_llava.cli import main as cli
from hooked_llava.model.hooked_llava import HookedLlava
from hooked_llava.testing import tiny_model

torch_model = tiny_model(seed=0)[0]
HookedLlava.from_pretrained = classmethod(lambda cls, name, **kw: torch_model)
one = sweep._sweep_one
def slow(*args, **kwargs):  # each example takes a while, so that the two runs overlap
    one(*args, **kwargs)
    time.sleep(0.2)
sweep._sweep_one = slow
csv, images, window, me = sys.argv[1:5]
codes = []
for folder in sys.argv[5:]:
    Path(f"{folder}.ready.{me}").touch()
    while len(list(Path(folder).parent.glob(Path(folder).name + ".ready.*"))) < 2:
        time.sleep(0.005)
    codes.append(cli.main(["sweep", "--csv", csv, "--images", images, "--flows", "image->last", "--window", window,
                           "--out", folder]))
print(codes)
"""


def _task(model, tmp_path, n=3):
    """A GQA task file whose answers are the tiny model's own (all swept), and its images (lossless PNGs)."""
    from analyses.information_flow.examples import STUDY_B_TEMPLATE

    folder = tmp_path / "images"
    folder.mkdir()
    question = "What is the color of the circle?"
    rows = []
    for i, image in enumerate(random_images(n, seed=31)):
        image.save(folder / f"im{i}.png")
        answer = _predicted(model, image, STUDY_B_TEMPLATE.format(question=question))
        rows.append(
            {
                "question_id": f"q{i}",
                "img_id": f"im{i}",
                "question": question,
                "answer": answer,
                "central object x": 0,
                "central object y": 0,
                "central object w": 8,
                "central object h": 8,
            }
        )
    pd.DataFrame(rows).to_csv(tmp_path / "GQA_task_Colour.csv", index=False)
    return tmp_path / "GQA_task_Colour.csv", folder


def test_two_sweeps_raced_into_one_folder_one_is_refused_and_the_tables_match_the_settings(tiny, tmp_path):
    """Two processes (windows 1 and 2) start together into the same folder, three times over: in each
    round one finishes (0) and the other is refused (2, in use or other settings), and the folder's
    knockout.csv is exactly the knockout of the window its settings.json records."""
    from analyses.information_flow.gqa import gqa_examples

    model, _ = tiny
    csv, images = _task(model, tmp_path)
    folders = [str(tmp_path / f"round{r}") for r in range(3)]
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(csv), str(images), str(w), str(w), *folders],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for w in (1, 2)]  # fmt: skip
    outputs = [racer.communicate() for racer in racers]
    codes = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    refusals = [line for _, err in outputs for line in err.splitlines() if line.startswith("hooked-llava sweep")]
    assert len(refusals) == 3 and all("in use by another sweep" in r or "other settings" in r for r in refusals)
    examples = gqa_examples(csv, images)
    direct = {w: pd.concat([_direct(model, ex, w).assign(id=ex.id) for ex in examples]) for w in (1, 2)}
    for r, folder in enumerate(folders):
        assert sorted([codes[0][r], codes[1][r]]) == [0, 2], codes
        window = json.loads((Path(folder) / "settings.json").read_text())["window"]
        assert window == (1, 2)[[codes[0][r], codes[1][r]].index(0)]  # the winner's settings
        knock = pd.read_csv(Path(folder) / "knockout.csv")
        assert knock["id"].tolist() == direct[window]["id"].tolist()
        torch.testing.assert_close(torch.tensor(knock["p_blocked"].to_numpy(), dtype=torch.float32),
                                   torch.tensor(direct[window]["p_blocked"].to_numpy()))  # fmt: skip


def test_temporary_files_have_unique_names_and_none_is_left(tmp_path, monkeypatch):
    names = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (names.append(Path(src).name), real(src, dst)))
    for text in ("one", "two"):
        write_atomic(tmp_path / "a.examples.csv", text)
    assert len(set(names)) == 2 and all(n.startswith(".a.examples.csv.") for n in names)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.examples.csv"]


def _damage(folder, how):
    done = folder / "examples"
    if how == "truncated table":
        path = done / "ex-1.knockout.csv"
        path.write_bytes(path.read_bytes()[:40])
    elif how == "empty table":
        (done / "ex-1.examples.csv").write_text("")
    elif how == "truncated key":
        path = done / "ex-1.key.json"
        path.write_bytes(path.read_bytes()[:10])
    elif how == "missing table":
        (done / "ex-1.knockout.csv").unlink()
    elif how == "other settings":  # an example copied from a sweep with window 2
        for path in (folder.parent / "window2" / "examples").glob("ex-1.*"):
            (done / path.name).write_bytes(path.read_bytes())


@pytest.mark.parametrize("how", ["truncated table", "empty table", "truncated key", "missing table",
                                 "other settings"])  # fmt: skip
def test_a_damaged_stored_example_is_recomputed(tiny, examples, tmp_path, how):
    model, _ = tiny
    whole = run_sweep(model, examples, tmp_path / "out", flows=FLOWS, window=1, progress=False)
    run_sweep(model, examples, tmp_path / "window2", flows=FLOWS, window=2, progress=False)
    _damage(tmp_path / "out", how)
    with pytest.warns(UserWarning, match="example ex-1 (has a damaged stored result|was computed with other settings)"):
        assert "ex-1" not in collect(tmp_path / "out")["examples"]["id"].tolist()  # left out, not a crash
    recomputed = []
    with pytest.warns(UserWarning, match="example ex-1 .*recomputing it"):
        again = run_sweep(model, examples, tmp_path / "out", flows=FLOWS, window=1, progress=False,
                          on_example=lambda ex: recomputed.append(ex.id))  # fmt: skip
    assert recomputed == ["ex-1"]
    for name in ("examples", "knockout"):
        pd.testing.assert_frame_equal(again[name], whole[name])
    mine = again["knockout"][again["knockout"]["id"] == "ex-1"]
    torch.testing.assert_close(torch.tensor(mine["p_blocked"].to_numpy(), dtype=torch.float32),
                               torch.tensor(_direct(model, examples[1], 1)["p_blocked"].to_numpy()))  # fmt: skip


@pytest.mark.parametrize("content", ["", '{"window": 1, "flo', "[1, 2]", "\xff\xfe"])
def test_a_damaged_settings_file_is_a_clear_error_and_force_starts_again(tiny, examples, tmp_path, content):
    model, _ = tiny
    run_sweep(model, examples[:1], tmp_path, flows=FLOWS, window=1, progress=False)
    (tmp_path / "settings.json").write_bytes(content.encode("latin-1"))
    with pytest.raises(SweepFolderError, match=r"settings.json is damaged .*use --force"):
        run_sweep(model, examples[:1], tmp_path, flows=FLOWS, window=1, progress=False)
    recomputed = []
    run_sweep(model, examples[:1], tmp_path, flows=FLOWS, window=1, progress=False, force=True,
              on_example=lambda ex: recomputed.append(ex.id))  # fmt: skip
    assert recomputed == ["ex-0"] and json.loads((tmp_path / "settings.json").read_text())["window"] == 1


@pytest.mark.parametrize("flows, window, message", [
    (["image->lats"], 9, "unknown flow 'image->lats': unknown role 'lats'"),
    (FLOWS, 0, "window must be in 1 or more, got 0"),
    (FLOWS, -3, "window must be in 1 or more, got -3"),
])  # fmt: skip
def test_bad_flows_and_windows_are_refused_before_the_folder_is_claimed(tiny, examples, tmp_path, flows, window,
                                                                        message):  # fmt: skip
    model, _ = tiny
    with pytest.raises(ValueError, match=message):
        run_sweep(model, examples[:1], tmp_path, flows=flows, window=window, progress=False)
    assert not (tmp_path / "settings.json").exists()


def test_an_id_that_cannot_name_a_file_is_a_bad_example(tiny, examples, tmp_path):
    model, _ = tiny
    bad = SweepExample("a/b", "A", PROMPT, "red", examples[0].image, [(0, 0, 8, 8)], "tasks.csv, line 3")
    listed = []
    tables = run_sweep(model, [bad, examples[0]], tmp_path, flows=FLOWS, window=1, progress=False, bad_rows=listed)
    assert [r["id"] for r in listed] == ["a/b"] and "cannot name a file (it holds '/')" in listed[0]["error"]
    assert tables["examples"]["id"].tolist() == ["ex-0"] and not (tmp_path / "examples" / "a").exists()
