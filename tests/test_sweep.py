"""`run_sweep`: resumable dataset sweeps, GQA task CSVs with row-naming errors, the figure."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from analyses.gqa import GQAFormatError, gqa_examples
from analyses.knockout import knockout_sweep
from analyses.plot_flows import plot_sweep
from analyses.sweep import SweepExample, answer_token, collect, run_sweep
from hooked_llava.testing import random_images

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
        answer = predicted if i % 3 else "zebra"
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
            torch.tensor(mine[column].to_numpy(), dtype=torch.float32), torch.tensor(direct[column].to_numpy())
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
    assert len(fig.axes) == 2 and [ax.get_title() for ax in fig.axes] == ["A (n=2)", "B (n=2)"]
    assert len(fig.axes[0].lines) == 3  # two flows and the zero line


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
