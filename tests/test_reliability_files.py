"""GQA task files: every malformed row is a bad row (skipped and listed with --skip-bad-rows, a one-line
error naming it without), a file that cannot be used is a one-line error. Image files: 16-bit, float
and paletted images reach the model with the pixels `prepare` gives them, through `--image`, `prepare`
and a sweep's image folder (and figures draw that picture), checked against pixels computed by hand."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from analyses.information_flow.attention_knockout import knockout_sweep
from analyses.information_flow.examples import STUDY_B_TEMPLATE
from analyses.information_flow.gqa import GQAFileError, GQAFormatError, ImageFile, gqa_examples
from analyses.information_flow.sweep import answer_token, run_sweep
from hooked_llava.cli import main as cli
from hooked_llava.cli.arguments import UsageError
from hooked_llava.model.hooked_llava import HookedLlava
from hooked_llava.testing import random_images, tiny_model

HEADER = "question_id,img_id,question,answer,central object x,central object y,central object w,central object h"
GOOD = "What is the color of the circle?"


@pytest.fixture(scope="module")
def strict():
    """A tiny model whose tokenizer refuses unknown question words (as real checkpoints' do)."""
    model = tiny_model(seed=0)[0]
    model.processor.tokenizer.unknown_words = "raise"
    return model


def _task(tmp_path, lines):
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    random_images(1, seed=2)[0].save(images / "im0.png")
    path = tmp_path / "GQA_task_Colour.csv"
    path.write_text("\n".join([HEADER, *lines]) + "\n")
    return path, images


BAD_ROWS = [  # (line in the file, the row, what the error says)
    (3, f",im0,{GOOD},red,0,0,8,8", "unusable question_id '' (it is empty)"),
    (4, "q3,im0,   ,red,0,0,8,8", "the question is empty"),
    (5, f"a/b,im0,{GOOD},red,0,0,8,8", "unusable question_id 'a/b' (it holds '/')"),
    (6, f"q5,im0,{GOOD},red,0,0,8,8,extra", "9 fields where the header has 8"),
    (7, f"q6,im0,{GOOD},,0,0,8,8", "the answer is empty"),
    (8, f"q7,../im0,{GOOD},red,0,0,8,8", "unusable img_id '../im0'"),
]


@pytest.mark.parametrize("line, row, message", BAD_ROWS)
def test_each_malformed_row_is_an_error_naming_it(tmp_path, line, row, message):
    del line  # here the row is always the file's line 3
    path, images = _task(tmp_path, [f"q1,im0,{GOOD},red,0,0,8,8", row])
    with pytest.raises(GQAFormatError, match=re.escape(f"{path}, line 3 ") + ".*" + re.escape(message)):
        gqa_examples(path, images)


def test_malformed_rows_are_skipped_and_listed(tmp_path):
    path, images = _task(tmp_path, [f"q1,im0,{GOOD},red,0,0,8,8", *(row for _, row, _ in BAD_ROWS)])
    listed = []
    examples = gqa_examples(path, images, bad_rows=listed)
    assert [ex.id for ex in examples] == ["Colour-q1"] and "nan" not in examples[0].prompt
    assert [r["origin"].split(", ")[1].split(" ")[:2] for r in listed] == [["line", str(n)] for n, _, _ in BAD_ROWS]
    for row, (_, _, message) in zip(listed, BAD_ROWS, strict=True):
        assert message in row["error"]


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "is empty: expected a header line"),
        (b"\n\n", "is empty"),
        (HEADER.encode() + b"\n", "has a header but no rows"),
        (b"\xff\xfe\x00q\x00i\x00d", "cannot read it"),
        (HEADER.encode() + b'\nq1,"im0,never closed\n', "line 2: not valid CSV"),
    ],
)
def test_an_unusable_file_is_one_error(tmp_path, content, message):
    path = tmp_path / "GQA_task_Colour.csv"
    path.write_bytes(content)
    with pytest.raises(GQAFileError, match=message):
        gqa_examples(path, tmp_path, bad_rows=[])  # not a row to skip: the whole file


@pytest.fixture
def sweep_cli(strict, monkeypatch):
    monkeypatch.setattr(HookedLlava, "from_pretrained", classmethod(lambda cls, name, **kw: strict))

    def run(*argv):
        return cli.main(["sweep", "--window", "1", "--flows", "image->last", *map(str, argv)])

    return run


def test_an_unknown_word_is_a_bad_row_in_the_cli(sweep_cli, tmp_path, capsys):
    path, images = _task(tmp_path, [f"q1,im0,{GOOD},red,0,0,8,8", "q2,im0,What is the color of the zebra?,red,0,0,8,8",
                                    f"q3,im0,{GOOD},zebra,0,0,8,8", f"q4,im0,{GOOD},blue,0,0,8,8"])  # fmt: skip
    out = tmp_path / "out"
    assert sweep_cli("--csv", path, "--images", images, "--out", out, "--skip-bad-rows") == 0
    errors = pd.read_csv(out / "errors.csv")
    assert errors["origin"].tolist() == [f"{path}, line 3 (question_id q2)", f"{path}, line 4 (question_id q3)"]
    assert "'zebra'" in errors["error"][0]
    assert "answer 'zebra' is not in the tokenizer's vocabulary" in errors["error"][1]
    assert pd.read_csv(out / "examples.csv")["id"].tolist() == ["Colour-q1", "Colour-q4"]
    capsys.readouterr()
    assert sweep_cli("--csv", path, "--images", images, "--out", out) == 2
    err = capsys.readouterr().err.strip().splitlines()  # the progress bar, then the message
    assert "Traceback" not in "".join(err) and err[-1].startswith(
        f"hooked-llava sweep: error: {path}, line 3 (question_id q2): the prompt holds word(s)"
    )
    assert "'zebra'" in err[-1]


def test_file_errors_in_the_cli_are_one_line(sweep_cli, tmp_path, capsys):
    path, images = _task(tmp_path, [])
    path.write_bytes(b"")
    assert sweep_cli("--csv", path, "--images", images, "--out", tmp_path / "o", "--skip-bad-rows") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"{path} is empty" in err and "--skip-bad-rows" not in err


# --- images: every path gives the model the pixels prepare gives it -------------------------------------------


def _images(tmp_path):
    """(file, the RGB image the model should see, computed by hand) for a 16-bit, a float and a paletted file."""
    rng = np.random.default_rng(5)
    deep = rng.integers(0, 65536, (32, 32)).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")  # 16-bit greyscale PNG
    floats = rng.random((32, 32)).astype(np.float32)
    Image.fromarray(floats, mode="F").save(tmp_path / "float.tiff")  # values in [0, 1]
    palette = rng.integers(0, 256, (4, 3)).astype(np.uint8)
    index = rng.integers(0, 4, (32, 32)).astype(np.uint8)
    paletted = Image.fromarray(index, mode="P")
    paletted.putpalette(palette.reshape(-1).tolist())
    paletted.save(tmp_path / "paletted.png", transparency=2)  # index 2 is transparent: white, as HF composites it
    grey = [np.round(deep / 257), np.round(floats.astype(np.float64) * 255)]
    colours = np.where((index == 2)[..., None], 255, palette[index])
    expected = [np.repeat(g[..., None], 3, -1).astype(np.uint8) for g in grey] + [colours.astype(np.uint8)]
    files = [tmp_path / name for name in ("deep.png", "float.tiff", "paletted.png")]
    assert [Image.open(f).mode for f in files] in (["I;16", "F", "P"], ["I", "F", "P"])
    return list(zip(files, (Image.fromarray(e, mode="RGB") for e in expected), strict=True))


def _pixels(model, image, prompt=STUDY_B_TEMPLATE.format(question=GOOD)):
    return model.prepare(images=[image], prompts=[prompt]).pixel_values


def test_prepare_and_a_sweep_image_folder_give_the_pixels_computed_by_hand(tiny, tmp_path):
    model, _ = tiny
    for path, expected in _images(tmp_path):
        want = _pixels(model, expected)
        torch.testing.assert_close(_pixels(model, Image.open(path)), want)
        torch.testing.assert_close(_pixels(model, ImageFile(path)()), want)  # what a GQA sweep's loader gives


def test_a_sweep_over_16_bit_images_matches_knockout_on_the_right_pixels(tiny, tmp_path):
    model, _ = tiny
    (path, expected), *_ = _images(tmp_path)
    prompt = STUDY_B_TEMPLATE.format(question=GOOD)
    inputs = model.prepare(images=[expected], prompts=[prompt], boxes=[[(0, 0, 8, 8)]])
    with torch.no_grad():
        answer = model.to_string([int(model(inputs)[0, -1].argmax())]).strip()
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "im0.png").write_bytes(path.read_bytes())
    task = tmp_path / "GQA_task_Colour.csv"
    task.write_text(f"{HEADER}\nq1,im0,{GOOD},{answer},0,0,8,8\n")
    tables = run_sweep(model, gqa_examples(task, tmp_path / "images"), tmp_path / "out", flows=["image->last"],
                       window=1, progress=False)  # fmt: skip
    target = answer_token(model, answer)
    direct = knockout_sweep(model, inputs, ["image->last"], window=1, answer=target, progress=False)
    torch.testing.assert_close(torch.tensor(tables["knockout"]["p_base"].to_numpy(), dtype=torch.float32),
                               torch.tensor(direct["p_base"].to_numpy()))  # fmt: skip


class _Seen(Exception):
    pass


def test_explain_image_gives_the_model_the_pixels_computed_by_hand(tiny, tmp_path, monkeypatch, capsys):
    import analyses.report.explain as report

    model, _ = tiny
    seen = []

    def capture(model, inputs, **kwargs):
        seen.append(inputs.pixel_values)
        raise UsageError("captured")  # stop before the report: the inputs are what this test checks

    monkeypatch.setattr(cli, "_default", lambda args: model)
    monkeypatch.setattr(report, "explain", capture)
    for path, expected in _images(tmp_path):
        argv = ["explain", "--image", str(path), "--question", GOOD, "--out", str(tmp_path / "r")]
        assert cli.main(argv) == 2 and "captured" in capsys.readouterr().err
        inputs = model.prepare(images=[expected], questions=[GOOD])
        torch.testing.assert_close(seen[-1], inputs.pixel_values)


def test_an_image_prepare_cannot_scale_is_one_line_before_loading(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "_default", lambda args: pytest.fail("the model was loaded"))
    Image.fromarray(np.full((8, 8), -5, np.int32), mode="I").save(tmp_path / "negative.tiff")
    assert cli.main(["explain", "--image", str(tmp_path / "negative.tiff"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "values outside 0-65535" in err


def test_figures_draw_the_picture_the_model_is_shown(tmp_path):
    from analyses.plotting.figures import processed_image

    for path, expected in _images(tmp_path):
        np.testing.assert_array_equal(processed_image(Image.open(path), size=32), processed_image(expected, size=32))
