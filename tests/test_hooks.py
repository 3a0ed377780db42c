"""Every hook is live, and the hook names are exactly the legacy HookedTransformer ones."""

from __future__ import annotations

import pytest
import torch

GOLDEN_BLOCK = [
    "hook_resid_pre",
    "hook_attn_in",
    "hook_q_input",
    "hook_k_input",
    "hook_v_input",
    "ln1.hook_scale",
    "ln1.hook_normalized",
    "attn.hook_q",
    "attn.hook_k",
    "attn.hook_v",
    "attn.hook_rot_q",
    "attn.hook_rot_k",
    "attn.hook_attn_scores",
    "attn.hook_pattern",
    "attn.hook_z",
    "attn.hook_result",
    "hook_attn_out",
    "hook_resid_mid",
    "hook_mlp_in",
    "ln2.hook_scale",
    "ln2.hook_normalized",
    "mlp.hook_pre",
    "mlp.hook_pre_linear",
    "mlp.hook_post",
    "hook_mlp_out",
    "hook_resid_post",
]
VISION_BLOCK = [n for n in GOLDEN_BLOCK if "rot_" not in n and "pre_linear" not in n]
# Hooks that, as in TransformerLens, exist but only fire once their switch is on.
OFF_BY_DEFAULT = ("hook_attn_in", "hook_q_input", "hook_k_input", "hook_v_input", "attn.hook_result", "hook_mlp_in")
# Every switch a grouped-query model allows (use_attn_in is for multi-head attention: see test_tl_dropin).
LIVE_SWITCHES = dict(use_attn_result=True, use_split_qkv_input=True, use_hook_mlp_in=True)


def default_names(model) -> list[str]:
    return [n for n in model.hook_names if not n.endswith(OFF_BY_DEFAULT)]


def live_names(model) -> list[str]:
    """The hooks that fire under `LIVE_SWITCHES`."""
    return [n for n in model.hook_names if not n.endswith("hook_attn_in")]


def golden_names(n_vision: int, n_layers: int) -> list[str]:
    names = [
        "vision.hook_patch_embed",
        "vision.hook_pos_embed",
        "vision.hook_embed",
        "vision.ln_pre.hook_scale",
        "vision.ln_pre.hook_normalized",
    ]
    names += [f"vision.blocks.{l}.{n}" for l in range(n_vision) for n in VISION_BLOCK]
    names += ["projector.hook_in", "projector.hook_pre", "projector.hook_post", "projector.hook_out", "hook_embed"]
    names += [f"blocks.{l}.{n}" for l in range(n_layers) for n in GOLDEN_BLOCK]
    return names + ["ln_final.hook_scale", "ln_final.hook_normalized"]


def test_golden_ordered_hook_names(tiny):
    model, _ = tiny
    assert model.hook_names == golden_names(2, 3)


def test_hooks_fire_in_the_listed_order(tiny, batch):
    model, _ = tiny
    fired: list[str] = []
    model.run_with_hooks(batch, fwd_hooks=[(lambda n: True, lambda x, hook: fired.append(hook.name))])
    assert fired == default_names(model)
    fired.clear()
    with model.hook_switches(**LIVE_SWITCHES):  # per-head inputs run the first norm once per input
        model.run_with_hooks(batch, fwd_hooks=[(lambda n: True, lambda x, hook: fired.append(hook.name))])
    assert list(dict.fromkeys(fired)) == live_names(model)
    assert not any(hp.has_hooks() for hp in model.hook_dict.values())


def _perturb(x, hook):
    if hook.name.endswith("hook_pattern"):
        return x.flip(-1).tril() / x.flip(-1).tril().sum(-1, keepdim=True).clamp_min(1e-6)
    if hook.name.endswith("hook_attn_scores"):
        return x + torch.randn_like(x).clamp(-3, 3)
    return x * 1.5 + 0.1 * torch.randn_like(x)  # not a pure affine shift, which LayerNorm would undo


def test_perturbing_every_cached_hook_changes_the_logits(tiny, batch):
    model, _ = tiny
    with torch.no_grad():
        _, cache = model.run_with_cache(batch)
    assert set(cache.keys()) == set(default_names(model))
    dead = []
    with torch.no_grad(), model.hook_switches(**LIVE_SWITCHES):
        clean, cache = model.run_with_cache(batch)
        assert set(cache.keys()) == set(live_names(model))
        for name in live_names(model):
            patched = model.run_with_hooks(batch, fwd_hooks=[(name, _perturb)])
            if (patched - clean)[batch.attention_mask.bool()].abs().max() < 1e-4:
                dead.append(name)
    assert dead == []


@pytest.mark.parametrize("name", ["vision.blocks.1.hook_resid_post", "vision.blocks.0.attn.hook_pattern"])
def test_vision_feature_layer_and_vision_pattern_are_live(tiny, batch, name):
    model, _ = tiny
    assert max(model.vision.cfg.feature_layers) == 2  # blocks.1 is the selected layer
    with torch.no_grad():
        clean = model(batch)
        patched = model.run_with_hooks(batch, fwd_hooks=[(name, _perturb)])
    assert (patched - clean).abs().max() > 1e-3


def test_unknown_hook_name_suggests_close_names(tiny, batch):
    model, _ = tiny
    with pytest.raises(KeyError, match="blocks.0.hook_resid_pre"):
        model.run_with_hooks(batch, fwd_hooks=[("blocks.0.hook_resid_pr", lambda x, hook: x)])
    with pytest.raises(KeyError, match="Did you mean"):
        model.run_with_cache(batch, names_filter=["blocks.0.attn.hook_patern"])


def test_hooks_are_removed_when_the_forward_raises(tiny, batch):
    model, _ = tiny

    def boom(x, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        model.run_with_hooks(batch, fwd_hooks=[("blocks.1.hook_resid_mid", boom)])
    with pytest.raises(RuntimeError, match="boom"):
        with model.hooks(fwd_hooks=[("blocks.0.attn.hook_pattern", boom)]):
            model(batch)
    assert not any(hp.has_hooks() for hp in model.hook_dict.values())


def test_backward_hooks_see_gradients(tiny, batch):
    model, _ = tiny
    grads = {}
    with model.hooks(bwd_hooks=[("blocks.1.hook_resid_pre", lambda g, hook: grads.setdefault(hook.name, g))]):
        model(batch)[:, -1].logsumexp(-1).sum().backward()
    assert grads["blocks.1.hook_resid_pre"].abs().sum() > 0
    model.zero_grad()


def test_in_place_edits_of_head_results_are_live(tiny, batch):
    model, _ = tiny

    def zero_head(x, hook):
        x[:, :, 1] = 0  # edits in place and returns nothing

    with torch.no_grad():
        clean = model(batch)
        with model.hook_switches(use_attn_result=True):
            edited = model.run_with_hooks(batch, fwd_hooks=[("blocks.1.attn.hook_result", zero_head)])
        _, cache = model.run_with_cache(batch, names_filter=["blocks.1.attn.hook_z"])

        def zero_z(x, hook):
            x[:, :, 1] = 0

        reference = model.run_with_hooks(batch, fwd_hooks=[("blocks.1.attn.hook_z", zero_z)])
    assert (edited - clean).abs().max() > 1e-3
    torch.testing.assert_close(edited, reference, atol=1e-5, rtol=1e-5)
