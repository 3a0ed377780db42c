"""TransformerLens' tokenizer, loss, generate and embedding-entry surface, with TL's defaults."""

from __future__ import annotations

import copy
import io
from contextlib import redirect_stdout

import pytest
import torch
import torch.nn.functional as F
from conftest import PROMPTS, TEXTS, ids_by_hand

from hooked_llava import HookedLlava
from hooked_llava.inputs.llava_inputs import LlavaInputs
from hooked_llava.testing import random_images, tiny_model

try:  # TransformerLens 4 moved `utils` to `utilities`
    from transformer_lens.utilities import test_prompt as tl_test_prompt
except ImportError:  # pragma: no cover - TransformerLens 3
    from transformer_lens.utils import test_prompt as tl_test_prompt


# --- to_tokens, prepend_bos, padding_side -------------------------------------------------------
def test_to_tokens_prepends_bos_by_default_and_pads_right(tiny):
    model, _ = tiny
    a, b = ids_by_hand(model, TEXTS[0]), ids_by_hand(model, TEXTS[1])
    assert model.to_tokens(TEXTS[0]).tolist() == [a]
    assert model.to_tokens(TEXTS[0], prepend_bos=False).tolist() == [a[1:]]
    pad = model.tokenizer.pad_token_id
    assert model.to_tokens(TEXTS).tolist() == [a, b + [pad] * (len(a) - len(b))]
    assert model.to_tokens(TEXTS, padding_side="left").tolist() == [a, [pad] * (len(a) - len(b)) + b]
    with pytest.raises(ValueError, match="padding_side must be 'left' or 'right'"):
        model.to_tokens(TEXTS, padding_side="middle")


def test_to_tokens_without_a_pad_token_pads_with_eos_and_leaves_the_tokenizer_alone(tiny, monkeypatch):
    model, _ = tiny
    tok = copy.deepcopy(model.tokenizer)
    tok.pad_token = None
    assert tok.pad_token_id is None and tok.eos_token_id is not None
    monkeypatch.setattr(model, "processor", tok)
    ids = model.to_tokens(TEXTS)
    short = len(ids_by_hand(model, TEXTS[1]))
    assert ids[1, short:].eq(tok.eos_token_id).all() and ids.shape[1] > short
    assert tok.pad_token_id is None


def test_forward_on_text_masks_the_padding_it_makes(tiny):
    model, _ = tiny
    alone = model(TEXTS[1])[0]
    right = model(TEXTS, padding_side="right")[1, : alone.shape[0]]
    left = model(TEXTS, padding_side="left")[1, -alone.shape[0] :]
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=1e-5)
    no_bos = model(TEXTS[1], prepend_bos=False)
    torch.testing.assert_close(no_bos, model(torch.tensor([ids_by_hand(model, TEXTS[1], bos=False)])))


@pytest.mark.parametrize("name", ["shapes-lm", "shapes-llava"])
def test_transformer_lens_test_prompt_runs_and_reports_the_true_rank(name):
    model = HookedLlava.from_pretrained(name)
    prompt = "USER: What color is the circle ?\nASSISTANT:"
    out = io.StringIO()
    with redirect_stdout(out):
        tl_test_prompt(prompt, "red", model, top_k=3)
    printed = out.getvalue()
    ids = model.tokenizer(prompt)["input_ids"]  # the tokenizer's own BOS
    assert f"Tokenized prompt: {model.tokenizer.convert_ids_to_tokens(ids)}" in printed
    logits = model(torch.tensor([ids + [model.to_single_token("red")]]))[0, -2]
    rank = int((logits > logits[model.to_single_token("red")]).sum())
    assert f"[('red', {rank})]" in printed.replace("\n", " ").split("Ranks of the answer tokens:")[-1]


# --- to_str_tokens -----------------------------------------------------------------------------
def test_to_str_tokens_on_text_lists_and_tensors(tiny):
    model, _ = tiny
    words = model.tokenizer.convert_ids_to_tokens(
        ids_by_hand(model, TEXTS[0])
    )  # word-level: decoding = the vocab entry
    assert model.to_str_tokens(TEXTS[0]) == words
    assert model.to_str_tokens(TEXTS[0], prepend_bos=False) == words[1:]
    assert model.to_str_tokens(TEXTS) == [words, model.tokenizer.convert_ids_to_tokens(ids_by_hand(model, TEXTS[1]))]
    ids = model.to_tokens(TEXTS)
    assert model.to_str_tokens(ids[0]) == model.to_str_tokens(ids[:1]) == words
    batch = model.to_str_tokens(ids)
    assert len(batch) == 2 and batch[0] == words and len(batch[1]) == ids.shape[1]
    assert model.to_str_tokens(ids[0, 1]) == [words[1]]
    with pytest.raises(ValueError, match=r"\[pos\] or \[batch, pos\]"):
        model.to_str_tokens(ids[None])


def test_to_str_tokens_shows_image_positions_by_grid_cell(tiny, batch):
    model, _ = tiny
    rows = model.to_str_tokens(batch)
    assert len(rows) == 2 and all(len(r) == batch.shape[1] for r in rows)
    grid = batch.grid_size
    for row, strs in enumerate(rows):
        image = batch.mask("image")[row].nonzero()[:, 0].tolist()
        assert [strs[p] for p in image] == [f"<img {r},{c}>" for r in range(grid) for c in range(grid)]
        text = batch.mask("text")[row].nonzero()[:, 0]
        assert [strs[p] for p in text.tolist()] == model.to_str_tokens(batch.input_ids[row, text])
    assert model.to_str_tokens(batch[0]) == rows[0]


def test_to_str_tokens_labels_cls_and_next_newlines():
    model, _ = tiny_model(seed=0, strategy="full")
    inputs = model.prepare(images=random_images(1), prompts=PROMPTS[:1])
    strs = model.to_str_tokens(inputs)
    image = inputs.mask("image")[0].nonzero()[:, 0].tolist()
    assert strs[image[0]] == "<img cls>" and strs[image[1]] == "<img 0,0>" and strs[image[-1]] == "<img 3,3>"
    img = model.cfg.image_token_id
    table = [("base", 0, 0, 1, 0, 1, None), ("highres", 1, 2, 3, 2, 3, None), ("newline", -1, 2, 4, -1, -1, None)]
    next_inputs = LlavaInputs(
        input_ids=torch.tensor([[1, img, img, img, 2]]),
        attention_mask=torch.ones(1, 5, dtype=torch.long),
        image_token_id=img,
        tokens_per_image=3,
        token_tables=[table],
    )
    assert model.to_str_tokens(next_inputs)[1:4] == ["<img 0,1>", "<img hi 2,3>", "<img newline>"]


# --- get_token_position, to_single_str_token ---------------------------------------------------
def test_get_token_position_first_last_and_bos_offset(tiny):
    model, _ = tiny
    text = "USER: the circle and the square"
    ids = ids_by_hand(model, text)
    the = model.to_single_token("the")
    first, last = ids.index(the), len(ids) - 1 - ids[::-1].index(the)
    assert first != last
    assert model.get_token_position("the", text) == first
    assert model.get_token_position(the, text, mode="last") == last
    assert model.get_token_position("the", text, prepend_bos=False) == first - 1
    assert model.get_token_position(torch.tensor(the), torch.tensor([ids])) == first
    with pytest.raises(ValueError, match="does not occur"):
        model.get_token_position("red", text)
    with pytest.raises(ValueError, match="one sequence"):
        model.get_token_position("the", torch.tensor([ids, ids]))
    with pytest.raises(ValueError, match="'first' or 'last'"):
        model.get_token_position("the", text, mode="middle")


def test_to_single_str_token_inverts_to_single_token(tiny):
    model, _ = tiny
    assert model.to_single_str_token(model.to_single_token("circle")) == "circle"
    with pytest.raises(TypeError, match="one token id"):
        model.to_single_str_token(torch.tensor([3, 4]))


# --- loss --------------------------------------------------------------------------------------
def test_loss_fn_matches_cross_entropy_and_masks_padding(tiny):
    model, _ = tiny
    tokens = model.to_tokens(TEXTS)
    mask = (tokens != model.tokenizer.pad_token_id).long()
    logits = model(tokens, attention_mask=mask)
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none")
    per_token = model.loss_fn(logits, tokens, per_token=True)
    assert per_token.shape == (2, tokens.shape[1] - 1)
    torch.testing.assert_close(per_token, ce)
    torch.testing.assert_close(model.loss_fn(logits, tokens), ce.mean())
    keep = mask[:, 1:].bool()  # right padding: the source of a real target is real
    masked = model.loss_fn(logits, tokens, mask, per_token=True)
    torch.testing.assert_close(masked[keep], ce[keep])
    assert masked[~keep].eq(0).all() and (~keep).any()
    torch.testing.assert_close(model.loss_fn(logits, tokens, mask), ce[keep].mean())


def test_forward_loss_per_token_on_text_skips_the_padding(tiny):
    model, _ = tiny
    per_token = model(TEXTS, return_type="loss", loss_per_token=True)
    alone = model(TEXTS[1], return_type="loss", loss_per_token=True)[0]
    assert per_token.shape == (2, model.to_tokens(TEXTS).shape[1] - 1)
    torch.testing.assert_close(per_token[1, : len(alone)], alone, atol=1e-5, rtol=1e-5)
    assert per_token[1, len(alone) :].eq(0).all()
    logits, loss = model(TEXTS[1], return_type="both")
    torch.testing.assert_close(loss, alone.mean())


def test_loss_on_image_inputs_equals_hf_with_image_and_padding_labels_ignored(tiny, batch):
    model, hf = tiny
    per_token = model(batch, return_type="loss", loss_per_token=True)
    assert per_token.shape == (2, batch.shape[1] - 1)
    image, real = batch.mask("image"), batch.attention_mask.bool()
    assert per_token[image[:, 1:]].eq(0).all() and per_token[~real[:, :-1]].eq(0).all()
    labels = batch.input_ids.masked_fill(image | ~real, -100)
    labels[:, 1:] = labels[:, 1:].masked_fill(~real[:, :-1], -100)  # TL also drops predictions made at padding
    with torch.no_grad():
        ref = hf(**{k: getattr(batch, k) for k in ("input_ids", "pixel_values", "attention_mask")}, labels=labels)
    torch.testing.assert_close(model(batch, return_type="loss"), ref.loss, atol=1e-5, rtol=1e-5)


# --- input_to_embed, start_at_layer ------------------------------------------------------------
def test_input_to_embed_returns_tl_tuple_and_resumes_to_the_same_logits(tiny, batch):
    model, _ = tiny
    full, cache = model.run_with_cache(batch, names_filter="hook_embed")
    residual, tokens, shortformer, mask = model.input_to_embed(batch)
    torch.testing.assert_close(residual, cache["hook_embed"])
    assert torch.equal(tokens, batch.input_ids) and torch.equal(mask, batch.attention_mask) and shortformer is None
    resumed = model(residual, start_at_layer=0, tokens=tokens, attention_mask=mask, shortformer_pos_embed=shortformer)
    torch.testing.assert_close(resumed, full)
    text_residual, text_tokens, _, _ = model.input_to_embed(TEXTS[0], prepend_bos=False)
    assert torch.equal(text_tokens, model.to_tokens(TEXTS[0], prepend_bos=False))
    assert text_residual.shape == (1, text_tokens.shape[1], model.cfg.d_model)


@pytest.mark.parametrize("layer", [0, 1, 3])
def test_stop_then_start_at_layer_equals_the_full_forward(tiny, batch, layer):
    model, _ = tiny
    full = model(batch)
    resid = model(batch, stop_at_layer=layer)
    torch.testing.assert_close(model(resid, start_at_layer=layer, tokens=batch), full)
    torch.testing.assert_close(model(batch, start_at_layer=layer, residual=resid), full)
    ids = batch.input_ids
    torch.testing.assert_close(
        model(resid, start_at_layer=layer, tokens=ids, attention_mask=batch.attention_mask), full
    )
    unpadded = batch[0]
    assert unpadded.attention_mask.all()
    alone = model(model(unpadded, stop_at_layer=layer), start_at_layer=layer)  # TL 4: the residual alone
    torch.testing.assert_close(alone, full[:1])
    loss = model(resid, start_at_layer=layer, tokens=batch, return_type="loss")
    torch.testing.assert_close(loss, model(batch, return_type="loss"))


def test_start_at_layer_errors_say_what_to_pass(tiny, batch):
    model, _ = tiny
    resid = model(batch, stop_at_layer=1)
    with pytest.raises(ValueError, match="residual stream"):
        model(batch, start_at_layer=1)
    with pytest.raises(ValueError, match="pass tokens="):
        model(resid, start_at_layer=1, return_type="loss")
    with pytest.raises(ValueError, match="these inputs need"):
        model(resid[:, 1:], start_at_layer=1, tokens=batch)
    with pytest.raises(ValueError, match="only apply with start_at_layer"):
        model(batch, residual=resid)
    with pytest.raises(ValueError, match="shortformer_pos_embed"):
        model(batch, shortformer_pos_embed=resid)
