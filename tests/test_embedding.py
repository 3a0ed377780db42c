"""Image tokens in vocabulary space, against HF's image features, embedding matrix and lm_head."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_no_hooks, random_norm_twin
from torch.testing import assert_close

from analyses.lens.embedding import embedding_projection, mrr, reciprocal_ranks


@pytest.fixture(scope="module")
def setup():
    """Tiny model with random RMSNorm weights (the "U" readout uses the final norm), HF twin, inputs."""
    return random_norm_twin(seed=7)


def hf_features(hf, inputs):
    with torch.no_grad():
        out = hf.model.get_image_features(
            pixel_values=inputs.pixel_values,
            vision_feature_layer=hf.config.vision_feature_layer,
            vision_feature_select_strategy=hf.config.vision_feature_select_strategy,
        )
    return torch.stack(list(out.pooler_output))  # [n_images, n_tokens, d_model]


def hf_scores(hf, feats, matrix, similarity):
    E = hf.get_input_embeddings().weight.detach()
    with torch.no_grad():
        if matrix == "U":
            return hf.lm_head(hf.model.language_model.norm(feats))
        if similarity == "cosine":
            return F.normalize(feats, dim=-1) @ F.normalize(E, dim=-1).T
        return feats @ E.T


@pytest.mark.parametrize(("matrix", "similarity"), [("E", "dot"), ("E", "cosine"), ("U", "dot")])
def test_projection_matches_hf_features(setup, matrix, similarity):
    model, hf, inputs = setup
    k = 5
    table = embedding_projection(model, inputs, matrix, k=k, similarity=similarity)
    feats = hf_features(hf, inputs)
    n_img, n_tok = feats.shape[:2]
    assert len(table) == n_img * n_tok * k
    table = table.sort_values(["image", "token_index", "rank"])
    values, ids = hf_scores(hf, feats, matrix, similarity).topk(k, dim=-1)
    assert_close(torch.tensor(table.score.to_numpy()).view(n_img, n_tok, k), values, rtol=1e-4, atol=1e-5)
    assert (torch.tensor(table.token_id.to_numpy()).view(n_img, n_tok, k) == ids).all()
    # Labels: image i fills the placeholders of row i in order; token t is patch (t // grid, t % grid).
    first = table[table["rank"] == 1]
    for i in range(n_img):
        rows = first[first.image == i]
        assert rows.position.tolist() == (inputs.input_ids[i] == model.cfg.image_token_id).nonzero()[:, 0].tolist()
        assert (rows.batch == i).all()
        assert rows.row.tolist() == [t // inputs.grid_size for t in range(n_tok)]
        assert rows.col.tolist() == [t % inputs.grid_size for t in range(n_tok)]


def test_dot_product_is_the_default_and_cosine_differs(setup):
    model, _, inputs = setup
    default = embedding_projection(model, inputs, k=3)
    dot = embedding_projection(model, inputs, "E", k=3, similarity="dot")
    cosine = embedding_projection(model, inputs, "E", k=3, similarity="cosine")
    assert default.equals(dot)
    assert not torch.allclose(torch.tensor(dot.score.to_numpy()), torch.tensor(cosine.score.to_numpy()))
    with pytest.raises(ValueError, match="logit lens"):
        embedding_projection(model, inputs, "U", similarity="cosine")


def test_reciprocal_ranks_on_known_ranks():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3], [4.0, 3.0, 2.0, 1.0]])
    assert_close(reciprocal_ranks(scores, torch.tensor([2, 3])), torch.tensor([1 / 2, 1 / 4]))
    assert_close(reciprocal_ranks(scores, torch.tensor([1, 0])), torch.tensor([1.0, 1.0]))
    assert_close(reciprocal_ranks(scores, torch.tensor([0, 1])), torch.tensor([1 / 4, 1 / 2]))


def _vector_with_rank(W_E, token, rank):
    """A residual vector whose dot products with the rows of W_E put `token` at `rank`.

    The non-zero rows of W_E are independent (d_vocab < d_model); zero rows (the padding
    embedding) always score 0, so they are given the lowest prescribed scores.
    """
    n = W_E.shape[0]
    values = torch.arange(n, 0, -1, dtype=torch.float64) * 0.5  # distinct, positive, descending
    others = sorted((t for t in range(n) if t != token), key=lambda t: bool(W_E[t].abs().sum() == 0))
    scores = torch.empty(n, dtype=torch.float64)
    scores[token] = values[rank - 1]
    scores[others] = torch.cat([values[: rank - 1], values[rank:]])
    v = (torch.linalg.pinv(W_E.double()) @ scores).float()
    planted = W_E @ v
    assert int((planted > planted[token]).sum()) + 1 == rank
    return v


def test_mrr_on_a_constructed_example_with_known_ranks(setup):
    model, _, inputs = setup
    red = model.to_single_token("red")
    W_E = model.W_E.detach()
    ranks = [[1, 2, 4], [1, 3, 10]]
    positions = torch.stack([(inputs.input_ids[b] == model.cfg.image_token_id).nonzero()[:3, 0] for b in range(2)])

    def plant(embed, hook):
        embed = embed.clone()
        for b in range(2):
            for p, r in zip(positions[b].tolist(), ranks[b], strict=True):
                embed[b, p] = _vector_with_rank(W_E, red, r)
        return embed

    with model.hooks(fwd_hooks=[("hook_embed", plant)]):
        table = mrr(model, inputs, "red", positions=positions)
    assert_no_hooks(model)
    expected = [sum(1 / r for r in row) / 3 for row in ranks]
    assert table.n_positions.tolist() == [3, 3]
    assert_close(torch.tensor(table.mrr.to_numpy()), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-6)


def test_mrr_matches_hf_at_image_positions(setup):
    model, hf, inputs = setup
    table = mrr(model, inputs, ["red", ["blue", 23]], positions="image")
    assert table[["batch", "token"]].values.tolist() == [[0, "red"], [1, "blue"], [1, "green"]]
    feats = hf_features(hf, inputs)
    for rec in table.itertuples():
        scores = hf_scores(hf, feats[rec.batch], "E", "dot")
        rank = (scores > scores[:, rec.token_id, None]).sum(-1) + 1
        assert abs(rec.mrr - float((1.0 / rank).mean())) < 1e-6
        assert rec.n_positions == feats.shape[1]
    as_mask = mrr(model, inputs, ["red", ["blue", 23]], positions=inputs.mask("image"))
    assert as_mask.equals(table)


@pytest.mark.parametrize("call", ["projection", "mrr"])
def test_no_hooks_left_even_when_a_hook_raises(setup, monkeypatch, call):
    model, _, inputs = setup
    run = (lambda: embedding_projection(model, inputs)) if call == "projection" else (lambda: mrr(model, inputs, "red"))
    run()
    assert_no_hooks(model)

    def broken(act, hook, store, select):
        raise RuntimeError("boom inside the hook")

    monkeypatch.setattr(importlib.import_module("analyses.readout"), "_keep", broken)
    with pytest.raises(RuntimeError, match="boom"):
        run()
    assert_no_hooks(model)


def test_shapes_llava_image_tokens_in_vocabulary_space(shapes_llava):
    from hooked_llava.shapes import ShapesWorld

    model = shapes_llava
    example = ShapesWorld(0).example(0, "Colour")
    inputs = model.prepare(images=[example.image], prompts=[example.prompt], boxes=[list(example.related_bboxes)])
    table = embedding_projection(model, inputs, "E", k=3)
    assert len(table) == inputs.tokens_per_image * 3
    assert table.row.between(0, inputs.grid_size - 1).all() and table.col.between(0, inputs.grid_size - 1).all()
    related = mrr(model, inputs, example.answer, positions="related")
    assert 0 < related.mrr.iloc[0] <= 1 and related.n_positions.iloc[0] == int(inputs.mask("related").sum())


def test_bad_indices_and_unknown_words_raise(setup):
    model, _, inputs = setup
    seq, d_vocab = inputs.input_ids.shape[1], model.cfg.d_vocab
    with pytest.raises(ValueError, match=rf"k must be in 1\.\.{d_vocab}, got 0"):
        embedding_projection(model, inputs, k=0)
    with pytest.raises(IndexError, match=rf"position {seq} is out of range: the sequence has positions 0\.\.{seq - 1}"):
        mrr(model, inputs, "red", positions=[seq])
    with pytest.raises(IndexError, match=rf"token id {d_vocab} is out of range"):
        mrr(model, inputs, d_vocab)
    with pytest.raises(ValueError, match=r"'Red' is not in the vocabulary"):
        mrr(model, inputs, "Red")
