"""The Shapes training script: packed batches are exact, and a few steps of every stage run and save."""

from __future__ import annotations

import json

import pytest
import torch

from hooked_llava.shapes import ShapesWorld, format_prompt


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    from hooked_llava.shapes.train import main

    out = tmp_path_factory.mktemp("shapes")
    before = torch.get_num_threads()
    summary = main(["--out", str(out), "--seed", "0", "--smoke", "--threads", str(before + 1)])
    assert torch.get_num_threads() == before, "training must leave the process's thread count as it found it"
    return out, summary


def test_packed_branches_equal_single_prompts():
    """Each branch of a packed sequence gives the logits of its own single-question prompt."""
    from transformers import LlavaForConditionalGeneration

    from hooked_llava.shapes.data import collate, encode, qa_sequence, scene_questions
    from hooked_llava.shapes.recipe import llava_config
    from hooked_llava.shapes.tokenizer import build_processor

    model = LlavaForConditionalGeneration(llava_config()).eval()
    processor = build_processor()
    world = ShapesWorld(5)
    scene, questions = scene_questions(world, 3)
    assert len(questions) >= 5
    seqs = [qa_sequence(scene, questions, visual=True, caption=True), qa_sequence(scene, questions, False, False)]
    b = collate(seqs)
    with torch.no_grad():
        packed = model(
            input_ids=b["input_ids"],
            pixel_values=b["pixel_values"],
            attention_mask=b["attention_mask"],
            position_ids=b["position_ids"],
        ).logits
        for row, context in ((0, "<image>"), (1, scene.describe())):
            for k, q in enumerate(questions):
                prompt, _ = format_prompt(context, q.text, q.answer_prefix)
                images = scene.image if row == 0 else None
                enc = processor(images=images, text=prompt, return_tensors="pt")
                single = model(**enc).logits[0, -1]
                where = [i for i, s in enumerate(seqs[row].seg) if s == k]
                last = where[len(encode(f"{q.text}\nASSISTANT:{q.answer_prefix}")) - 1]
                torch.testing.assert_close(packed[row, last], single, atol=1e-5, rtol=1e-5)
                # the target at that position is the answer word
                assert processor.tokenizer.convert_ids_to_tokens(int(b["targets"][row, last])) == q.answer


def test_object_phrases_name_every_object_once():
    """Stage 1's region term contrasts each object with all 108 phrases; each object matches exactly one."""
    from hooked_llava.shapes.data import encode
    from hooked_llava.shapes.scene import describe_object
    from hooked_llava.shapes.stages import object_phrases

    phrases = object_phrases()
    assert len(phrases) == len(set(phrases)) == 6 * 6 * 3
    assert len({len(encode(p)) for p in phrases}) == 1  # stacked without padding
    world = ShapesWorld(9)
    for i in range(50):
        scene = world.scene(i)
        for o in scene.objects:
            named = describe_object(o)
            assert phrases.count(named) == 1 and named in scene.describe()


def test_smoke_training_saves_loadable_checkpoints(smoke_run):
    from transformers import AutoProcessor, AutoTokenizer, LlamaForCausalLM, LlavaForConditionalGeneration

    out, summary = smoke_run
    assert set(summary["seconds"]) == {"1_clip", "2_lm", "3_align", "4_tune", "total"}
    assert summary["bind_steps"] == 2  # the recall warm-up ran (and did not reach its accuracy target)
    llava = LlavaForConditionalGeneration.from_pretrained(out / "shapes-llava")
    lm = LlamaForCausalLM.from_pretrained(out / "shapes-lm")
    processor = AutoProcessor.from_pretrained(out / "shapes-llava")
    tokenizer = AutoTokenizer.from_pretrained(out / "shapes-lm")
    assert json.loads((out / "shapes-llava" / "training.json").read_text())["seed"] == 0
    assert llava.config.text_config.num_hidden_layers == lm.config.num_hidden_layers == 8
    e = ShapesWorld(1).example(0, "Colour")
    enc = processor(images=e.image, text=e.prompt, return_tensors="pt")
    assert int((enc["input_ids"] == llava.config.image_token_id).sum()) == 64
    with torch.no_grad():
        assert torch.isfinite(llava(**enc).logits).all()
        assert torch.isfinite(lm(**tokenizer(e.text_prompt, return_tensors="pt")).logits).all()
    files = {p.name for p in (out / "shapes-llava").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json"} <= files
    assert not any(name.endswith((".bin", ".pt")) for name in files)


def test_smoke_training_is_deterministic(smoke_run, tmp_path):
    from safetensors.torch import load_file

    from hooked_llava.shapes.train import main

    out, _ = smoke_run
    main(["--out", str(tmp_path), "--seed", "0", "--smoke"])
    for name in ("shapes-lm", "shapes-llava"):
        a = load_file(out / name / "model.safetensors")
        b = load_file(tmp_path / name / "model.safetensors")
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=0, rtol=0, msg=key)


def test_reuse_lm_takes_stage_two_only_from_a_matching_run(smoke_run):
    from hooked_llava.shapes.recipe import Recipe, smoke_recipe
    from hooked_llava.shapes.train import Logger, reuse

    out, summary = smoke_run
    with pytest.raises(ValueError, match="other stage-2 settings"):
        reuse(out / "shapes-lm", Recipe(), 0, summary["threads"], {}, Logger())
    with pytest.raises(ValueError, match="seed or threads"):
        reuse(out / "shapes-lm", smoke_recipe(), 1, summary["threads"], {}, Logger())
    times: dict = {}
    lm, bind_steps = reuse(out / "shapes-lm", smoke_recipe(), 0, summary["threads"], times, Logger())
    assert bind_steps == summary["bind_steps"] and times["2_lm"] == summary["seconds"]["2_lm"]
    assert lm.config.num_hidden_layers == 8
