"""The `hooked-llava` CLI: one-line errors with exit status 2, checked before the model loads where
possible; full reports for a byte-level BPE LLaVA and the text-only `shapes-lm`."""

from __future__ import annotations

import pytest

from hooked_llava.cli import main as cli
from hooked_llava.cli.arguments import UsageError


def _fail_to_load(name):
    raise AssertionError("the model was loaded before the mistake was reported")


def _one_line_error(capsys, argv, expected):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and expected in err, err
    return err


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--image", "no/such/file.png"], "--image no/such/file.png: no such file"),
        (["--question", "  "], "--question is empty"),
        (["--prompt", ""], "--prompt is empty"),
        (["--flows", "image->lats"], "unknown flow 'image->lats'"),
        (["--category", "Colours"], "--category 'Colours' is not a Shapes category"),
    ],
)
def test_mistakes_are_one_line_before_loading(capsys, monkeypatch, tmp_path, extra, expected):
    monkeypatch.setattr(cli, "load_model", _fail_to_load)
    _one_line_error(capsys, ["explain", "--out", str(tmp_path / "r"), *extra], expected)


def test_unreadable_image_and_unwritable_out(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(cli, "load_model", _fail_to_load)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    _one_line_error(capsys, ["explain", "--image", str(bad), "--out", str(tmp_path / "r")], "not an image PIL can read")
    blocker = tmp_path / "file"
    blocker.write_text("")
    _one_line_error(capsys, ["explain", "--out", str(blocker)], "is a file, not a folder")
    _one_line_error(capsys, ["explain", "--out", str(blocker / "sub")], "cannot write there")


def test_unknown_model_and_debug(capsys, tmp_path):
    err = _one_line_error(capsys, ["explain", "--model", "shapse-llava", "--out", str(tmp_path)], "unknown model")
    assert "shapes-llava" in err and "shapes-lm" in err
    _one_line_error(capsys, ["quickstart", "--model", str(tmp_path / "missing")], "could not load it")
    with pytest.raises(UsageError, match="unknown model"):
        cli.main(["explain", "--model", "shapse-llava", "--out", str(tmp_path), "--debug"])


def test_unknown_word_lists_the_known_words(capsys, tmp_path):
    err = _one_line_error(
        capsys, ["explain", "--question", "What is the color of the dog?", "--out", str(tmp_path)], "'dog'"
    )
    assert "known words are:" in err and "circle" in err and "red" in err


def test_shapes_lm_gets_a_full_text_report_and_replacing_is_said(capsys, tmp_path):
    (tmp_path / "report.html").write_text("old")
    assert cli.main(["explain", "--model", "shapes-lm", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"replacing the existing report in {tmp_path}" in out
    page = (tmp_path / "report.html").read_text()
    assert "old" != page and 'id="knockout"' in page and 'id="patches"' not in page
    assert "<td>nan</td>" not in page.lower()


def _byte_level_llava(folder):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from hooked_llava.testing import WORDS, tiny_hf_llava, tiny_processor

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = [" ".join(w for w in WORDS if w.strip())] * 20 + [
        "USER: <image>\nWhat is the color of the circle?\nASSISTANT:"
    ]
    special = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, special_tokens=special, show_progress=False))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    processor = tiny_processor()
    processor.tokenizer = fast
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    processor.image_token = "<image>"
    processor.image_token_id = fast.convert_tokens_to_ids("<image>")
    hf = tiny_hf_llava(0, vocab_size=len(fast))
    hf.config.image_token_id = processor.image_token_id
    hf.save_pretrained(folder)
    processor.save_pretrained(folder)


def test_byte_level_bpe_llava_gets_a_full_report(capsys, tmp_path):
    _byte_level_llava(tmp_path / "model")
    out = tmp_path / "report"
    argv = ["explain", "--model", str(tmp_path / "model"), "--question", "What is the color of the circle?"]
    assert cli.main([*argv, "--out", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert all(f'id="{s}"' in page for s in ("answer", "logit-lens", "heads", "patches", "knockout", "embedding"))
    assert "Ġ" not in page and "<td>nan</td>" not in page.lower()
