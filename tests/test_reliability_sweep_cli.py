"""`hooked-llava sweep` mistakes end as `explain`'s do: one line on stderr naming the problem, exit
status 2, found before the model loads where they can be; damaged stored examples are recomputed."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from analyses.information_flow.lock import sweep_lock
from hooked_llava.cli import main as cli
from hooked_llava.model.hooked_llava import HookedLlava


def _never_load(cls, name, **kwargs):
    raise AssertionError("the model was loaded before the mistake was reported")


def _one_line_error(capsys, argv, expected):
    assert cli.main(["sweep", *map(str, argv)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("hooked-llava sweep: error: ") and expected in err, err
    return err


@pytest.fixture
def no_load(monkeypatch):
    monkeypatch.setattr(HookedLlava, "from_pretrained", classmethod(_never_load))


@pytest.fixture
def loads_tiny(tiny, monkeypatch):
    monkeypatch.setattr(HookedLlava, "from_pretrained", classmethod(lambda cls, name, **kw: tiny[0]))


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--flows", "image->lats"], "unknown flow 'image->lats'"),
        (["--flows", "question->last,banana->last"], "unknown flow 'banana->last'"),
        (["--flows", ","], "--flows is empty"),
        (["--window", "0"], "--window must be at least 1 (got 0)"),
        (["--window", "-2"], "--window must be at least 1 (got -2)"),
        (["--shapes", "0"], "--shapes must be at least 1 (got 0)"),
        (["--shapes", "-3"], "--shapes must be at least 1 (got -3)"),
        (["--workers", "2"], "--workers needs --ray"),
        (["--ray", "--workers", "0"], "--workers must be at least 1 (got 0)"),
        (["--csv", "no/such.csv", "--images", "."], "--csv no/such.csv: no such file"),
        (["--model", "shapse-llava", "--ray"], "--model 'shapse-llava': unknown model"),
        (["--model", "./no/such/folder", "--ray"], "--model './no/such/folder': unknown model"),
    ],
)
def test_mistakes_are_one_line_before_loading(capsys, no_load, tmp_path, argv, expected):
    _one_line_error(capsys, ["--out", tmp_path / "out", *argv], expected)
    assert not (tmp_path / "out" / "settings.json").exists()


def test_csv_needs_an_image_folder_and_out_must_be_a_folder(capsys, no_load, tmp_path):
    csv = tmp_path / "GQA_task_Colour.csv"
    csv.write_text("question_id,img_id\n")
    _one_line_error(capsys, ["--csv", csv, "--out", tmp_path / "o"], "--csv needs --images")
    _one_line_error(capsys, ["--csv", csv, "--images", tmp_path / "nope", "--out", tmp_path / "o"],
                    f"--images {tmp_path / 'nope'}: no such folder")  # fmt: skip
    blocker = tmp_path / "file"
    blocker.write_text("")
    _one_line_error(capsys, ["--out", blocker], "is a file, not a folder: give a folder for the sweep's tables")
    _one_line_error(capsys, ["--out", blocker / "sub"], "cannot write there")


def test_unknown_model_is_one_line_and_debug_shows_the_traceback(capsys, tmp_path):
    err = _one_line_error(capsys, ["--model", "shapse-llava", "--shapes", 1, "--out", tmp_path], "unknown model")
    assert "shapes-llava" in err
    from hooked_llava.cli.arguments import UsageError

    with pytest.raises(UsageError, match="unknown model"):
        cli.main(["sweep", "--model", "shapse-llava", "--out", str(tmp_path), "--debug"])


def test_a_folder_in_use_is_refused_before_loading(capsys, no_load, tmp_path):
    with sweep_lock(tmp_path):  # this thread holds it: the CLI below runs in a thread of its own
        import threading

        result = {}
        thread = threading.Thread(target=lambda: result.setdefault("code", cli.main(
            ["sweep", "--shapes", "1", "--out", str(tmp_path)])))  # fmt: skip
        thread.start()
        thread.join()
    assert result["code"] == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "is in use by another sweep" in err and "another --out folder" in err


def _swept(capsys, tmp_path):
    out = tmp_path / "out"
    argv = ["--shapes", 1, "--seed", 1, "--window", 1, "--flows", "image->last", "--skip-bad-rows", "--out", out]
    assert cli.main(["sweep", *map(str, argv)]) == 0
    capsys.readouterr()
    return out, argv


def test_a_damaged_settings_file_is_one_line(capsys, loads_tiny, tmp_path):
    out, argv = _swept(capsys, tmp_path)
    settings = out / "settings.json"
    settings.write_text(settings.read_text()[:25])
    _one_line_error(capsys, argv, "settings.json is damaged (unreadable (not valid JSON")
    assert cli.main(["sweep", *map(str, argv), "--force"]) == 0
    assert json.loads(settings.read_text())["window"] == 1


@pytest.mark.parametrize("damage", ["truncate", "empty"])
def test_a_damaged_example_file_is_recomputed(capsys, loads_tiny, tmp_path, damage):
    out, argv = _swept(capsys, tmp_path)
    before = pd.read_csv(out / "examples.csv")
    path = out / "examples" / f"{before['id'][0]}.examples.csv"
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2] if damage == "truncate" else b"")
    with pytest.warns(UserWarning, match=f"example {before['id'][0]} has a damaged stored result"):
        assert cli.main(["sweep", *map(str, argv)]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(out / "examples.csv"), before)
    assert pd.read_csv(path)["id"].tolist() == [before["id"][0]]  # rewritten whole
