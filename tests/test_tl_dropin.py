"""HookedTransformer drop-in core: blocks that return tensors, KV-cache entries, TransformerLens' hook
switches, `pos_slice` on the position dimension, `hook.layer()` on vision hooks, and exact logits
under read-only hooks with `set_use_eager_attention`."""

from __future__ import annotations

import pytest
import torch

from hooked_llava.model.kv_cache import KeyValueCache, KeyValueCacheEntry
from hooked_llava.testing import tiny_model

try:  # TransformerLens 4 moved `utils` to `utilities`
    from transformer_lens.utilities import get_act_name
except ImportError:  # pragma: no cover - TransformerLens 3
    from transformer_lens.utils import get_act_name

SWITCHES = ("use_attn_result", "use_split_qkv_input", "use_hook_mlp_in", "use_attn_in", "use_eager_attention")


@pytest.fixture(scope="module")
def mha():
    """A multi-head (not grouped-query) tiny model, for `use_attn_in`."""
    model, _ = tiny_model(seed=1, n_kv_heads=None)
    return model


@pytest.fixture(scope="module")
def text(tiny):
    """One unpadded text prompt: positions 0..pos-1, as a block called alone assumes."""
    model, _ = tiny
    return model.to_tokens("USER: What is the color of the circle?\nASSISTANT:")


# --- blocks and attention return tensors ----------------------------------------------------------
def test_a_block_called_alone_returns_its_cached_output(tiny, text):
    model, _ = tiny
    with torch.no_grad():
        _, cache = model.run_with_cache(text)
        for i, block in enumerate(model.blocks):
            out = block(cache[f"blocks.{i}.hook_resid_pre"])
            assert isinstance(out, torch.Tensor)
            torch.testing.assert_close(out, cache[f"blocks.{i}.hook_resid_post"], atol=1e-6, rtol=0)
        attn = model.blocks[1].attn(cache["blocks.1.ln1.hook_normalized"] * model.blocks[1].ln1.w)
    torch.testing.assert_close(attn, cache["blocks.1.hook_attn_out"], atol=1e-6, rtol=0)


def test_a_block_takes_the_attention_mask_of_a_padded_batch(tiny, batch):
    model, _ = tiny
    real = batch.attention_mask.bool()
    with torch.no_grad():
        _, cache = model.run_with_cache(batch)
        out = model.blocks[2](cache["blocks.2.hook_resid_pre"], attention_mask=batch.attention_mask)
        vision = model.vision.blocks[0](cache["vision.blocks.0.hook_resid_pre"])
    torch.testing.assert_close(out[real], cache["blocks.2.hook_resid_post"][real], atol=1e-6, rtol=0)
    torch.testing.assert_close(vision, cache["vision.blocks.0.hook_resid_post"], atol=1e-6, rtol=0)


def test_kv_cache_entries_grow_in_place_and_frozen_ones_do_not(tiny, text):
    model, _ = tiny
    with torch.no_grad():
        x = model.input_to_embed(text)[0]
        mask, positions = torch.ones_like(text), torch.arange(text.shape[1])[None]
        full = model.run_blocks(x, mask, positions)
        cache = KeyValueCache.init_cache(model.cfg, batch_size=1)
        first = model.run_blocks(x[:, :5], mask[:, :5], positions[:, :5], past_kv_cache=cache)
        assert [entry.n_past for entry in cache] == [5] * model.cfg.n_layers
        rest = model.run_blocks(x[:, 5:], mask, positions[:, 5:], past_kv_cache=cache)
        assert cache[0].n_past == text.shape[1]
        frozen = KeyValueCacheEntry(cache[0].past_keys[:, :5], cache[0].past_values[:, :5], frozen=True)
        model.blocks[0](x[:, 5:6], past_kv_cache_entry=frozen)
    torch.testing.assert_close(torch.cat([first, rest], 1), full, atol=1e-5, rtol=1e-5)
    assert frozen.n_past == 5


def test_a_block_alone_uses_cached_keys_at_the_right_positions(tiny, text):
    model, _ = tiny
    with torch.no_grad():
        _, cache = model.run_with_cache(text)
        entry = KeyValueCacheEntry(cache["blocks.0.attn.hook_rot_k"][:, :6], cache["blocks.0.attn.hook_v"][:, :6])
        out = model.blocks[0](cache["blocks.0.hook_resid_pre"][:, 6:], past_kv_cache_entry=entry)
    torch.testing.assert_close(out, cache["blocks.0.hook_resid_post"][:, 6:], atol=1e-5, rtol=1e-5)


def test_kv_entry_rejects_mismatched_shapes():
    with pytest.raises((ValueError, TypeError), match="one shape|pos_so_far"):  # TypeError: the test-time type checks
        KeyValueCacheEntry(torch.zeros(1, 2, 2, 4), torch.zeros(1, 3, 2, 4))


# --- hook switches ------------------------------------------------------------------------------
def test_switches_are_off_by_default_as_in_transformer_lens(tiny, batch):
    model, _ = tiny
    assert not any(getattr(cfg, s) for cfg in (model.cfg, model.vision.cfg) for s in SWITCHES)
    with torch.no_grad():
        _, cache = model.run_with_cache(batch)
    assert not [n for n in cache.keys() if n.endswith(("hook_result", "_input", "hook_attn_in", "hook_mlp_in"))]
    with pytest.raises(ValueError, match=r"set_use_attn_result\(True\)"):
        model.run_with_cache(batch, names_filter="blocks.0.attn.hook_result")
    with pytest.raises(ValueError, match=r"set_use_split_qkv_input\(True\)"):
        model.run_with_hooks(batch, fwd_hooks=[("blocks.0.hook_q_input", lambda x, hook: x)])


def test_attn_result_sums_to_attn_out_in_both_towers(tiny, batch):
    model, _ = tiny
    with torch.no_grad(), model.hook_switches(use_attn_result=True):
        _, cache = model.run_with_cache(batch, names_filter=lambda n: n.endswith(("hook_result", "hook_attn_out")))
    for prefix in ("blocks.1", "vision.blocks.0"):
        result = cache[f"{prefix}.attn.hook_result"]
        n_heads = model.cfg.n_heads if prefix == "blocks.1" else model.vision.cfg.n_heads
        assert result.shape[2] == n_heads
        attn = model.blocks[1].attn if prefix == "blocks.1" else model.vision.blocks[0].attn
        torch.testing.assert_close(result.sum(2) + attn.b_O, cache[f"{prefix}.hook_attn_out"], atol=1e-5, rtol=1e-5)
    assert not model.cfg.use_attn_result and not model.vision.cfg.use_attn_result


def test_hook_switches_restore_the_previous_settings_on_errors(tiny):
    model, _ = tiny
    model.set_use_hook_mlp_in(True)
    with pytest.raises(RuntimeError, match="boom"), model.hook_switches(use_hook_mlp_in=False, use_attn_result=True):
        assert not model.cfg.use_hook_mlp_in and model.vision.cfg.use_attn_result
        raise RuntimeError("boom")
    assert model.cfg.use_hook_mlp_in and not model.cfg.use_attn_result and not model.vision.cfg.use_attn_result
    model.set_use_hook_mlp_in(False)
    with pytest.raises(ValueError, match="unknown switch"):
        with model.hook_switches(use_attn_results=True):
            pass
    with pytest.raises(TypeError, match="True or False|bool"):
        model.set_use_attn_result(1)


def _zero_head(index):
    def hook(x, hook):
        x[:, :, index] = 0

    return hook


def test_split_qkv_inputs_are_per_head_and_live(tiny, batch):
    """Zeroing one head's query input zeroes that head's query (RMSNorm(0) = 0, no q bias)."""
    model, _ = tiny
    with torch.no_grad(), model.hook_switches(use_split_qkv_input=True):
        _, cache = model.run_with_cache(batch, names_filter=lambda n: n.startswith("blocks.0.hook_"))
        plain = model(batch)
        split = {h: model.run_with_hooks(batch, fwd_hooks=[(f"blocks.1.hook_{h}_input", _zero_head(1))]) for h in "qk"}
    with torch.no_grad():
        direct = {h: model.run_with_hooks(batch, fwd_hooks=[(f"blocks.1.attn.hook_{h}", _zero_head(1))]) for h in "qk"}
        unsplit = model(batch)
    b, p, d = cache["blocks.0.hook_resid_pre"].shape
    assert cache["blocks.0.hook_q_input"].shape == (b, p, model.cfg.n_heads, d)
    assert cache["blocks.0.hook_k_input"].shape == (b, p, model.cfg.n_kv_heads, d)
    assert torch.equal(cache["blocks.0.hook_v_input"][:, :, 1], cache["blocks.0.hook_resid_pre"])
    real = batch.attention_mask.bool()
    torch.testing.assert_close(plain[real], unsplit[real], atol=1e-5, rtol=1e-5)
    for h in "qk":
        assert (split[h] - plain)[real].abs().max() > 1e-3
        torch.testing.assert_close(split[h][real], direct[h][real], atol=1e-5, rtol=1e-5)


def test_attn_in_on_multi_head_attention_and_refused_for_grouped_query(tiny, mha, batch):
    model, _ = tiny
    with pytest.raises(ValueError, match="grouped-query attention"):
        model.set_use_attn_in(True)
    with torch.no_grad(), mha.hook_switches(use_attn_in=True):
        _, cache = mha.run_with_cache(batch, names_filter=["blocks.0.hook_attn_in", "blocks.0.hook_resid_pre"])
        edited = mha.run_with_hooks(batch, fwd_hooks=[("blocks.0.hook_attn_in", _zero_head(2))])
    with torch.no_grad():
        direct = mha.run_with_hooks(batch, fwd_hooks=[(f"blocks.0.attn.hook_{h}", _zero_head(2)) for h in "qkv"])
    resid = cache["blocks.0.hook_resid_pre"]
    assert cache["blocks.0.hook_attn_in"].shape == (*resid.shape[:2], mha.cfg.n_heads, resid.shape[-1])
    real = batch.attention_mask.bool()
    torch.testing.assert_close(edited[real], direct[real], atol=1e-5, rtol=1e-5)


def test_mlp_in_is_the_mlp_input_and_live(tiny, batch):
    model, _ = tiny
    shift = lambda x, hook: x + 1  # noqa: E731
    with torch.no_grad(), model.hook_switches(use_hook_mlp_in=True):
        _, clean = model.run_with_cache(batch, names_filter=lambda n: n.startswith("blocks.1.hook_"))
        with model.hooks(fwd_hooks=[("blocks.1.hook_mlp_in", shift)]):
            _, edited = model.run_with_cache(batch, names_filter=lambda n: n.startswith("blocks.1.hook_"))
        block = model.blocks[1]
        expected = block.mlp(block.ln2(clean["blocks.1.hook_resid_mid"] + 1))
    assert torch.equal(clean["blocks.1.hook_mlp_in"], clean["blocks.1.hook_resid_mid"])
    assert torch.equal(edited["blocks.1.hook_resid_mid"], clean["blocks.1.hook_resid_mid"])  # the residual is untouched
    torch.testing.assert_close(edited["blocks.1.hook_mlp_out"], expected, atol=1e-6, rtol=1e-6)
    assert (edited["blocks.1.hook_mlp_out"] - clean["blocks.1.hook_mlp_out"]).abs().max() > 1e-3


# --- pos_slice ----------------------------------------------------------------------------------
def _expected_pos_dim(name):
    if name.endswith(("hook_pattern", "hook_attn_scores")):
        return 2  # [batch, head, query, key]: the query position
    return 1  # [batch, pos, ...], rotary q/k [batch, pos, head, d_head] included


@pytest.mark.parametrize("pos_slice", [-1, (2, 9)])
def test_pos_slice_slices_the_position_of_every_hook(tiny, batch, pos_slice):
    model, _ = tiny
    switches = dict(use_attn_result=True, use_split_qkv_input=True, use_hook_mlp_in=True)
    with torch.no_grad(), model.hook_switches(**switches):
        _, full = model.run_with_cache(batch)
        _, sliced = model.run_with_cache(batch, pos_slice=pos_slice)
    assert set(sliced.keys()) == set(full.keys())
    index = [pos_slice] if isinstance(pos_slice, int) else slice(*pos_slice)  # an int keeps its dim, as in TL
    for name in full.keys():
        dim = _expected_pos_dim(name)
        expected = full[name][(slice(None),) * dim + (index,)]
        assert torch.equal(sliced[name], expected), name
    assert sliced["blocks.0.attn.hook_rot_q"].shape[-2] == model.cfg.n_heads


def test_remove_batch_dim_with_pos_slice(tiny, batch):
    model, _ = tiny
    one = batch[1]
    with torch.no_grad():
        _, full = model.run_with_cache(one)
        _, cache = model.run_with_cache(one, remove_batch_dim=True, pos_slice=(3, 7))
    assert torch.equal(cache["blocks.0.attn.hook_rot_k"], full["blocks.0.attn.hook_rot_k"][0, 3:7])
    assert torch.equal(cache["blocks.0.attn.hook_pattern"], full["blocks.0.attn.hook_pattern"][0, :, 3:7])


# --- TransformerLens naming conventions ---------------------------------------------------------
def test_hook_layer_on_every_hook(tiny):
    model, _ = tiny
    for name, hook in model.hook_dict.items():
        parts = name.split(".")
        if "blocks" in parts:
            assert hook.layer() == int(parts[parts.index("blocks") + 1]), name
        else:
            with pytest.raises(IndexError, match="not inside a block"):
                hook.layer()
    assert model.hook_dict["vision.blocks.1.attn.hook_pattern"].layer() == 1


def test_suffix_filters_match_both_towers_and_tl_tools_still_work(tiny, batch):
    model, _ = tiny
    seen = []
    with torch.no_grad():
        model.run_with_hooks(
            batch, fwd_hooks=[(lambda n: n.endswith("pattern"), lambda x, hook: seen.append((hook.name, hook.layer())))]
        )
        _, cache = model.run_with_cache(batch, names_filter=lambda n: n.endswith("pattern"))
        _, lm_only = model.run_with_cache(batch, names_filter=lambda n: n.startswith("blocks."))
    assert ("vision.blocks.0.attn.hook_pattern", 0) in seen and ("blocks.2.attn.hook_pattern", 2) in seen
    stacked = cache.stack_activation("pattern")
    assert stacked.shape[0] == model.cfg.n_layers
    torch.testing.assert_close(stacked[2], cache["blocks.2.attn.hook_pattern"])
    assert all(name.startswith("blocks.") for name in lm_only.keys()) and len(lm_only.keys()) > 0


@pytest.mark.parametrize(
    "args",
    [("pattern", 2), ("attn_scores", 2), ("q", 1), ("rot_k", 1), ("z", 0), ("result", 0), ("resid_pre", 0),
     ("resid_mid", 1), ("resid_post", 2), ("attn_out", 1), ("mlp_out", 1), ("pre", 0), ("post", 0),
     ("q_input", 1), ("k_input", 1), ("v_input", 1), ("attn_in", 1), ("mlp_in", 1), ("scale", 2, "ln1"),
     ("normalized", 2, "ln2"), ("embed",)],
)  # fmt: skip
def test_get_act_name_gives_our_language_model_hooks(tiny, args):
    model, _ = tiny
    name = get_act_name(*args)
    assert name in model.hook_dict and not name.startswith("vision.")


# --- read-only hooks and logits -----------------------------------------------------------------
READ_ONLY = {
    "pattern": lambda n: n.endswith("hook_pattern"),
    "scores": lambda n: n.endswith("hook_attn_scores"),
    "vision norms": lambda n: n.startswith("vision.") and ".ln" in n,
    "everything": lambda n: True,
}


@pytest.mark.parametrize("which", list(READ_ONLY))
def test_read_only_hooks_leave_logits_exact_under_eager_attention(tiny, batch, which):
    """Default (fused paths): max |Δ logits| ≈ 2e-7 on this model; eager: exactly 0."""
    model, _ = tiny
    identity = lambda x, hook: x  # noqa: E731
    real = batch.attention_mask.bool()
    with torch.no_grad():
        fused, hooked = model(batch), model.run_with_hooks(batch, fwd_hooks=[(READ_ONLY[which], identity)])
        assert (fused - hooked)[real].abs().max() <= 1e-6
        with model.hook_switches(use_eager_attention=True):
            eager, eager_hooked = model(batch), model.run_with_hooks(batch, fwd_hooks=[(READ_ONLY[which], identity)])
    assert torch.equal(eager, eager_hooked)
    assert (eager - fused)[real].abs().max() <= 1e-6
