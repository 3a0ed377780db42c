"""Attribution graphs (`analyses.graphs`) on shapes-llava with its shipped transcoders.

Each result is checked against an independent computation: the linear identity of the replacement
model against a hand-made forward with every source set to zero (only the biases left), and the
clean logits; the ground truth of the Shapes world (which patches the asked object covers) against
the graph's influence; and the graph's feature ranking against interventions.
"""

from __future__ import annotations

import json
from functools import partial

import pandas as pd
import pytest
import torch

from analyses.graphs import attribute, graph_scores, intervene, node_influence, prune_graph, to_circuit_tracer_json
from hooked_llava import HookedLlava
from hooked_llava.shapes import ShapesWorld
from hooked_llava.transcoders import load_transcoders


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return HookedLlava.from_pretrained("shapes-llava")


@pytest.fixture(scope="module")
def ts():
    return load_transcoders("shapes-llava")


@pytest.fixture(scope="module")
def example():
    return ShapesWorld(7).example(3, "Colour")


@pytest.fixture(scope="module")
def inputs(model, example):
    return model.prepare(images=[example.image], prompts=[example.prompt])


@pytest.fixture(scope="module")
def graph(model, inputs, ts):
    return attribute(model, inputs, ts)


@pytest.fixture(scope="module")
def small_graph(model, inputs, ts):
    return attribute(model, inputs, ts, max_feature_nodes=256)


def _replace(x, hook, value):
    return value.to(x.dtype).expand_as(x)


def _store(x, hook, into):
    into[hook.name] = x
    return x


@torch.no_grad()
def bias_only_readings(model, inputs, ts):
    """The targets' readings with every source (embeddings, features, errors) at zero: what the biases give.

    A hand-made forward: the clean run's attention patterns and norm scales are put back by hooks, the
    embeddings are zeros and every MLP's output is its transcoder's `b_dec` alone.
    """
    n = model.cfg.n_layers
    frozen = [f"blocks.{i}.attn.hook_pattern" for i in range(n)]
    frozen += [f"blocks.{i}.{ln}.hook_scale" for i in range(n) for ln in ("ln1", "ln2")] + ["ln_final.hook_scale"]
    with model.hook_switches(use_eager_attention=True):
        _, cache = model.run_with_cache(inputs, names_filter=frozen)
    hooks = [(name, partial(_replace, value=cache[name])) for name in frozen]
    hooks.append(("hook_embed", partial(_replace, value=torch.zeros(model.cfg.d_model))))
    hooks += [(ts.output_hook(i), partial(_replace, value=ts[i].b_dec.detach())) for i in range(n)]
    mlp_in = {}
    hooks += [(ts.input_hook(i), partial(_store, into=mlp_in)) for i in range(n)]
    with model.hook_switches(use_eager_attention=True), model.hooks(fwd_hooks=hooks):
        logits = model(inputs)
    return logits[0, int(inputs.last[0])], [mlp_in[ts.input_hook(i)][0] for i in range(n)]


def test_linear_identity(model, inputs, ts, graph):
    """Each node's input = its in-edges + the bias terms; the logit nodes reproduce the model's logits."""
    const_logits, const_x = bias_only_readings(model, inputs, ts)
    with torch.no_grad():
        logits = model(inputs)[0, int(inputs.last[0])]
        _, cache = model.run_with_cache(inputs, names_filter=lambda name: name.endswith("ln2.hook_normalized"))
    a = graph.adjacency_matrix.double()
    # logits: row sum + bias terms = logit − mean logit, for every target
    t = torch.tensor(graph.logit_targets)
    want = (logits - logits.mean())[t].double()
    got = a[graph.logit_start :].sum(1) + (const_logits - const_logits.mean())[t].double()
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-4)
    # features: row sum + bias terms (b_dec through the frozen model, and b_enc) = the clean pre-activation
    feats = graph.active_features[graph.selected_features]
    want, const = [], []
    for layer, pos, f in feats.tolist():
        enc, b_enc = ts[layer].W_enc[f].double(), ts[layer].b_enc[f].double()
        want.append(cache[ts.input_hook(layer)][0, pos].double() @ enc + b_enc)
        const.append(const_x[layer][pos].double() @ enc + b_enc)
    got = a[: graph.n_features].sum(1) + torch.stack(const)
    torch.testing.assert_close(got, torch.stack(want), atol=2e-3, rtol=1e-3)
    # every active feature is a node (no cap), and error and token rows have no in-edges
    assert graph.n_features == len(graph.active_features)
    assert a[graph.error_start : graph.logit_start].abs().sum() == 0


def test_intervene_without_edits_gives_the_model(model, inputs, ts):
    with torch.no_grad():
        want = model(inputs)
    for freeze in (False, True):
        got = intervene(model, inputs, ts, {}, freeze_attention=freeze, freeze_norms=freeze)
        assert (got - want).abs().max() <= 1e-4, f"frozen={freeze}: {(got - want).abs().max()}"


def test_intervention_matches_the_graph_with_frozen_attention(model, inputs, ts, graph):
    """Zeroing one last-layer feature moves the top logit by its direct edge (attention and norms frozen)."""
    feats = graph.active_features[graph.selected_features]
    last_layer = (feats[:, 0] == model.cfg.n_layers - 1) & (feats[:, 1] == int(inputs.last[0]))
    node = int(torch.nonzero(last_layer)[0])
    key = tuple(feats[node].tolist())
    with torch.no_grad():
        base = model(inputs)[0, int(inputs.last[0])]
    new = intervene(model, inputs, ts, {key: 0.0}, freeze_attention=True, freeze_norms=True)[0, int(inputs.last[0])]
    t = graph.logit_targets[0]
    moved = (new[t] - new.mean()) - (base[t] - base.mean())
    edge = graph.adjacency_matrix[graph.logit_start, node]
    assert abs(float(moved + edge)) < 1e-3 * max(1.0, abs(float(edge)))


def _two_object_colour_questions(world, n):
    examples, i = [], 0
    while len(examples) < n:
        e = world.example(i, "Colour")
        examples.append(e) if len(e.scene.objects) == 2 else None
        i += 1
    return examples


def test_influence_against_the_matrix_inverse(small_graph):
    """`w (Â + Â² + …)` equals `w ((I − Â)⁻¹ − I)` (a linear solve), and pruning keeps tokens and logits."""
    small = graph = small_graph
    a = small.adjacency_matrix.double().abs()
    norm = a / a.sum(1, keepdim=True).clamp_min(1e-10)
    w = small.logit_weights().double()
    eye = torch.eye(len(w), dtype=torch.float64)
    want = torch.linalg.solve((eye - norm).T, w) - w
    torch.testing.assert_close(node_influence(small).double(), want, atol=1e-6, rtol=1e-4)
    pruned = prune_graph(graph, 0.8, 0.98)
    assert pruned.node_mask[graph.token_start :].all()
    kept = pruned.node_mask[: graph.n_features]
    assert 0 < int(kept.sum()) < graph.n_features
    assert pruned.edge_mask[kept.nonzero().flatten()].any(1).all()  # kept features have an edge in
    replacement, completeness = graph_scores(graph)
    assert 0 < replacement <= 1 and 0 < completeness <= 1


def test_the_answer_flows_from_the_asked_object(model, ts):
    """Colour questions about one of two objects: the asked object's patches get ≥ 2× their area's share
    of the image nodes' influence in ≥ 3 of 4 scenes, and zeroing the 10 most influential features lowers
    the answer's logit > 3× as much as zeroing 10 random active features (mean over the scenes)."""
    world = ShapesWorld(11)
    hits, top_drops, random_drops = 0, [], []
    gen = torch.Generator().manual_seed(0)
    for e in _two_object_colour_questions(world, 4):
        inputs = model.prepare(images=[e.image], prompts=[e.prompt])
        g = attribute(model, inputs, ts, max_feature_nodes=1024)
        infl = node_influence(g)
        image = g.image_token_nodes()
        asked = next(i for i, o in enumerate(e.scene.objects) if o.shape in e.question)
        cells = set(world.object_patches(e.scene)[asked])
        on_object = torch.tensor([r * world.grid + c in cells for r, c in zip(image.patch_row, image.patch_col)])
        share = infl[torch.tensor(image.node.to_numpy())]
        hits += float(share[on_object].sum() / share.sum()) >= 2 * len(cells) / world.grid**2
        top = g.active_features[g.selected_features[infl[: g.n_features].topk(10).indices]]
        rand = g.active_features[torch.randperm(len(g.active_features), generator=gen)[:10]]
        answer, last = model.processor.tokenizer.convert_tokens_to_ids(e.answer), int(inputs.last[0])
        base = intervene(model, inputs, ts, {})[0, last, answer]
        for feats, drops in ((top, top_drops), (rand, random_drops)):
            edits = {tuple(f): 0.0 for f in feats.tolist()}
            drops.append(float(base - intervene(model, inputs, ts, edits)[0, last, answer]))
    assert hits >= 3, f"the asked object's patches dominate in only {hits} of 4 scenes"
    top_mean, random_mean = sum(top_drops) / 4, sum(random_drops) / 4
    assert top_mean > 0 and top_mean > 3 * random_mean, (top_drops, random_drops)


def test_circuit_tracer_json(small_graph, tmp_path):
    graph = small_graph
    out = to_circuit_tracer_json(graph, tmp_path, slug="colour", node_threshold=0.8, edge_threshold=0.98)
    data = json.loads(out.read_text())
    assert set(data) == {"metadata", "qParams", "nodes", "links"}
    assert {"slug", "scan", "prompt_tokens", "prompt", "node_threshold", "schema_version"} <= set(data["metadata"])
    node_keys = {
        "node_id",
        "feature",
        "layer",
        "ctx_idx",
        "feature_type",
        "jsNodeId",
        "clerp",
        "influence",
        "activation",
        "token_prob",
        "is_target_logit",
    }
    assert all(node_keys <= set(n) for n in data["nodes"])
    ids = {n["node_id"] for n in data["nodes"]}
    assert len(ids) == len(data["nodes"])
    assert all(link["source"] in ids and link["target"] in ids for link in data["links"])
    kinds = pd.DataFrame(data["nodes"]).groupby("feature_type").size()
    assert set(kinds.index) >= {"cross layer transcoder", "embedding", "logit"}
    # node ids as circuit-tracer writes them, recomputed here from the graph
    tokens, n = graph.input_tokens.tolist(), graph.n_layers
    image = graph.positions[graph.positions.is_image]
    for pos, r, c in zip(image.pos, image.patch_row, image.patch_col):
        node = next(x for x in data["nodes"] if x["node_id"] == f"E_{tokens[pos]}_{pos}")
        assert node["clerp"] == f"img {r},{c}" and node["feature_type"] == "embedding"
    top = graph.logit_targets[0]
    assert f"{n + 1}_{top}_{graph.n_pos - 1}" in ids
    for x in data["nodes"]:
        if x["feature_type"] == "cross layer transcoder":
            layer, f, pos = map(int, x["node_id"].split("_"))
            assert [layer, pos, f] in graph.active_features.tolist()
        if x["feature_type"] == "mlp reconstruction error":
            assert x["node_id"] == f"0_{x['layer']}_{x['ctx_idx']}"
    listing = json.loads((tmp_path / "graph-metadata.json").read_text())
    assert [g["slug"] for g in listing["graphs"]] == ["colour"]


def _truth_by_hand(world, example, name):
    """Row-major patches then the last position: where attribute `name` holds, read off the scene directly."""
    from hooked_llava.shapes.scene import horizontal_word

    truth = torch.zeros(world.grid**2 + 1, dtype=torch.bool)
    asked = next(o for o in example.scene.objects if o.shape in example.question)
    for obj, cells in zip(example.scene.objects, world.object_patches(example.scene)):
        facts = {"object", f"color={obj.color}", f"shape={obj.shape}", f"side={horizontal_word(obj.center[0])}"}
        if obj is asked:
            facts.add("asked object")
        if name in facts:
            truth[cells] = True
    truth[-1] = name in (f"asks={asked.shape}", f"answer={example.answer}")
    return truth


def test_feature_labels_against_a_count_by_hand(model, ts, small_graph, tmp_path):
    from analyses.graphs import feature_labels, label_graph, node_labels

    world, n = ShapesWorld(12345), 12
    labels = feature_labels(model, ts, n_scenes=n, seed=12345)
    assert len(labels) == len(ts) * ts.d_transcoder
    examples = [world.example(i, "Colour") for i in range(n)]
    inputs = model.prepare(images=[e.image for e in examples], prompts=[e.prompt for e in examples])
    with torch.no_grad():
        _, cache = model.run_with_cache(inputs, names_filter=[ts.input_hook(3)])
    rc = inputs.patch_rc()
    rows = []
    for b in range(n):  # positions of the cells in row-major order, found from patch_rc, then the last one
        cells = {int(r) * world.grid + int(c): p for p, (r, c) in enumerate(rc[b].tolist()) if r >= 0}
        rows.append([cells[k] for k in range(world.grid**2)] + [int(inputs.last[b])])
    acts = torch.stack([ts[3].encode(cache[ts.input_hook(3)][b, rows[b]]) for b in range(n)])  # [n, 65, F]
    checked = labels[(labels.layer == 3) & (labels.active_rows > 0)].head(6)
    assert len(checked) == 6
    for row in checked.itertuples():
        fires = acts[:, :, row.feature] > 0
        truth = torch.stack([_truth_by_hand(world, e, row.attribute) for e in examples])
        assert int(fires.sum()) == row.active_rows
        assert abs(float((fires & truth).sum() / fires.sum()) - row.precision) < 1e-6
        assert row.clerp == f"{row.attribute} (p={row.precision:.2f})"
    nodes = node_labels(label_graph(small_graph, labels))
    assert nodes.clerp.notna().all() and (nodes.clerp != "").any()
    first = nodes.iloc[0]
    want = labels[(labels.layer == first.layer) & (labels.feature == first.feature)].iloc[0]
    assert first.clerp == want.clerp and first.precision == want.precision
    written = json.loads(to_circuit_tracer_json(small_graph, tmp_path).read_text())["nodes"]
    by_key = labels.set_index(["layer", "feature"]).clerp
    for node in (x for x in written if x["feature_type"] == "cross layer transcoder"):
        layer, feature, _ = map(int, node["node_id"].split("_"))
        assert node["clerp"] == by_key[(layer, feature)]
    small_graph.labels = None
