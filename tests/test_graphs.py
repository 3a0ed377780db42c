"""Attribution graphs (`analyses.graphs`) on shapes-llava with its shipped transcoders.

Each result is checked against an independent computation: the linear identity of the replacement
model against a hand-made forward with every source set to zero (only the biases left), and the
clean logits; the ground truth of the Shapes world (which patches the asked object covers) against
the graph's influence; and the graph's feature ranking against interventions.
"""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch

from analyses.graphs import attribute, graph_scores, intervene, node_influence, prune_graph
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
        got = intervene(model, inputs, ts, {}, freeze_attention=freeze)
        assert (got - want).abs().max() <= 1e-4, f"freeze_attention={freeze}: {(got - want).abs().max()}"


def test_intervention_matches_the_graph_with_frozen_attention(model, inputs, ts, graph):
    """Zeroing one last-layer feature moves the top logit by its direct edge (frozen attention, no later layer)."""
    feats = graph.active_features[graph.selected_features]
    last_layer = (feats[:, 0] == model.cfg.n_layers - 1) & (feats[:, 1] == int(inputs.last[0]))
    node = int(torch.nonzero(last_layer)[0])
    key = tuple(feats[node].tolist())
    with torch.no_grad():
        base = model(inputs)[0, int(inputs.last[0])]
    new = intervene(model, inputs, ts, {key: 0.0}, freeze_attention=True)[0, int(inputs.last[0])]
    t = graph.logit_targets[0]
    moved = (new[t] - new.mean()) - (base[t] - base.mean())
    edge = graph.adjacency_matrix[graph.logit_start, node]
    assert abs(float(moved + edge)) < 1e-3 * max(1.0, abs(float(edge)))
