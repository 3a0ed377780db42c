"""TransformerLens' own tests, ported: start/stop at layer (tests/integration/test_start_at_layer.py,
test_stop_at_layer.py) and tokenization (tests/unit/test_tokenization_methods.py), with only the model
(`shapes-lm`, or `shapes-llava` with an image) and the prompts (Shapes questions) changed.

Differences that LLaVA makes, and how the ports deal with them:
- rotary positions: there is no `hook_pos_embed` and `input_to_embed` gives no positional embedding;
- `get_token_position` raises `ValueError` with a readable message where TransformerLens asserts;
- TransformerLens' old `left_pad=True` is `padding_side="left"` (as in TransformerLens 3 and 4).
"""

from __future__ import annotations

import pytest
import torch

from hooked_llava import HookedLlava
from hooked_llava.shapes import ShapesWorld

WORLD = ShapesWorld(0)
PROMPT = WORLD.example(0, "Colour").text_prompt


@pytest.fixture(scope="module")
def model():
    model = HookedLlava.from_pretrained("shapes-lm")
    yield model
    model.remove_all_hook_fns(including_permanent=True)


@pytest.fixture(autouse=True)
def _no_hooks_left(model):
    yield
    model.remove_all_hook_fns(including_permanent=True)


@pytest.fixture(scope="module")
def llava():
    return HookedLlava.from_pretrained("shapes-llava")


# --- start_at_layer / stop_at_layer (test_start_at_layer.py, test_stop_at_layer.py) ---------------
@pytest.fixture(scope="module")
def tokens(model):
    return model.to_tokens([WORLD.example(i, "Colour").text_prompt for i in range(2)])


def layer_keys(cache, n_layers: int) -> dict[str, bool]:
    names = ["hook_embed", "ln_final.hook_normalized"]
    names += [f"blocks.{i}.hook_resid_{k}" for i in range(n_layers + 1) for k in ("pre", "post")]
    return {name: name in cache.keys() for name in names}


def expected_keys(n_layers: int, first: int, last: int, embed: bool, final: bool) -> dict[str, bool]:
    want = {"hook_embed": embed, "ln_final.hook_normalized": final}
    want |= {f"blocks.{i}.hook_resid_{k}": first <= i < last for i in range(n_layers + 1) for k in ("pre", "post")}
    return want


@pytest.mark.parametrize("start", [1, -1, None])
def test_start_at_layer_caches_only_the_layers_run(model, tokens, start):
    n = model.cfg.n_layers
    embed = model.input_to_embed(tokens)[0]
    with torch.no_grad():
        output, cache = model.run_with_cache(tokens if start is None else embed, start_at_layer=start)
    assert output.shape == (*tokens.shape, model.cfg.d_vocab)
    first = 0 if start is None else start % n
    assert layer_keys(cache, n) == expected_keys(n, first, n, embed=start is None, final=True)


def test_start_at_layer_none_with_no_output(model, tokens):
    with torch.no_grad():
        output, cache = model.run_with_cache(tokens, start_at_layer=None, return_type=None)
    n = model.cfg.n_layers
    assert output is None and layer_keys(cache, n) == expected_keys(n, 0, n, embed=True, final=True)


def test_start_at_layer_run_with_hooks_and_manual_hooks(model, tokens):
    n, counts = model.cfg.n_layers, []
    count = lambda act, hook: counts.append(hook.name)  # noqa: E731
    embed = model.input_to_embed(tokens)[0]
    names = ["hook_embed", "blocks.0.attn.hook_k", "blocks.1.mlp.hook_pre", f"blocks.{n - 1}.attn.hook_k"]
    with torch.no_grad():
        assert model.run_with_hooks(input=embed, start_at_layer=1, fwd_hooks=[(k, count) for k in names]) is not None
        assert counts == names[2:]
        counts.clear()
        model.hook_embed.add_hook(count)
        model.blocks[0].hook_mlp_out.add_hook(count)
        model.blocks[n - 2].hook_resid_mid.add_hook(count)
        model.blocks[n - 1].attn.hook_z.add_hook(count)
        model(embed, start_at_layer=-2)
    assert counts == [f"blocks.{n - 2}.hook_resid_mid", f"blocks.{n - 1}.attn.hook_z"]


def test_start_and_stop(model, tokens):
    n = model.cfg.n_layers
    with torch.no_grad():
        output, cache = model.run_with_cache(model.input_to_embed(tokens)[0], start_at_layer=1, stop_at_layer=2)
    torch.testing.assert_close(output, cache["blocks.1.hook_resid_post"])
    assert layer_keys(cache, n) == expected_keys(n, 1, 2, embed=False, final=False)


def test_start_at_layer_kwargs_give_the_same_loss(model):
    embed, tokens, pos_embed, mask = model.input_to_embed(PROMPT)
    assert tokens is not None and pos_embed is None and mask is not None  # rotary: no positional embedding
    with torch.no_grad():
        resumed = model(
            embed,
            tokens=tokens,
            shortformer_pos_embed=pos_embed,
            attention_mask=mask,
            start_at_layer=0,
            return_type="loss",
        )
        torch.testing.assert_close(resumed, model(PROMPT, return_type="loss"))


@pytest.mark.parametrize("stop", [0, 1, -1])
def test_stop_at_layer_returns_the_residual_and_caches_the_layers_run(model, tokens, stop):
    n = model.cfg.n_layers
    with torch.no_grad():
        _, normal = model.run_with_cache(tokens)
        output, cache = model.run_with_cache(tokens, stop_at_layer=stop)
    torch.testing.assert_close(output, normal[f"blocks.{stop % n}.hook_resid_pre"])
    assert layer_keys(cache, n) == expected_keys(n, 0, stop % n, embed=True, final=False)
    if stop == 1:
        assert all(key.startswith("blocks.0.") or key == "hook_embed" for key in cache.keys())


def test_stop_at_layer_with_an_image(llava):
    example = WORLD.example(0, "Colour")
    inputs = llava.prepare(images=[example.scene.image], prompts=[example.prompt])
    with torch.no_grad():
        _, normal = llava.run_with_cache(inputs)
        output = llava(inputs, stop_at_layer=3)
    torch.testing.assert_close(output, normal["blocks.3.hook_resid_pre"])


def test_stop_at_layer_run_with_hooks_and_manual_hooks(model, tokens):
    n, counts = model.cfg.n_layers, []
    count = lambda act, hook: counts.append(hook.name)  # noqa: E731
    names = ["hook_embed", "blocks.0.attn.hook_k", "blocks.1.mlp.hook_pre"]
    with torch.no_grad():
        _, normal = model.run_with_cache(tokens)
        output = model.run_with_hooks(tokens, stop_at_layer=1, fwd_hooks=[(k, count) for k in names])
        torch.testing.assert_close(output, normal["blocks.0.hook_resid_post"])
        assert counts == names[:2]
        counts.clear()
        model.hook_embed.add_hook(count)
        model.blocks[0].hook_mlp_out.add_hook(count)
        model.blocks[n - 2].hook_resid_mid.add_hook(count)
        model.blocks[n - 1].attn.hook_z.add_hook(count)
        output = model(tokens, stop_at_layer=-1)
    torch.testing.assert_close(output, normal[f"blocks.{n - 2}.hook_resid_post"])
    assert counts == ["hook_embed", "blocks.0.hook_mlp_out", f"blocks.{n - 2}.hook_resid_mid"]


# --- tokenization (test_tokenization_methods.py) --------------------------------------------------
def test_to_tokens_with_and_without_bos(model):
    ids = [model.to_single_token(w) for w in ("red", "circle")]
    assert torch.equal(model.to_tokens("red circle"), torch.tensor([[model.cfg.bos_token_id, *ids]]))
    assert torch.equal(model.to_tokens("red circle", prepend_bos=False), torch.tensor([ids]))


def test_to_tokens_device_and_truncation(model):
    assert torch.equal(model.to_tokens(PROMPT, move_to_device=False), model.to_tokens(PROMPT, move_to_device=True))
    assert model.cfg.n_ctx == 256
    long = "red " * 300
    assert model.to_tokens(long).shape == (1, 256), "truncated by default"
    assert model.to_tokens(long, truncate=False).shape == (1, 301), "not truncated"


def test_truncation_never_cuts_an_image_placeholder_block(tiny):
    model = tiny[0]
    image, n_ctx, n_image = model.processor.image_token, model.cfg.n_ctx, model.vision.cfg.n_image_tokens
    image_id = model.tokenizer.convert_tokens_to_ids(image)
    kept = model.to_tokens(image + " red" * n_ctx)  # the image fits, the text's end is cut
    assert kept.shape == (1, n_ctx) and int((kept == image_id).sum()) == n_image
    cut = "red " * (n_ctx - n_image // 2) + image  # the limit falls inside the image's placeholders
    with pytest.raises(ValueError, match="cut an image's placeholder tokens"):
        model.to_tokens(cut)
    assert int((model.to_tokens(cut, truncate=False) == image_id).sum()) == n_image


def test_to_tokens_padding_sides(model):
    short, longer = "red circle", "red circle and blue square"
    s, lg = model.to_tokens(short, prepend_bos=False)[0], model.to_tokens(longer, prepend_bos=False)[0]
    pad = torch.full((len(lg) - len(s),), model.pad_token_id)
    for texts in ([short], [short, short]):
        assert torch.equal(model.to_tokens(texts, prepend_bos=False, padding_side="left"), s.expand(len(texts), -1))
    for bos in (False, True):
        b = torch.tensor([model.cfg.bos_token_id] if bos else [], dtype=torch.long)
        right = model.to_tokens([short, longer], prepend_bos=bos)
        left = model.to_tokens([short, longer], prepend_bos=bos, padding_side="left")
        assert torch.equal(right, torch.stack([torch.cat([b, s, pad]), torch.cat([b, lg])]))
        assert torch.equal(left, torch.stack([torch.cat([pad, b, s]), torch.cat([b, lg])]))


def test_to_string_round_trips(model):
    assert model.to_string(model.to_tokens(PROMPT, prepend_bos=False)[0]) == model.tokenizer.decode(
        model.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    )
    bos, red = model.cfg.bos_token_id, model.to_single_token("red")
    assert model.to_string(torch.tensor([[bos, red], [red, red]])) == ["<s> red", "red red"]


def test_to_str_tokens_with_and_without_bos(model):
    assert model.to_str_tokens("red circle") == ["<s>", "red", "circle"]
    assert model.to_str_tokens("red circle", prepend_bos=False) == ["red", "circle"]


def test_to_single_token_and_back(model):
    token = model.to_single_token("circle")
    assert model.tokenizer.convert_ids_to_tokens(token) == "circle"
    assert model.to_single_str_token(token) == "circle"


def test_get_token_position(model):
    text = "There is a red circle"
    with pytest.raises(ValueError, match="does not occur in the input"):
        model.get_token_position("blue", text)
    assert model.get_token_position("red", text) == 4
    assert model.get_token_position("red", text, prepend_bos=False) == 3
    ids = torch.tensor([2.0, 3, 4, 2, 5])
    assert model.get_token_position(2, ids[:3]) == model.get_token_position(2, ids[:3], prepend_bos=False) == 0
    assert model.get_token_position(2, ids, mode="last") == 3
    assert model.get_token_position(2, ids[None, :3]) == 0


def test_tokens_to_residual_directions(model):
    direction = model.tokens_to_residual_directions(model.to_tokens(""))
    assert direction.shape == (model.cfg.d_model,)
    torch.testing.assert_close(direction, model.W_U[:, model.cfg.bos_token_id])
