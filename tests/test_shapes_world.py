"""The Shapes world: determinism, scene geometry, question correctness, tokenizer and processor."""

from __future__ import annotations

import hashlib
import re
from collections import Counter

import numpy as np
import pytest

from hooked_llava.shapes import CATEGORIES, COLORS, SHAPES, ShapesWorld, make_dataset
from hooked_llava.shapes.questions import REL_SEPARATION, SIDE_MARGIN
from hooked_llava.shapes.scene import horizontal_word, shape_mask

# sha256 of scene bytes, recorded once; a change to generation or rasterisation breaks them.
GOLDEN_SCENES = {
    0: "c6f42af38321fb5e53eb0e5596bf19e50e62bb934f40b818733df25202e1a9bd",
    1: "738d68a070c39da936979ffc9e0840e182d8c53b1e444104b4568a2de1c4cbcf",
    2: "4292b01e0165bb9b671ecf962cc9134e9c91cbb13bbcfbc5aa8f8a9c4fd7d4eb",
}
GOLDEN_DATASET = "99e8962c5d0f940fee87489f1fbc3432623a962ece5b8c4e5c8d4661c5d21f95"


@pytest.fixture(scope="module")
def dataset():
    return make_dataset(seed=3, n_per_category=300)


@pytest.fixture(scope="module")
def processor():
    from hooked_llava.shapes import build_processor

    return build_processor()


def dataset_digest(examples) -> str:
    h = hashlib.sha256()
    for e in examples:
        for part in (e.image.tobytes(), e.prompt.encode(), e.text_prompt.encode(), e.answer.encode()):
            h.update(part)
    return h.hexdigest()


def test_golden_scene_bytes():
    world = ShapesWorld(seed=0)
    got = {i: hashlib.sha256(world.scene(i).image.tobytes()).hexdigest() for i in GOLDEN_SCENES}
    assert got == GOLDEN_SCENES
    assert dataset_digest(make_dataset(0, 5)) == GOLDEN_DATASET


def test_same_seed_same_bytes_other_seed_differs():
    a, b, c = ShapesWorld(7).scene(11), ShapesWorld(7).scene(11), ShapesWorld(8).scene(11)
    assert a.image.tobytes() == b.image.tobytes() and a.objects == b.objects
    assert a.image.tobytes() != c.image.tobytes()
    e1, e2 = ShapesWorld(7).example(4, "LogicalObj"), ShapesWorld(7).example(4, "LogicalObj")
    assert (e1.prompt, e1.text_prompt, e1.answer, e1.image.tobytes()) == (
        e2.prompt,
        e2.text_prompt,
        e2.answer,
        e2.image.tobytes(),
    )


def test_scene_geometry_and_pixels():
    world = ShapesWorld(seed=1)
    counts = Counter()
    for i in range(200):
        scene = world.scene(i)
        objs, img = scene.objects, np.asarray(scene.image)
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
        assert 1 <= len(objs) <= 3 and len({o.shape for o in objs}) == len(objs)
        assert [o.center for o in objs] == sorted(o.center for o in objs)  # left to right
        counts[len(objs)] += 1
        for k, o in enumerate(objs):
            assert o.shape in SHAPES and o.color in COLORS
            x0, y0, x1, y1 = o.bbox
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
            # the bbox is tight around the drawn mask
            extent = np.ptp(np.argwhere(shape_mask(o.shape, o.size)), axis=0) + 1  # (rows, cols)
            assert (x1 - x0, y1 - y0) == (int(extent[1]), int(extent[0]))
            for p in objs[k + 1 :]:
                overlap_x = min(x1, p.bbox[2]) - max(x0, p.bbox[0])
                overlap_y = min(y1, p.bbox[3]) - max(y0, p.bbox[1])
                assert overlap_x <= 0 or overlap_y <= 0
            # the object's pixels differ clearly from the background just outside its square
            cx, cy = int(o.center[0]), int(o.center[1])
            assert np.abs(img[cy, cx].astype(int) - img[0, 0].astype(int)).max() > 40
    assert min(counts.values()) > 40


def test_masks_are_distinct_shapes():
    masks = {s: shape_mask(s, 20) for s in SHAPES}
    for a in SHAPES:
        for b in SHAPES:
            if a < b:
                assert (masks[a] != masks[b]).sum() > 20, (a, b)


def test_describe():
    world = ShapesWorld(seed=0)
    scene = world.scene(0)
    text = scene.describe()
    assert text.startswith("There is ") and text.endswith(".")
    for o in scene.objects:
        assert f"{o.color} {o.shape}" in text
    positions = [text.index(f" {o.shape} ") for o in scene.objects]
    assert positions == sorted(positions)
    assert horizontal_word(10.0) == "left" and horizontal_word(32.0) == "middle" and horizontal_word(54.0) == "right"


def oracle(e) -> str:
    """The answer recomputed from the objects and the question text alone."""
    objs = {o.shape: o for o in e.scene.objects}
    q = e.question
    if e.category == "Colour":
        return objs[re.fullmatch(r"What is the color of the (\w+)\?", q)[1]].color
    if e.category == "ChooseAttr":
        shape, a, b = re.fullmatch(r"Is the (\w+) (\w+) or (\w+)\?", q).groups()
        assert objs[shape].color in (a, b) and a != b
        return objs[shape].color
    if e.category == "ChooseCat":
        color, a, b = re.fullmatch(r"Which shape is (\w+), the (\w+) or the (\w+)\?", q).groups()
        having = [o.shape for o in e.scene.objects if o.color == color]
        assert len(having) == 1 and having[0] in (a, b) and a != b
        return having[0]
    if e.category == "ChooseRel":
        a, first, second, b = re.fullmatch(r"Is the (\w+) to the (\w+) or to the (\w+) of the (\w+)\?", q).groups()
        dx = objs[a].center[0] - objs[b].center[0]
        assert abs(dx) >= REL_SEPARATION and {first, second} == {"left", "right"}
        return "left" if dx < 0 else "right"
    if e.category == "CompareAttr":
        a, b = re.fullmatch(r"Do the (\w+) and the (\w+) have the same color\?", q).groups()
        return "yes" if objs[a].color == objs[b].color else "no"
    if e.category == "LogicalObj":
        a, b, color = re.fullmatch(r"Is there a (\w+) or a (\w+) that is not (\w+)\?", q).groups()
        return "yes" if any(o.shape in (a, b) and o.color != color for o in e.scene.objects) else "no"
    shape = re.fullmatch(r"On which side of the picture is the (\w+)\?", q)[1]
    dx = objs[shape].center[0] - 32
    assert abs(dx) >= SIDE_MARGIN
    return "left" if dx < 0 else "right"


def test_answers_are_correct_and_unambiguous(dataset):
    for e in dataset:
        assert e.answer == oracle(e), (e.question, e.scene.objects)


def test_balance(dataset):
    for c in CATEGORIES:
        exs = [e for e in dataset if e.category == c]
        answers = Counter(e.answer for e in exs)
        # no answer is much more common than chance
        assert max(answers.values()) / len(exs) < 1.4 / len(answers), (c, answers)
        if exs[0].options:
            first = sum(e.options[0] == e.answer for e in exs) / len(exs)
            assert 0.4 < first < 0.6, (c, first)
    rel = [e for e in dataset if e.category == "ChooseRel"]
    assert 0.4 < sum(e.options[0] == "left" for e in rel) / len(rel) < 0.6


def test_prompts_spans_and_boxes(dataset):
    for e in dataset:
        assert e.prompt.startswith("USER: <image>\n") and "\nASSISTANT:" in e.prompt
        assert e.prompt[slice(*e.question_span)] == e.question
        assert e.text_prompt[slice(*e.text_question_span)] == e.question
        assert e.text_prompt == e.prompt.replace("<image>", e.scene.describe())
        assert e.answer.isalpha() and " " not in e.answer
        boxes = {o.bbox for o in e.scene.objects if o.shape in e.question.replace("?", " ").split()}
        assert set(e.related_bboxes) == boxes
        if e.category == "Colour":
            assert e.prompt.endswith(f"ASSISTANT: The color of the {e.question.split()[-1][:-1]} is")
        else:
            assert e.prompt.endswith("ASSISTANT:")


def test_patches_of():
    world = ShapesWorld(0)
    assert world.patches_of((0, 0, 8, 8)) == [0]
    assert world.patches_of((7, 0, 9, 1)) == [0, 1]
    assert world.patches_of((56, 56, 64, 64)) == [63]


def test_object_patches_count_drawn_pixels():
    world = ShapesWorld(3)
    for i in range(20):
        scene = world.scene(i)
        found = world.object_patches(scene)
        counts = []
        for o in scene.objects:  # pixel by pixel: which patch each drawn pixel falls in
            m, x0, y0 = shape_mask(o.shape, o.size), int(o.center[0] - o.size / 2), int(o.center[1] - o.size / 2)
            c = np.zeros(64, dtype=int)
            for y, x in zip(*np.nonzero(m)):
                c[(y0 + y) // 8 * 8 + (x0 + x) // 8] += 1
            counts.append(c)
        for k, (o, patches) in enumerate(zip(scene.objects, found)):
            expected = [j for j in range(64) if counts[k][j] >= 8 and all(counts[k][j] >= c[j] for c in counts)]
            assert patches == expected and set(patches) <= set(world.patches_of(o.bbox))
            centre = int(o.center[1]) // 8 * 8 + int(o.center[0]) // 8
            assert centre in patches  # objects are at least 16 px, so the centre patch is well filled


def test_tokenizer_words_and_specials(dataset, processor):
    tok = processor.tokenizer
    assert [tok.convert_tokens_to_ids(t) for t in ("<unk>", "<s>", "</s>", "<pad>")] == [0, 1, 2, 3]
    ids = tok("USER: <image>\nIs the circle red or blue?\nASSISTANT:")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == [
        "<s>", "USER", ":", "<image>", "\n", "Is", "the", "circle", "red", "or", "blue", "?", "\n", "ASSISTANT", ":",
    ]  # fmt: skip
    for e in dataset[::7]:
        for text in (e.prompt, e.text_prompt):
            assert tok.unk_token_id not in tok(text)["input_ids"]
        assert len(tok(e.answer, add_special_tokens=False)["input_ids"]) == 1


def test_processor_expands_image_tokens(processor):
    import torch
    from transformers import LlavaForConditionalGeneration

    from hooked_llava.shapes.data import encode, pixel_values
    from hooked_llava.shapes.recipe import llava_config

    e = ShapesWorld(2).example(0, "ChooseRel")
    enc = processor(images=e.image, text=e.prompt, return_tensors="pt")
    assert int((enc["input_ids"] == processor.image_token_id).sum()) == 64
    assert enc["pixel_values"].shape == (1, 3, 64, 64)
    torch.testing.assert_close(enc["pixel_values"], pixel_values([e.image]))
    plain = processor.tokenizer(e.text_prompt, add_special_tokens=False)["input_ids"]
    assert list(encode(e.text_prompt)) == plain
    model = LlavaForConditionalGeneration(llava_config()).eval()
    with torch.no_grad():
        out = model(**enc)
    assert out.logits.shape == (1, enc["input_ids"].shape[1], len(processor.tokenizer))
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": e.question}]}]
    assert processor.apply_chat_template(msgs, add_generation_prompt=True) == e.prompt
