"""TransformerLens' own hook tests (tests/integration/test_hooks.py), ported: each test keeps the intent
of the original; only the model (`shapes-lm`, or `shapes-llava` with an image) and the prompts (Shapes
questions) are changed. The other ports: start/stop at layer and tokenization in
test_tl_compat_layers.py; ActivationCache, patching, pos_slice and a Main Demo section in
test_tl_compat_demo.py.
"""

from __future__ import annotations

import pytest
import torch

from hooked_llava import HookedLlava
from hooked_llava.shapes import ShapesWorld

WORLD = ShapesWorld(0)
PROMPT = WORLD.example(0, "Colour").text_prompt
EMBED = lambda name: name == "hook_embed"  # noqa: E731  (TransformerLens' `embed` filter)


class Counter:
    def __init__(self) -> None:
        self.count = 0

    def inc(self, *args, **kwargs) -> None:
        self.count += 1


@pytest.fixture(scope="module")
def model():
    model = HookedLlava.from_pretrained("shapes-lm")
    yield model
    model.remove_all_hook_fns(including_permanent=True)


@pytest.fixture(scope="module")
def llava():
    return HookedLlava.from_pretrained("shapes-llava")


@pytest.fixture(autouse=True)
def _no_hooks_left(request):
    yield
    if "model" in request.fixturenames:
        request.getfixturevalue("model").remove_all_hook_fns(including_permanent=True)


def n_fwd(model, name="hook_embed") -> int:
    return len(model.hook_dict[name].fwd_hooks)


# --- hooks (test_hooks.py) ------------------------------------------------------------------------
def test_hook_attaches_normally(model):
    c = Counter()
    model.run_with_hooks(PROMPT, fwd_hooks=[(EMBED, c.inc)])
    assert all(len(hp.fwd_hooks) == 0 for hp in model.hook_dict.values())
    assert c.count == 1


def test_perma_hook_attaches_normally(model):
    c = Counter()
    model.add_perma_hook(EMBED, c.inc)
    assert n_fwd(model) == 1
    model.run_with_hooks(PROMPT, fwd_hooks=[])
    assert n_fwd(model) == 1 and c.count == 1


def test_hook_context_manager_and_nesting(model):
    c = Counter()
    with model.hooks(fwd_hooks=[(EMBED, c.inc)]):
        assert n_fwd(model) == 1
        model.forward(PROMPT)
        assert c.count == 1
        with model.hooks(fwd_hooks=[(EMBED, c.inc)]):
            assert n_fwd(model) == 2
            model.forward(PROMPT)
            assert c.count == 3  # 2 from the outer hook, 1 from the inner
        assert n_fwd(model) == 1
    assert n_fwd(model) == 0 and c.count == 3


def test_context_manager_run_with_cache(model):
    c = Counter()
    with model.hooks(fwd_hooks=[(EMBED, c.inc)]):
        model.run_with_cache(PROMPT)
        assert n_fwd(model) == 1
    assert n_fwd(model) == 0 and c.count == 1


def test_context_manager_with_an_image(llava):
    example = WORLD.example(0, "Colour")
    inputs = llava.prepare(images=[example.scene.image], prompts=[example.prompt])
    c = Counter()
    with llava.hooks(fwd_hooks=[(lambda n: n.endswith("hook_pattern"), c.inc)]):
        llava(inputs)
    assert c.count == llava.cfg.n_layers + llava.vision.cfg.n_layers_computed  # later layers do not run
    assert all(len(hp.fwd_hooks) == 0 for hp in llava.hook_dict.values())


@pytest.mark.parametrize("returns", ["tuple", "tensor", "none"])
def test_backward_hooks_run_and_are_removed(model, returns):
    c = Counter()

    def grad_hook(grad, hook):
        c.inc()
        return {"tuple": (grad,), "tensor": grad, "none": None}[returns]

    name = "hook_embed" if returns == "tuple" else "blocks.0.hook_resid_post"
    with model.hooks(bwd_hooks=[(name, grad_hook)]):
        assert len(model.hook_dict[name].bwd_hooks) == 1
        out = model(PROMPT)
        assert c.count == 0
        out.sum().backward()
    assert len(model.hook_dict[name].bwd_hooks) == 0 and c.count == 1
    model.zero_grad(set_to_none=True)


def test_hook_context_manager_with_permanent_hook(model):
    c = Counter()
    model.add_perma_hook(EMBED, c.inc)
    with model.hooks(fwd_hooks=[(EMBED, c.inc)]):
        assert n_fwd(model) == 2
        model.forward(PROMPT)
    assert n_fwd(model) == 1 and c.count == 2


def test_nested_context_manager_with_failure(model):
    def fail_hook(z, hook):
        raise ValueError("fail")

    c = Counter()
    with model.hooks(fwd_hooks=[(EMBED, c.inc)]):
        with pytest.raises(ValueError, match="fail"):
            with model.hooks(fwd_hooks=[(EMBED, fail_hook)]):
                assert n_fwd(model) == 2
                model.forward(PROMPT)
        assert n_fwd(model) == 1 and c.count == 1
    assert n_fwd(model) == 0


def test_reset_hooks_in_context_manager(model):
    with model.hooks(fwd_hooks=[(EMBED, Counter().inc)]):
        model.reset_hooks()
        assert n_fwd(model) == 0
    assert n_fwd(model) == 0


def test_remove_hook_keeps_permanent_hooks_unless_asked(model):
    c = Counter()
    model.add_perma_hook(EMBED, c.inc)
    model.remove_all_hook_fns()
    assert n_fwd(model) == 1
    model.remove_all_hook_fns(including_permanent=True)
    assert n_fwd(model) == 0
    model.run_with_hooks(PROMPT, fwd_hooks=[])
    assert c.count == 0


SWITCHED = [
    ("blocks.0.attn.hook_result", "set_use_attn_result", None),
    ("blocks.0.hook_q_input", "set_use_split_qkv_input", 4),
    ("blocks.0.hook_mlp_in", "set_use_hook_mlp_in", 3),
    ("blocks.0.hook_attn_in", "set_use_attn_in", 4),
]


@pytest.mark.parametrize("name, setter, ndim", SWITCHED)
def test_conditional_hooks(model, name, setter, ndim):
    """A switched hook cannot be added while its switch is off; switched on, it caches TL's shape."""
    identity = lambda z, hook: z  # noqa: E731
    getattr(model, setter)(False)
    with pytest.raises(AssertionError):
        model.add_hook(name, identity)
    try:
        getattr(model, setter)(True)
        model.add_hook(name, identity)
        model.reset_hooks()
        if ndim is not None:
            cache = model.run_with_cache(PROMPT, names_filter=lambda x: x == name)[1]
            n_pos, cfg = model.to_tokens(PROMPT).shape[1], model.cfg
            shape = {3: (1, n_pos, cfg.d_model), 4: (1, n_pos, cfg.n_heads, cfg.d_model)}[ndim]
            assert list(cache.keys()) == [name] and cache[name].shape == shape
    finally:
        getattr(model, setter)(False)


@pytest.mark.parametrize("zero_attach_pos, prepend", [(z, p) for z in range(2) for p in (True, False)])
def test_prepending_hooks(model, zero_attach_pos, prepend):
    """Zeroing the last residual leaves logits equal to the unembedding bias, but only if the
    zeroing hook runs last: attached last XOR prepended."""

    def set_to_zero(z, hook):
        z[:] = 0.0
        return z

    def set_to_randn(z, hook):
        return torch.randn_like(z) * 0.1

    last = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    for hook_idx in range(2):
        model.add_hook(last, set_to_zero if hook_idx == zero_attach_pos else set_to_randn, prepend=prepend)
    with torch.no_grad():
        logits = model(torch.arange(5)[None, :])
    expected = (zero_attach_pos == 1) != prepend
    assert torch.allclose(logits, model.b_U[None, :]) == expected


def test_unembed_module_has_the_bias(model):
    torch.testing.assert_close(model.unembed.b_U, model.b_U)
