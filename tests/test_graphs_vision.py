"""Attribution graphs through the projector and the vision tower (`analyses.graphs.attribute_through_vision`).

Checked against independent computations: the linear identity of the replacement model against a
hand-made forward in which every source (pixel inputs, token embeddings, features, errors) is zero and
only the constants are left; the spliced vision transcoders against the model's logits; the Shapes
world's ground truth (which patches the asked object covers) against the pixel nodes' influence; the
shipped vision transcoders against their card; and the circuit-tracer export's ids against the graph.
"""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch

from analyses.graphs import (
    attribute_through_vision,
    graph_scores,
    node_influence,
    prune_graph,
    to_circuit_tracer_json,
    top_features,
)
from analyses.graphs.replacement import clean_run
from analyses.graphs.vision_replacement import ThroughVisionModel, vision_clean_run
from hooked_llava import HookedLlava
from hooked_llava.shapes import ShapesWorld, checkpoint_path
from hooked_llava.transcoders import TranscoderSet, load_transcoders
from hooked_llava.transcoders.card import evaluate
from hooked_llava.transcoders.splice import mlp_replacement_hooks
from hooked_llava.transcoders.train import LayerPairs, train_transcoders, vision_hooks


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return HookedLlava.from_pretrained("shapes-llava")


@pytest.fixture(scope="module")
def ts():
    return load_transcoders("shapes-llava")


@pytest.fixture(scope="module")
def vts():
    return load_transcoders("shapes-llava-vision")


@pytest.fixture(scope="module")
def inputs(model):
    e = ShapesWorld(7).example(3, "Colour")
    return model.prepare(images=[e.image], prompts=[e.prompt])


@pytest.fixture(scope="module")
def graph(model, inputs, ts, vts):
    return attribute_through_vision(model, inputs, ts, vts, max_feature_nodes=192)


def _replace(x, hook, value):
    return value.to(x.dtype).expand_as(x)


def _store(x, hook, into):
    into[hook.name] = x
    return x


def _text_zero(x, hook, image):
    return torch.where(image, x, torch.zeros_like(x))


def _frozen_names(model):
    n, nv = model.cfg.n_layers, model.vision.cfg.n_layers_computed
    names = [f"blocks.{i}.attn.hook_pattern" for i in range(n)]
    names += [f"blocks.{i}.{ln}.hook_scale" for i in range(n) for ln in ("ln1", "ln2")] + ["ln_final.hook_scale"]
    names += [f"vision.blocks.{i}.attn.hook_pattern" for i in range(nv)] + ["vision.ln_pre.hook_scale"]
    return names + [f"vision.blocks.{i}.{ln}.hook_scale" for i in range(nv) for ln in ("ln1", "ln2")]


@torch.no_grad()
def constant_readings(model, inputs, ts, vts):
    """The readings with every source at zero: a hand-made forward in which the clean run's attention patterns
    and norm scales are put back, what enters the tower is zero, every text-token embedding is zero, and every
    MLP's (and the projector's) output is its transcoder's `b_dec` alone. Returns the last position's logits
    and each input hook's value (row 0)."""
    frozen = _frozen_names(model)
    with model.hook_switches(use_eager_attention=True):
        _, cache = model.run_with_cache(inputs, names_filter=frozen)
    hooks = [(name, partial(_replace, value=cache[name])) for name in frozen]
    hooks.append(("vision.hook_embed", partial(_replace, value=torch.zeros(model.vision.cfg.d_model))))
    hooks.append(("hook_embed", partial(_text_zero, image=inputs.image_mask[..., None])))
    readings = {}
    for t in (ts, vts):
        hooks += [(t.output_hook(i), partial(_replace, value=t[i].b_dec.detach())) for i in range(len(t))]
        hooks += [(t.input_hook(i), partial(_store, into=readings)) for i in range(len(t))]
    with model.hook_switches(use_eager_attention=True), model.hooks(fwd_hooks=hooks):
        logits = model(inputs)
    return logits[0, int(inputs.last[0])], {name: x[0] for name, x in readings.items()}


def test_linear_identity(model, inputs, ts, vts, graph):
    """Each target's input = the sum of its in-edges from every source + the constants; the logit targets'
    inputs are the model's logits. Checked on all logit targets and on features of every kind (language
    model, each vision MLP, the projector); then the graph's rows are those rows at its columns."""
    clean, vclean = clean_run(model, inputs, ts), vision_clean_run(model, inputs, vts)
    frozen = ThroughVisionModel(model, inputs, ts, vts, clean, vclean, 64)
    const_logits, const_x = constant_readings(model, inputs, ts, vts)
    with torch.no_grad():
        logits = model(inputs)[0, int(inputs.last[0])]
    t = torch.tensor(graph.logit_targets)
    logit_rows = frozen.rows(frozen.logit_reading[torch.arange(len(t)), t]).double()
    want = (logits - logits.mean())[t].double()
    got = logit_rows.sum(1) + (const_logits - const_logits.mean())[t].double()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    # 16 features of each language-model layer group and of each vision stage, drawn at random
    gen, n_lm = torch.Generator().manual_seed(0), len(clean.active)
    lm = torch.randperm(n_lm, generator=gen)[:16]
    vision = [torch.nonzero(vclean.active[:, 0] == s).flatten() for s in range(len(vts))]
    vision = [v[torch.randperm(len(v), generator=gen)[:12]] + n_lm for v in vision]
    chunk = torch.cat([lm, *vision])
    rows = frozen.rows(frozen.readings(chunk)).double()
    want, const = [], []
    for idx in chunk.tolist():
        if idx < n_lm:
            layer, p, f = clean.active[idx].tolist()
            tc, hook = ts[layer], ts.input_hook(layer)
            x = clean.mlp_in[layer][p]
        else:
            s, vpos, f = vclean.active[idx - n_lm].tolist()
            tc, hook, p = vts[s], vts.input_hook(s), vpos - vclean.offsets[s]
            x = vclean.mlp_in[s][p]
        want.append(x.double() @ tc.W_enc[f].double())
        const.append(const_x[hook][p].double() @ tc.W_enc[f].double())
    torch.testing.assert_close(rows.sum(1) + torch.stack(const), torch.stack(want), atol=1e-4, rtol=1e-5)
    # the graph holds exactly those rows at its columns: its logit rows, and its selected features' rows
    selected = torch.cat([graph.selected_features, graph.vision_selected_features + n_lm])
    columns = torch.cat([selected, torch.arange(n_lm + len(vclean.active), rows.shape[1])])
    a = graph.adjacency_matrix.double()
    torch.testing.assert_close(a[graph.logit_start :, : len(columns)], logit_rows[:, columns], atol=1e-5, rtol=1e-4)
    some = [k for k, idx in enumerate(selected.tolist()) if idx in set(chunk.tolist())]
    assert a[graph.error_start : graph.logit_start].abs().sum() == 0  # error and input rows have no in-edges
    for k in some:
        row = rows[chunk.tolist().index(int(selected[k]))]
        torch.testing.assert_close(a[k, : len(columns)], row[columns], atol=1e-5, rtol=1e-4)


def test_spliced_vision_transcoders_keep_the_logits(model, inputs, ts, vts):
    """Every vision MLP, the projector and every language-model MLP replaced by its transcoder plus the clean
    error term: the model's own logits (≤ 1e-4); without the error terms, still the same answer."""
    names = [t.input_hook(i) for t in (ts, vts) for i in range(len(t))]
    names += [t.output_hook(i) for t in (ts, vts) for i in range(len(t))]
    with torch.no_grad():
        logits, cache = model.run_with_cache(inputs, names_filter=names)
        hooks = []
        for t in (vts, ts):
            errors = {i: cache[t.output_hook(i)] - t[i](cache[t.input_hook(i)]) for i in range(len(t))}
            hooks += mlp_replacement_hooks(t, errors)
        with model.hooks(fwd_hooks=hooks):
            same = model(inputs)
        with model.hooks(fwd_hooks=mlp_replacement_hooks(vts)):
            alone = model(inputs)
    assert (same - logits).abs().max() <= 1e-4, float((same - logits).abs().max())
    last = int(inputs.last[0])
    assert alone[0, last].argmax() == logits[0, last].argmax()


def test_graph_layout_and_scores(model, inputs, graph):
    """Node groups in circuit-tracer's order with the vision side, patches on the grid, and sane scores."""
    n_vpos = model.vision.cfg.n_ctx
    assert graph.n_vpos == n_vpos and graph.n_vision_layers == model.vision.cfg.n_layers_computed + 1
    n_errors = graph.n_layers * graph.n_pos + graph.n_vision_layers * n_vpos
    n_nodes = graph.n_features + n_errors + graph.n_pos + n_vpos + graph.n_logits
    assert graph.n_nodes == graph.adjacency_matrix.shape[0] == n_nodes
    patches = graph.image_token_nodes()
    grid = int((n_vpos - 1) ** 0.5)
    assert (patches.patch_row * grid + patches.patch_col).tolist() == (patches.vpos - 1).tolist()
    assert (patches.node == graph.pixel_start + patches.vpos).all()
    image_pos = graph.positions.pos[graph.positions.is_image].tolist()
    assert patches.pos.tolist() == image_pos
    tokens_at_image = torch.tensor([graph.token_node(p) for p in image_pos])
    assert graph.adjacency_matrix[:, tokens_at_image].abs().sum() == 0  # the projector writes there
    assert graph.adjacency_matrix[:, graph.pixel_start : graph.logit_start].abs().sum() > 0
    towers = graph.feature_nodes().tower
    assert set(towers) >= {"language", "projector"}
    replacement, completeness = graph_scores(graph)
    assert 0 < replacement <= 1 and 0 < completeness <= 1
    top = top_features(graph, n=graph.n_features)
    vision = top[top.tower != "language"]
    vp = graph.vision_positions
    for r in vision.itertuples():  # vision-side features are named by their patch (or CLS), not a token
        want = "cls" if r.pos == 0 else f"img {vp.patch_row[r.pos]},{vp.patch_col[r.pos]}"
        assert r.token == want and r.clerp == ""
    pruned = prune_graph(graph)
    assert pruned.node_mask[graph.token_start :].all()


def _two_object_colour_questions(world, n):
    examples, i = [], 0
    while len(examples) < n:
        e = world.example(i, "Colour")
        examples.append(e) if len(e.scene.objects) == 2 else None
        i += 1
    return examples


def test_the_answer_flows_from_the_asked_objects_pixels(model, ts, vts):
    """Colour questions about one of two objects: the pixel nodes of the asked object's patches get ≥ 2× their
    area's share of the pixel nodes' influence (CLS excluded) in ≥ 3 of 4 scenes (the issue's bar), and in
    fact ≥ 4× in all 4 (measured: 6.3–9.7×), and more influence per patch than the other object's patches.
    And zeroing the 10 most influential vision-side features (vision MLPs and projector, in the real model with
    the other features re-encoded and error terms kept) lowers the answer's logit > 3× as much as zeroing 10
    random active ones (mean over the scenes; measured 2.25 against 0.03)."""
    world = ShapesWorld(11)
    shares, others, drops = [], [], {"top": [], "random": []}
    gen = torch.Generator().manual_seed(0)
    for e in _two_object_colour_questions(world, 4):
        inputs = model.prepare(images=[e.image], prompts=[e.prompt])
        g = attribute_through_vision(model, inputs, ts, vts, max_feature_nodes=256)
        infl = node_influence(g)
        top = g.vision_selected_features[infl[g.n_lm_features : g.n_features].topk(10).indices]
        chosen = {"top": top, "random": torch.randperm(len(g.vision_active_features), generator=gen)[:10]}
        answer = model.processor.tokenizer.convert_tokens_to_ids(e.answer)
        for kind, rows in chosen.items():
            drops[kind].append(_answer_drop(model, inputs, vts, g.vision_active_features[rows].tolist(), answer))
        patches = g.image_token_nodes()
        asked = next(i for i, o in enumerate(e.scene.objects) if o.shape in e.question)
        cells = set(world.object_patches(e.scene)[asked])
        on = torch.tensor([r * world.grid + c in cells for r, c in zip(patches.patch_row, patches.patch_col)])
        share = infl[torch.tensor(patches.node.to_numpy())]
        shares.append(float(share[on].sum() / share.sum()) / (len(cells) / world.grid**2))
        other = set(world.object_patches(e.scene)[1 - asked]) - cells
        off = torch.tensor([r * world.grid + c in other for r, c in zip(patches.patch_row, patches.patch_col)])
        others.append(float(share[off].sum() / share.sum()) / (len(other) / world.grid**2))
    assert sum(s >= 2 for s in shares) >= 3, f"share over area share per scene: {shares}"
    assert min(shares) >= 4, f"share over area share per scene: {shares}"
    assert all(s > o for s, o in zip(shares, others)), f"asked object {shares}, other object {others}"
    top_mean, random_mean = sum(drops["top"]) / 4, sum(drops["random"]) / 4
    assert top_mean > 0 and top_mean > 3 * random_mean, drops


def _zero(stage, acts, keys, n_stages):
    acts = acts.clone()
    for s, vpos, f in keys:
        if s == stage:  # the projector's position j is the vision position 1 + j (the tower's CLS is dropped)
            acts[:, vpos - (s == n_stages - 1), f] = 0
    return acts


@torch.no_grad()
def _answer_drop(model, inputs, vts, keys, answer):
    """How much the answer's logit falls when the vision-side features `keys` (stage, vpos, feature) are zeroed
    (every vision MLP and the projector replaced by its transcoder plus the clean error term)."""
    names = [vts.input_hook(s) for s in range(len(vts))] + [vts.output_hook(s) for s in range(len(vts))]
    logits, cache = model.run_with_cache(inputs, names_filter=names)
    errors = {s: cache[vts.output_hook(s)] - vts[s](cache[vts.input_hook(s)]) for s in range(len(vts))}
    last = int(inputs.last[0])
    with model.hooks(fwd_hooks=mlp_replacement_hooks(vts, errors, partial(_zero, keys=keys, n_stages=len(vts)))):
        return float(logits[0, last, answer] - model(inputs)[0, last, answer])


def test_shipped_vision_transcoders_meet_their_card(model, vts):
    """FVE, L0 and accuracy with every vision MLP and the projector replaced, recomputed on other held-out
    questions, match eval.json."""
    card = json.loads((checkpoint_path("shapes-llava-vision-transcoders") / "eval.json").read_text())
    got = evaluate(model, vts, n_per_category=8, seed=card["eval_seed"] + 1)
    assert min(card["fve"]) >= 0.8 and min(got["fve"]) >= 0.8
    for layer, (fve, l0) in enumerate(zip(card["fve"], card["l0"])):
        assert abs(got["fve"][layer] - fve) < 0.05, layer
        assert abs(got["l0"][layer] - l0) < 1.0, layer
    assert abs(got["replaced"]["accuracy"] - card["replaced"]["accuracy"]) < 8
    assert got["original"]["accuracy"] - got["replaced"]["accuracy"] < 8


def test_circuit_tracer_json_with_vision_nodes(graph, tmp_path):
    data = json.loads(to_circuit_tracer_json(graph, tmp_path, slug="pixels", node_threshold=0.9).read_text())
    ids = [n["node_id"] for n in data["nodes"]]
    assert len(set(ids)) == len(ids)
    assert all(link["source"] in set(ids) and link["target"] in set(ids) for link in data["links"])
    by_id = {n["node_id"]: n for n in data["nodes"]}
    patches = graph.image_token_nodes()
    tokens = graph.input_tokens.tolist()
    for pos, vpos, r, c in zip(patches.pos, patches.vpos, patches.patch_row, patches.patch_col):
        node = by_id[f"E_{tokens[pos]}_{pos}"]  # every pixel node is an input node, always written
        assert node["clerp"] == f"img {r},{c}" and node["vision_pos"] == vpos and node["feature_type"] == "embedding"
    assert by_id[f"E_cls_{patches.pos[0]}"]["vision_pos"] == 0
    vision_feats = [n for n in data["nodes"] if n["feature_type"] == "cross layer transcoder" and "vision_pos" in n]
    assert vision_feats, "no vision-side feature survived pruning"
    table = graph.vision_active_features.tolist()
    for n in vision_feats:
        layer, f, vpos = n["node_id"].split("_")
        stage = graph.n_vision_layers - 1 if layer == "P" else int(layer[1:])
        assert [stage, int(vpos), int(f)] in table
    kinds = {n["feature_type"] for n in data["nodes"]}
    assert kinds >= {"cross layer transcoder", "embedding", "logit"}


def test_vision_pairs_training_and_hook_lists(model, tmp_path):
    """The vision trainer's pairs are each layer's real (input, output) — the block's MLP (or the projector)
    applied to the row's input gives its output —, a tiny seeded run trains, and the per-layer hook lists
    survive the round trip through circuit-tracer's format."""
    inputs_, outputs = vision_hooks(model)
    source = LayerPairs(model, inputs_, outputs, batch_size=128, examples_per_batch=4)
    batch = source.batch(0)  # [128, 4, 2, d]
    with torch.no_grad():
        for s in range(model.vision.cfg.n_layers_computed):
            torch.testing.assert_close(model.vision.blocks[s].mlp(batch[None, :, s, 0])[0], batch[:, s, 1])
        torch.testing.assert_close(model.projector(batch[None, :, -1, 0])[0], batch[:, -1, 1])
    kw = dict(d_transcoder=32, k=4, total_samples=2 * 128, batch_size=128, examples_per_batch=4)
    trained = train_transcoders(model, tmp_path / "v", input_hook=inputs_, output_hook=outputs, **kw)
    again = load_transcoders(tmp_path / "v")
    assert [again.input_hook(i) for i in range(len(again))] == inputs_
    assert [again.output_hook(i) for i in range(len(again))] == outputs
    torch.testing.assert_close(again[3].W_enc, trained[3].W_enc)
    with pytest.raises(ValueError, match="one per layer"):
        TranscoderSet(list(again), inputs_[:2], outputs)


def test_bad_vision_sets_say_what_is_wrong(model, inputs, ts, vts):
    with pytest.raises(ValueError, match="need 3 vision MLPs and then the projector"):
        attribute_through_vision(model, inputs, ts, ts)
    with pytest.raises(ValueError, match="transcoder set has 4 layers"):
        attribute_through_vision(model, inputs, vts, vts)
    text = model.prepare(prompts=["What is the color of the star?"])
    with pytest.raises(ValueError, match="exactly one image"):
        attribute_through_vision(model, text, ts, vts)
