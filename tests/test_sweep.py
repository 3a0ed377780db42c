"""`run_sweep`: resumable dataset sweeps keyed by their settings, GQA task CSVs with row-naming
errors and skippable bad rows, summary tables in named units, the figure and its bounded bands."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from analyses.information_flow.attention_knockout import knockout_sweep
from analyses.information_flow.gqa import GQAFormatError, gqa_examples
from analyses.information_flow.keys import SettingsChangedError, claim_folder, model_fingerprint
from analyses.information_flow.stats import summarize_knockout, t_quantile
from analyses.information_flow.sweep import (
    BadExampleError,
    SweepExample,
    answer_token,
    collect,
    run_sweep,
    shapes_examples,
    write_tables,
)
from analyses.plotting.flows import plot_sweep
from hooked_llava.testing import random_images, tiny_model

FLOWS = ["question->last", "image->last"]
PROMPT = "USER: <image>\nWhat is the color of the circle?\nASSISTANT:"


@pytest.fixture(scope="module")
def examples(tiny):
    """Six examples; four labelled with the model's own answer (so they are swept), two wrongly."""
    model, _ = tiny
    out = []
    for i, image in enumerate(random_images(6, seed=11)):
        inputs = model.prepare(images=[image], prompts=[PROMPT])
        with torch.no_grad():
            predicted = model.to_string([int(model(inputs)[0, -1].argmax())]).strip()
        answer = predicted if i % 3 else ("yes" if predicted != "yes" else "no")
        out.append(SweepExample(f"ex-{i}", "A" if i < 3 else "B", PROMPT, answer, image, [(0, 0, 16, 16)]))
    return out


def test_sweep_keeps_correct_examples_and_matches_knockout_sweep(tiny, examples, tmp_path):
    model, _ = tiny
    tables = run_sweep(model, examples, tmp_path, flows=FLOWS, progress=False)
    assert tables["examples"]["correct"].tolist() == [i % 3 != 0 for i in range(6)]
    knock = tables["knockout"]
    assert set(knock["id"]) == {"ex-1", "ex-2", "ex-4", "ex-5"}
    ex = examples[1]
    inputs = model.prepare(images=[ex.image], prompts=[ex.prompt], boxes=[ex.boxes])
    direct = knockout_sweep(model, inputs, FLOWS, answer=answer_token(model, ex.answer), progress=False)
    mine = knock[knock["id"] == "ex-1"].reset_index(drop=True)
    for column in ("p_base", "p_blocked", "rel_change"):  # the CSV round trip keeps every float32 digit
        torch.testing.assert_close(
            torch.tensor(mine[column.replace("rel_change", "rel_change_pct")].to_numpy(), dtype=torch.float32),
            torch.tensor(direct[column].to_numpy()),
        )


def test_killed_and_resumed_sweep_gives_the_same_table(tiny, examples, tmp_path):
    model, _ = tiny
    whole = run_sweep(model, examples, tmp_path / "whole", flows=FLOWS, progress=False)
    finished = []

    def die_after_three(ex):
        finished.append(ex.id)
        if len(finished) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(model, examples, tmp_path / "resumed", flows=FLOWS, progress=False, on_example=die_after_three)
    assert len(collect(tmp_path / "resumed")["examples"]) == 3
    recomputed = []
    resumed = run_sweep(model, examples, tmp_path / "resumed", flows=FLOWS, progress=False,
                        on_example=lambda ex: recomputed.append(ex.id))  # fmt: skip
    assert recomputed == ["ex-3", "ex-4", "ex-5"]
    for name in ("examples", "knockout"):
        pd.testing.assert_frame_equal(resumed[name], whole[name])


def test_sweep_figure_has_one_panel_per_category(tiny, examples, tmp_path):
    model, _ = tiny
    tables = run_sweep(model, examples, tmp_path, flows=FLOWS, progress=False)
    fig = plot_sweep(tables["knockout"])
    assert len(fig.axes) == 2 and [ax.get_title() for ax in fig.axes] == [
        "A (n=2, no interval)",
        "B (n=2, no interval)",
    ]
    assert len(fig.axes[0].lines) == 3  # two flows and the zero line
    assert _band_values(fig.axes[0]).size == 0  # n = 2 < 5: no band drawn


def _gqa(tmp_path, rows, extra_columns=None):
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    for i, image in enumerate(random_images(2, seed=3)):
        image.resize((48, 40)).save(images / f"img{i}.jpg")
    frame = pd.DataFrame(rows)
    for column in extra_columns or []:
        frame[column] = 1
    path = tmp_path / "GQA_val_task_ChooseAttr.csv"
    frame.to_csv(path, index=False)
    return path, images


def _row(qid, img, x=2, y=3, w=10, h=12):
    return {"question_id": qid, "img_id": img, "question": "Is the circle red or blue?", "answer": "red",
            "image_w": 48, "image_h": 40, "central object x": x, "central object y": y,
            "central object w": w, "central object h": h}  # fmt: skip


def test_gqa_csv_rows_become_examples_with_boxes(tmp_path):
    path, images = _gqa(tmp_path, [_row("q1", "img0"), _row("q2", "img1", x=30, w=18)])
    examples = gqa_examples(path, images)
    assert [e.id for e in examples] == ["ChooseAttr-q1", "ChooseAttr-q2"]
    assert examples[1].boxes == [(30.0, 3.0, 48.0, 15.0)]
    assert "Answer the question using a single word or phrase." in examples[0].prompt
    assert examples[0].load_image().size == (48, 40)


@pytest.mark.parametrize(
    "rows, extra, message",
    [
        ([_row("q1", "img0"), _row("q2", "missing")], None, r"line 3 \(question_id q2\): image missing not found"),
        ([_row("q1", "img0", w=-4)], None, r"line 2 \(question_id q1\): bad bounding box"),
        ([_row("q1", "img0"), _row("q2", "img1", x=40, w=20)], None, r"line 3 .*bad bounding box"),
        ([_row("q1", "img0")], ["colour"], r"line 1 \(header\): unknown column\(s\) \['colour'\]"),
    ],
)
def test_gqa_csv_errors_name_the_row(tmp_path, rows, extra, message):
    path, images = _gqa(tmp_path, rows, extra)
    with pytest.raises(GQAFormatError, match=message):
        gqa_examples(path, images)


def test_a_bad_csv_loses_nothing_already_computed(tiny, tmp_path):
    model, _ = tiny
    path, images = _gqa(tmp_path, [_row("q1", "img0"), _row("q2", "img1")])
    run_sweep(model, gqa_examples(path, images), tmp_path / "out", flows=FLOWS, progress=False)
    before = collect(tmp_path / "out")["examples"]
    path, images = _gqa(tmp_path, [_row("q1", "img0"), _row("q2", "img1"), _row("q3", "nope")])
    with pytest.raises(GQAFormatError, match="line 4"):
        gqa_examples(path, images)
    pd.testing.assert_frame_equal(collect(tmp_path / "out")["examples"], before)
    path, images = _gqa(tmp_path, [_row("q1", "img0"), _row("q2", "img1"), _row("q3", "img0")])
    recomputed = []
    run_sweep(model, gqa_examples(path, images), tmp_path / "out", flows=FLOWS, progress=False,
              on_example=lambda ex: recomputed.append(ex.id))  # fmt: skip
    assert recomputed == ["ChooseAttr-q3"]


def _band_values(ax):
    """The y values of every confidence band drawn in `ax`."""
    paths = [path for band in ax.collections for path in band.get_paths()]
    return np.concatenate([path.vertices[:, 1] for path in paths]) if paths else np.array([])


def _knock(values, p_base=0.5, **columns):
    """A sweep's knockout table for one category/flow/layer with the given relative changes (%)."""
    return pd.DataFrame({"category": "A", "flow": "a->b", "layer": 0, "id": [f"e{i}" for i in range(len(values))],
                         "p_base": p_base, "rel_change_pct": values, **columns})  # fmt: skip


def test_confidence_bands_stay_within_what_the_metric_can_take():
    values = [-100.0, -100.0, -100.0, -100.0, 0.0]  # the plain t interval reaches -180 %
    out = summarize_knockout(_knock(values), "rel_change_pct").iloc[0]
    sem = np.std(values, ddof=1) / math.sqrt(5)
    assert out["n"] == 5 and out["mean"] == pytest.approx(-80.0)
    assert out["ci_low"] == -100.0  # clipped: a probability cannot fall below zero
    assert out["ci_high"] == pytest.approx(-80.0 + t_quantile(0.975, 4) * sem)
    # p_base = 0.9: a rise is at most (1 - 0.9) / 0.9 = 11.1 %, a log-probability rise at most -log 0.9
    high = _knock([11.0, 0.0, 11.0, 0.0, 11.0], p_base=0.9, delta_log_prob=[0.1, 0.0, 0.1, 0.0, 0.1])
    both = summarize_knockout(high, ["rel_change_pct", "delta_log_prob"]).iloc[0]
    assert both["rel_change_pct_ci_high"] == pytest.approx(100 / 9)
    assert both["delta_log_prob_ci_high"] == pytest.approx(-math.log(0.9))
    assert both["delta_log_prob_ci_low"] == pytest.approx(
        0.06 - t_quantile(0.975, 4) * np.std([0.1, 0, 0.1, 0, 0.1], ddof=1) / math.sqrt(5)
    )
    small = summarize_knockout(_knock([-90.0, 50.0, 10.0, 0.0]), "rel_change_pct").iloc[0]
    assert small["n"] == 4 and math.isnan(small["ci_low"]) and math.isnan(small["ci_high"])  # n < 5: none


def test_sweep_figure_band_is_bounded_and_drawn_from_five_examples():
    fig = plot_sweep(pd.concat([_knock([-100.0] * 4 + [0.0]), _knock([-100.0, 0.0, 20.0]).assign(category="B")]))
    assert [ax.get_title() for ax in fig.axes] == ["A (n=5)", "B (n=3, no interval)"]
    band = _band_values(fig.axes[0])
    assert band.size and band.min() == pytest.approx(-100.0) and band.max() > -80.0
    assert _band_values(fig.axes[1]).size == 0


def test_tables_share_one_unit_and_name_it(tiny, examples, tmp_path):
    model, _ = tiny
    tables = run_sweep(model, examples, tmp_path, flows=FLOWS, progress=False)
    tables["knockout"]["delta_log_prob"] = np.log(tables["knockout"]["p_blocked"] / tables["knockout"]["p_base"])
    write_tables(tmp_path, tables)
    knock, summary = pd.read_csv(tmp_path / "knockout.csv"), pd.read_csv(tmp_path / "summary.csv")
    assert "rel_change" not in knock and "rel_change" not in summary.columns
    percent = (knock.p_blocked - knock.p_base) / knock.p_base * 100  # percent, in both files
    np.testing.assert_allclose(knock.rel_change_pct, percent, rtol=1e-5, atol=1e-4)
    assert list(summary.columns) == ["category", "flow", "layer", "n", "rel_change_pct_mean", "rel_change_pct_ci_low",
                                     "rel_change_pct_ci_high", "delta_log_prob_mean", "delta_log_prob_ci_low",
                                     "delta_log_prob_ci_high"]  # fmt: skip
    means = knock.groupby(["category", "flow", "layer"], sort=False)[["rel_change_pct", "delta_log_prob"]].mean()
    np.testing.assert_allclose(summary.rel_change_pct_mean, means.rel_change_pct.to_numpy(), rtol=1e-6)
    np.testing.assert_allclose(summary.delta_log_prob_mean, means.delta_log_prob.to_numpy(), rtol=1e-6)
    assert summary.rel_change_pct_ci_low.isna().all()  # two examples per category: no interval
    assert not (tmp_path / "errors.csv").exists()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"window": 1}, "window: 9 → 1"),
        ({"flows": ["image->last"]}, r"flows: \['question->last', 'image->last'\] → \['image->last'\]"),
        ({"lens": True}, "lens: False → True"),
        ({"data": {"seed": 5}}, "seed: '\\(not recorded\\)' → 5"),
    ],
)
def test_resume_with_other_settings_is_refused_or_forced(tiny, examples, tmp_path, change, message):
    model, _ = tiny
    first = run_sweep(model, examples[:2], tmp_path, flows=FLOWS, progress=False)
    settings = {"flows": FLOWS, **change}
    with pytest.raises(SettingsChangedError, match=f"{message}.*new --out folder, or --force"):
        run_sweep(model, examples[:2], tmp_path, progress=False, **settings)
    recomputed = []
    again = run_sweep(
        model,
        examples[:2],
        tmp_path,
        progress=False,
        force=True,
        on_example=lambda ex: recomputed.append(ex.id),
        **settings,
    )
    assert recomputed == ["ex-0", "ex-1"]
    direct = run_sweep(model, examples[:2], tmp_path / "fresh", progress=False, **settings)
    pd.testing.assert_frame_equal(again["knockout"], direct["knockout"])
    if "window" in change:  # the old table is not returned: window 1 moves the numbers
        assert not np.allclose(again["knockout"].p_blocked, first["knockout"].p_blocked)


def test_resume_with_another_model_is_refused(tiny, examples, tmp_path):
    model, _ = tiny
    other, _ = tiny_model(seed=1)
    assert model_fingerprint(model) == model_fingerprint(tiny_model(seed=0)[0])
    assert model_fingerprint(other) != model_fingerprint(model)
    run_sweep(model, examples[:1], tmp_path, flows=FLOWS, progress=False)
    with pytest.raises(
        SettingsChangedError, match=f"model: '{model_fingerprint(model)}' → '{model_fingerprint(other)}'"
    ):
        run_sweep(other, examples[:1], tmp_path, flows=FLOWS, progress=False)


def test_an_example_whose_content_changed_is_recomputed(tiny, examples, tmp_path):
    model, _ = tiny
    run_sweep(model, examples[:2], tmp_path, flows=FLOWS, progress=False)
    changed = [examples[0], SweepExample("ex-1", "A", PROMPT, "no", examples[2].image, [(0, 0, 8, 8)])]
    recomputed = []
    with pytest.warns(UserWarning, match="example ex-1 changed since it was swept"):
        tables = run_sweep(
            model, changed, tmp_path, flows=FLOWS, progress=False, on_example=lambda ex: recomputed.append(ex.id)
        )
    assert recomputed == ["ex-1"]
    fresh = run_sweep(model, changed, tmp_path / "fresh", flows=FLOWS, progress=False)
    for name in ("examples", "knockout"):
        pd.testing.assert_frame_equal(tables[name], fresh[name])


def test_shapes_ids_include_the_seed():
    one, two = shapes_examples(1, seed=1, categories=["Colour"]), shapes_examples(1, seed=2, categories=["Colour"])
    assert [ex.id for ex in one] == ["Colour-s1-0000"] and [ex.id for ex in two] == ["Colour-s2-0000"]


def test_duplicate_ids_are_refused(tiny, examples, tmp_path):
    model, _ = tiny
    with pytest.raises(ValueError, match=r"duplicate example ids .*'ex-1'"):
        run_sweep(model, [examples[0], examples[1], examples[1]], tmp_path, flows=FLOWS, progress=False)
    path, images = _gqa(tmp_path, [_row("q1", "img0"), _row("q2", "img1"), _row("q1", "img1")])
    with pytest.raises(GQAFormatError, match=r"duplicate question ids \(question_id q1 on lines \[2, 4\]\)"):
        gqa_examples(path, images)


def test_answer_outside_the_vocabulary_is_an_error(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="answer 'zebra' is not in the tokenizer's vocabulary"):
        answer_token(model, "zebra")


@pytest.fixture
def cli(tiny, monkeypatch):
    """`hooked-llava sweep ...` on the tiny model; returns (exit status, stderr)."""
    from hooked_llava.cli import main as module
    from hooked_llava.model.hooked_llava import HookedLlava

    monkeypatch.setattr(HookedLlava, "from_pretrained", classmethod(lambda cls, name, **kw: tiny[0]))

    def run(*argv):
        return module.main(["sweep", "--window", "1", "--flows", "image->last", *map(str, argv)])

    return run


def _corrupt_csv(tmp_path):
    path, images = _gqa(tmp_path, [_row("q1", "img0"), _row("q2", "img1"), _row("q3", "img0")])
    (images / "img1.jpg").write_bytes(b"not a jpeg")
    return path, images


def test_bad_row_stops_the_sweep_naming_it_and_keeps_finished_tables(cli, tmp_path, capsys):
    path, images = _corrupt_csv(tmp_path)
    out = tmp_path / "out"
    assert cli("--csv", path, "--images", images, "--out", out) == 2
    err = capsys.readouterr().err
    assert f"{path}, line 3 (question_id q2): the image could not be read" in err and "--skip-bad-rows" in err
    assert pd.read_csv(out / "examples.csv")["id"].tolist() == ["ChooseAttr-q1"]  # the finished row's tables
    assert not (out / "errors.csv").exists()


def test_skip_bad_rows_lists_them_in_errors_csv(cli, tmp_path, capsys):
    path, images = _corrupt_csv(tmp_path)
    frame = pd.read_csv(path)
    frame = pd.concat([frame, pd.DataFrame([_row("q4", "gone")])])
    frame.to_csv(path, index=False)
    out = tmp_path / "out"
    assert cli("--csv", path, "--images", images, "--out", out, "--skip-bad-rows") == 0
    errors = pd.read_csv(out / "errors.csv")
    assert errors["id"].tolist() == ["q4", "ChooseAttr-q2"]  # found when reading the CSV, then while sweeping
    assert errors["origin"].tolist() == [f"{path}, line 5 (question_id q4)", f"{path}, line 3 (question_id q2)"]
    assert "image gone not found" in errors["error"][0] and "could not be read" in errors["error"][1]
    assert pd.read_csv(out / "examples.csv")["id"].tolist() == ["ChooseAttr-q1", "ChooseAttr-q3"]
    assert cli("--csv", path, "--images", images, "--out", out) == 2  # without the flag the same CSV stops
    assert "line 5 (question_id q4): image gone not found" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [(["--seed", "2"], "seed: 1 → 2"), (["--window", "3"], "window: 1 → 3"), (["--flows", "last->last"], "flows")],
)
def test_cli_rerun_with_other_settings_is_refused(cli, tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert cli("--shapes", 1, "--seed", 1, "--skip-bad-rows", "--out", out) == 0
    assert len(pd.read_csv(out / "examples.csv")) + len(pd.read_csv(out / "errors.csv")) == 7
    capsys.readouterr()
    assert cli("--shapes", 1, "--seed", 1, "--skip-bad-rows", "--out", out, *argv) == 2
    err = capsys.readouterr().err
    assert message in err and "--force" in err and err.count("\n") == 1
    assert cli("--shapes", 1, "--seed", 1, "--skip-bad-rows", "--out", out, "--force", *argv) == 0


def test_run_sweep_bad_example_raises_or_is_listed(tiny, examples, tmp_path):
    model, _ = tiny

    def broken():
        raise OSError("cannot identify image file")

    bad = SweepExample("ex-bad", "A", PROMPT, "red", broken, [(0, 0, 8, 8)], "tasks.csv, line 7 (question_id 9)")
    with pytest.raises(BadExampleError, match=r"tasks.csv, line 7 \(question_id 9\): the image could not be read"):
        run_sweep(model, [examples[1], bad, examples[2]], tmp_path, flows=FLOWS, progress=False)
    assert collect(tmp_path)["examples"]["id"].tolist() == ["ex-1"]  # finished before the bad one: kept
    listed = []
    tables = run_sweep(model, [examples[1], bad, examples[2]], tmp_path, flows=FLOWS, progress=False, bad_rows=listed)
    assert [row["id"] for row in listed] == ["ex-bad"] and "cannot identify image file" in listed[0]["error"]
    assert tables["examples"]["id"].tolist() == ["ex-1", "ex-2"]


def test_a_failed_start_records_no_settings(tiny, examples, tmp_path):
    model, _ = tiny
    with pytest.raises(ValueError, match="unknown flow 'imagelast'"):
        run_sweep(model, examples[:1], tmp_path, flows=["imagelast"], progress=False)
    claim_folder(tmp_path, {"window": 3})  # a folder without results is not protected
    tables = run_sweep(model, examples[1:2], tmp_path, flows=FLOWS, progress=False)
    assert tables["examples"]["id"].tolist() == ["ex-1"]
    assert json.loads((tmp_path / "settings.json").read_text())["flows"] == FLOWS


NO_RAY = """
import sys
import analyses.information_flow.ray_sweep, hooked_llava.cli.main
from analyses.information_flow.sweep import SweepExample, run_sweep
from hooked_llava.testing import random_images, tiny_model
example = SweepExample("a", "A", sys.argv[2], "red", random_images(1)[0], [(0, 0, 8, 8)])
run_sweep(tiny_model()[0], [example], sys.argv[1], flows=["image->last"], window=1, progress=False)
print(sorted(name for name in sys.modules if name.split(".")[0] == "ray"))
"""


def test_a_sweep_without_ray_never_imports_it(tmp_path):
    """Ray is an optional extra: the package, the CLI and a sweep run without importing it (where it is installed)."""
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", NO_RAY, str(tmp_path), PROMPT], cwd=root, capture_output=True,
                          text=True, check=True)  # fmt: skip
    assert done.stdout.splitlines()[-1] == "[]"
    assert (tmp_path / "examples" / "a.examples.csv").exists()


def test_workers_need_ray(cli, tmp_path, capsys):
    assert cli("--shapes", 1, "--workers", 2, "--out", tmp_path) == 2
    assert "--workers needs --ray" in capsys.readouterr().err
    assert cli("--shapes", 1, "--ray", "--workers", 0, "--out", tmp_path) == 2
    assert "--workers must be at least 1 (got 0)" in capsys.readouterr().err
    assert not (tmp_path / "settings.json").exists()


@pytest.mark.skipif(importlib.util.find_spec("ray") is not None, reason="ray is installed")
def test_ray_without_the_extra_says_how_to_install_it(cli, tmp_path, capsys):
    assert cli("--shapes", 1, "--ray", "--workers", 2, "--out", tmp_path) == 2
    assert 'sweeps on Ray need the ray extra: pip install -e ".[ray]"' in capsys.readouterr().err
