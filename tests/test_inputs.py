"""`prepare` and the roles of positions in `LlavaInputs`."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS

from hooked_llava.inputs.geometry import box_to_patches
from hooked_llava.testing import random_images

STUDY_B = (
    "A chat between a curious user and an artificial intelligence assistant. USER: <image>\n"
    "Is the circle red or blue? \nAnswer the question using a single word or phrase. ASSISTANT:"
)


def _words(model, inputs, row, role):
    return model.to_str_tokens(inputs.input_ids[row][inputs.mask(role)[row]])


def test_roles_of_a_padded_batch(tiny, batch):
    model, _ = tiny
    assert _words(model, batch, 0, "question") == ["What", "is", "the", "color", "of", "the", "circle", "?"]
    assert _words(model, batch, 1, "question") == ["Is", "the", "square", "red", "or", "blue", "?"]
    assert batch.mask("image").sum(1).tolist() == [16, 16]
    assert batch.last.tolist() == [batch.shape[1] - 1] * 2  # left padding
    assert batch.mask("pad")[1].sum() == 1 and not batch.mask("pad")[0].any()
    text, template = batch.mask("text"), batch.mask("template")
    assert torch.equal(text, batch.mask("question") | template)
    assert _words(model, batch, 0, "template") == ["<s>", "USER", ":", "ASSISTANT", ":"]


def test_right_padding_puts_last_at_each_rows_end(tiny, images):
    model, _ = tiny
    inputs = model.prepare(images=images, prompts=PROMPTS, padding_side="right")
    lengths = inputs.attention_mask.sum(1)
    assert inputs.last.tolist() == (lengths - 1).tolist()
    assert inputs.mask("last").sum().item() == 2


def test_patch_grid_positions_are_row_major(batch):
    rc = batch.patch_rc()
    image = batch.mask("image")
    rows = rc[0][image[0]]
    expected = torch.tensor([(r, c) for r in range(4) for c in range(4)])
    assert torch.equal(rows, expected)
    assert (rc[~image] == -1).all()
    assert batch.image_index()[image].tolist() == [0] * 16 + [1] * 16


def test_questions_argument_and_study_b_prompt(tiny, images):
    model, _ = tiny
    a = model.prepare(images=images[:1], questions=["Is the circle red or blue?"])
    assert _words(model, a, 0, "question") == ["Is", "the", "circle", "red", "or", "blue", "?"]
    with pytest.warns(
        UserWarning, match="outside the question"
    ):  # the system prompt's words are not in the toy vocabulary
        b = model.prepare(images=images[:1], prompts=[STUDY_B])
    assert _words(model, b, 0, "question") == ["Is", "the", "circle", "red", "or", "blue", "?"]


def test_explicit_positions_and_row_selection(batch):
    assert batch.as_mask([0, 2]).sum(1).tolist() == [2, 2]
    assert [p.tolist() for p in batch.positions([3])] == [[3], [3]]
    one = batch[1]
    assert one.input_ids.shape == (1, batch.shape[1]) and one.pixel_values.shape[0] == 1
    assert torch.equal(one.pixel_values[0], batch.pixel_values[1])


def test_related_patches_follow_the_box_through_resize_and_crop(tiny):
    model, _ = tiny
    # a 64×48 (w×h) image is resized to 42×32 then centre-cropped to 32×32, 5 px off the left:
    # x 12..20 → 3.0..8.3 touches columns 0 and 1; x 12..19 → 3.0..7.7 only column 0
    assert box_to_patches((12, 0, 20, 8), (48, 64), (32, 32), 8) == {(0, 0), (0, 1)}
    assert box_to_patches((12, 0, 19, 8), (48, 64), (32, 32), 8) == {(0, 0)}
    image = random_images(1, size=32)[0].resize((64, 48))
    inputs = model.prepare(images=[image], prompts=PROMPTS[:1], boxes=[[(12, 0, 19, 8), (40, 40, 64, 48)]])
    related = inputs.patch_rc()[inputs.mask("related")].tolist()
    assert sorted(map(tuple, related)) == [(0, 0), (3, 2), (3, 3)]
    assert inputs.mask("other_image").sum() == 16 - 3


def test_hf_style_call_equals_inputs_call(tiny, batch):
    model, _ = tiny
    with torch.no_grad():
        a = model(batch)
        b = model(batch.input_ids, pixel_values=batch.pixel_values, attention_mask=batch.attention_mask)
        _, cache = model.run_with_cache(
            batch.input_ids, pixel_values=batch.pixel_values, attention_mask=batch.attention_mask
        )
    assert torch.equal(a, b)
    assert "blocks.0.attn.hook_pattern" in cache


# --- questions through the model's chat template ------------------------------------------------
# A LLaVA-1.5-hf style template: the image, then the text and a space, then the assistant turn.
HF_STYLE = (
    "{% for m in messages %}{{ m['role'].upper() + ': ' }}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}{{ '<image>\\n' }}{% else %}{{ c['text'] + ' ' }}{% endif %}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


@pytest.fixture(scope="module")
def chatty(tiny):
    """The tiny model with a processor that carries a chat template."""
    from hooked_llava import HookedLlava
    from hooked_llava.testing import tiny_processor

    processor = tiny_processor()
    processor.chat_template = HF_STYLE
    return HookedLlava.from_hf(tiny[1], processor)


def test_questions_use_the_chat_template_when_there_is_one(chatty, images):
    q = "Is the circle red or blue?"
    inputs = chatty.prepare(images=images[:1], questions=[q])
    assert inputs.texts == [f"USER: <image>\n{q} ASSISTANT:"]
    assert _words(chatty, inputs, 0, "question") == ["Is", "the", "circle", "red", "or", "blue", "?"]
    assert _words(chatty, inputs, 0, "template") == ["<s>", "USER", ":", "ASSISTANT", ":"]


def test_an_explicit_template_wins_and_the_default_is_llava15(tiny, chatty, images):
    q = "Is the circle red or blue?"
    explicit = chatty.prepare(images=images[:1], questions=[q], template="USER: <image>\n{question}\nASSISTANT:")
    fallback = tiny[0].prepare(images=images[:1], questions=[q])  # the tiny processor has no chat template
    assert explicit.texts == fallback.texts == [f"USER: <image>\n{q}\nASSISTANT:"]
    assert torch.equal(explicit.input_ids, fallback.input_ids)
    assert torch.equal(explicit.question_mask, fallback.question_mask)


def test_a_template_that_rewrites_the_question_is_a_clear_error(tiny, images):
    from hooked_llava import HookedLlava
    from hooked_llava.testing import tiny_processor

    processor = tiny_processor()
    processor.chat_template = "USER: <image>\n{{ messages[0]['content'][1]['text'] | upper }}\nASSISTANT:"
    model = HookedLlava.from_hf(tiny[1], processor)
    with pytest.raises(ValueError, match=r"does not contain the question 'what is this\?' verbatim.*template="):
        model.prepare(images=images[:1], questions=["what is this?"])


def test_one_image_per_question(tiny, images):
    with pytest.raises(ValueError, match=r"got 2 image\(s\) for 1 question\(s\): give one image per question"):
        tiny[0].prepare(images=images, questions=["What is this?"])


# --- words the tokenizer does not know ----------------------------------------------------------
@pytest.fixture(scope="module")
def strict(tiny):
    """The tiny model with a tokenizer that raises on unknown words, as real tokenizers do by default."""
    from hooked_llava import HookedLlava
    from hooked_llava.testing import tiny_processor

    processor = tiny_processor()
    del processor.tokenizer.unknown_words  # the tiny tokenizer only warns
    return HookedLlava.from_hf(tiny[1], processor)


def test_an_unknown_word_in_the_question_is_named_with_the_known_words(strict, images):
    with pytest.raises(ValueError, match=r"does not know: 'dog'; .*Its 36 known words are: , \. : \? ASSISTANT") as e:
        strict.prepare(images=images[:1], questions=["What is the color of the dog?"])
    assert "did you mean" not in str(e.value)
    with pytest.raises(ValueError, match=r"does not know: 'Red' \(did you mean 'red'\?\)"):
        strict.prepare(images=images[:1], prompts=["USER: <image>\nIs the circle Red or blue?\nASSISTANT:"])


def test_a_tokenizer_can_ask_for_a_warning_instead(tiny, images):
    with pytest.warns(UserWarning, match=r"^the prompt holds word\(s\) this tokenizer does not know: 'it';"):
        inputs = tiny[0].prepare(images=images[:1], questions=["Is it red?"])
    assert _words(tiny[0], inputs, 0, "question") == ["Is", "<unk>", "red", "?"]


def test_unknown_words_outside_the_question_only_warn(strict, images):
    with pytest.warns(
        UserWarning, match=r"outside the question, .*'chat' \(did you mean 'What'\?\), 'between', 'curious'"
    ):
        inputs = strict.prepare(images=images[:1], prompts=[STUDY_B])
    assert _words(strict, inputs, 0, "question") == ["Is", "the", "circle", "red", "or", "blue", "?"]


def test_a_large_vocabulary_is_not_listed():
    from hooked_llava.inputs.prompts import unknown_words_message

    class Big:
        all_special_tokens = ["<unk>"]

        def get_vocab(self):
            return {f"w{i}": i for i in range(1000)} | {"<unk>": 1000}

    message = unknown_words_message(Big(), ["w10x"])
    assert message.endswith("See model.tokenizer.get_vocab() for its 1000 known tokens.")
    assert "'w10x' (did you mean 'w10'" in message


# --- a text-only model ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shapes_lm():
    from hooked_llava import HookedLlava

    return HookedLlava.from_pretrained("shapes-lm")


def test_a_text_only_model_takes_prompts_and_questions(shapes_lm):
    from hooked_llava.shapes import ShapesWorld

    ex = ShapesWorld(seed=0).example(0, "Colour")
    inputs = shapes_lm.prepare(prompts=[ex.text_prompt, "USER: Describe the image.\nASSISTANT:"])
    expected = shapes_lm.tokenizer(ex.text_prompt)["input_ids"]
    assert inputs.input_ids[0].tolist() == expected  # left padding: the longer row has none
    assert _words(shapes_lm, inputs, 0, "question") == ex.question.replace("?", " ?").split()
    assert _words(shapes_lm, inputs, 1, "question") == ["Describe", "the", "image", "."]
    asked = shapes_lm.prepare(questions=[ex.question])
    assert asked.texts == [f"USER: {ex.question}\nASSISTANT:{ex.answer_prefix}"]  # shapes-lm's chat template
    assert _words(shapes_lm, asked, 0, "question") == ex.question.replace("?", " ?").split()
    assert not asked.mask("image").any()


def test_a_text_only_model_refuses_images(shapes_lm, images):
    with pytest.raises(ValueError, match=r"text-only model \(LlamaForCausalLM, no vision tower\) and takes no images"):
        shapes_lm.prepare(images=images[:1], questions=["What is the color of the cross?"])
