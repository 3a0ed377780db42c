"""TransformerLens' ActivationCache tests (tests/acceptance/test_activation_cache.py), patching test
(tests/acceptance/test_patching.py) and `pos_slice` caching, and Main Demo sections ("Hooks: intervening
on activations", "Activation patching on the IOI task", direct logit attribution), ported with only the
model (`shapes-lm`) and prompts changed. The IOI prompts become Shapes colour questions of one token
length; the indirect object becomes the right colour, the subject a wrong colour.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from transformer_lens import patching

from hooked_llava import HookedLlava
from hooked_llava.shapes import ShapesWorld

try:  # TransformerLens 4 moved `utils` to `utilities`
    from transformer_lens.utilities import Slice, get_act_name
except ImportError:  # pragma: no cover - TransformerLens 3
    from transformer_lens.utils import Slice, get_act_name

COLOURS = ["red", "blue", "green", "orange", "purple", "yellow"]


def shapes_prompts(model, n: int = 8, length: int = 44) -> tuple[list, torch.Tensor, torch.Tensor]:
    """`n` colour questions of `length` tokens, their tokens, and `(right, wrong)` answer tokens."""
    examples = (ShapesWorld(0).example(i, "Colour") for i in range(200))
    chosen = [e for e in examples if model.to_tokens(e.text_prompt).shape[1] == length][:n]
    wrong = [COLOURS[(COLOURS.index(e.answer) + 1) % len(COLOURS)] for e in chosen]
    answers = torch.tensor([[model.to_single_token(e.answer), model.to_single_token(w)] for e, w in zip(chosen, wrong)])
    return chosen, model.to_tokens([e.text_prompt for e in chosen]), answers


@pytest.fixture(scope="module")
def folded():
    return HookedLlava.from_pretrained("shapes-lm", fold_ln=True, center_unembed=True)


@pytest.fixture(scope="module")
def run(folded):
    _, tokens, answers = shapes_prompts(folded)
    with torch.no_grad():
        logits, cache = folded.run_with_cache(tokens)
    return tokens, answers, logits, cache


def test_from_pretrained_takes_the_processing_flags_of_the_reference_tests():
    """As TransformerLens for RMSNorm rotary models: centring writing weights is a no-op with a warning,
    and refactoring the factored attention matrices is refused (it does not commute with rotary)."""
    with pytest.warns(UserWarning, match="center_writing_weights"):
        HookedLlava.from_pretrained("shapes-lm", fold_ln=True, center_writing_weights=True)
    with pytest.raises(ValueError, match="refactor_factored_attn_matrices"):
        HookedLlava.from_pretrained("shapes-lm", fold_ln=True, refactor_factored_attn_matrices=True)


# --- ActivationCache (test_activation_cache.py) ---------------------------------------------------
@torch.no_grad()
def test_logit_attrs_matches_reference_code(folded, run):
    tokens, answers, _, cache = run
    stack = cache.accumulated_resid(layer=-1, incl_mid=True, pos_slice=-1)
    directions = folded.tokens_to_residual_directions(answers)
    diff_directions = directions[:, 0] - directions[:, 1]
    scaled = cache.apply_ln_to_stack(stack, layer=-1, pos_slice=-1)
    reference = torch.einsum("...bd,bd->...", scaled, diff_directions) / len(tokens)
    ours = cache.logit_attrs(stack, pos_slice=-1, tokens=answers[:, 0], incorrect_tokens=answers[:, 1]).mean(-1)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_logit_attrs_works_for_all_input_shapes(folded, run):
    _, answers, _, cache = run
    stack = cache.accumulated_resid(layer=-1, incl_mid=True, pos_slice=-1, return_labels=False)
    directions = folded.tokens_to_residual_directions(answers)
    scaled = cache.apply_ln_to_stack(stack, layer=-1, pos_slice=-1)
    reference = torch.einsum("...d,...d->...", scaled, directions[:, 0] - directions[:, 1])
    attrs = partial(cache.logit_attrs, pos_slice=-1)
    close = partial(torch.testing.assert_close, atol=1e-5, rtol=1e-5)
    close(attrs(stack, tokens=answers[:, 0], incorrect_tokens=answers[:, 1]), reference)
    right, wrong = answers[-1]
    for r, w in [(right, wrong), (int(right), int(wrong)), (folded.to_string(right), folded.to_string(wrong))]:
        close(attrs(stack, batch_slice=-1, tokens=r, incorrect_tokens=w), reference[:, -1])
    close(
        attrs(stack[:, -1], has_batch_dim=False, batch_slice=-1, tokens=right, incorrect_tokens=wrong), reference[:, -1]
    )
    some = [2, 5, 7]
    close(
        attrs(stack, batch_slice=some, tokens=answers[some, 0], incorrect_tokens=answers[some, 1]), reference[:, some]
    )


@pytest.mark.parametrize(
    "method", ["accumulated_resid", "decompose_resid", "stack_head_results", "stack_neuron_results"]
)
@torch.no_grad()
def test_apply_ln_argument_equals_apply_ln_to_stack(run, method):
    cache, extra = run[3], {"incl_mid": True} if method == "accumulated_resid" else {}
    stack = getattr(cache, method)(layer=-1, pos_slice=-1, **extra)
    stack = stack[0] if isinstance(stack, tuple) else stack
    # Both TransformerLens lines now renormalise each accumulated residual by its own final-norm scale.
    reference = cache.apply_ln_to_stack(stack, layer=-1, pos_slice=-1, recompute_ln=method == "accumulated_resid")
    scaled = getattr(cache, method)(layer=-1, pos_slice=-1, apply_ln=True, **extra)
    torch.testing.assert_close(scaled[0] if isinstance(scaled, tuple) else scaled, reference, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("pos_slice", [-1, [0, 3], (2, 10)])
@torch.no_grad()
def test_run_with_cache_pos_slice_equals_slicing_the_full_cache(folded, run, pos_slice):
    tokens, _, _, full = run
    _, sliced = folded.run_with_cache(tokens, pos_slice=pos_slice)
    slicer = Slice.unwrap(pos_slice)  # as TransformerLens caches: an int keeps the dimension
    # TransformerLens 3's `stack_head_results` (used by earlier tests) adds `hook_result` to a cache in place
    full = {name: value for name, value in full.items() if not name.endswith("hook_result")}
    assert set(sliced.keys()) == set(full)
    for name, value in full.items():
        dim = 2 if name.endswith(("hook_pattern", "hook_attn_scores")) else 1
        torch.testing.assert_close(sliced[name], slicer.apply(value, dim=dim), msg=lambda m, name=name: f"{name}: {m}")


# --- patching (test_patching.py) ------------------------------------------------------------------
@pytest.fixture(scope="module")
def clean_corrupt(folded):
    """A clean and a corrupted question with different right answers, as Bob/Carl in the original."""
    examples, tokens, answers = shapes_prompts(folded)
    j = next(j for j in range(1, len(examples)) if examples[j].answer != examples[0].answer)
    return tokens[:1], tokens[j : j + 1], answers[0, 0], answers[j, 0]


def test_get_act_patch_attn_out(folded, clean_corrupt):
    clean, corrupt, right, other = clean_corrupt
    metric = lambda logits: logits[0, -1, right] - logits[0, -1, other]  # noqa: E731
    with torch.no_grad():
        _, clean_cache = folded.run_with_cache(clean)
        scan = patching.get_act_patch_attn_out(folded, corrupt, clean_cache, metric)
        layer, pos = 3, corrupt.shape[1] - 1

        def patch(out, hook):
            out[:, pos] = clean_cache[hook.name][:, pos]

        manual = metric(folded.run_with_hooks(corrupt, fwd_hooks=[(get_act_name("attn_out", layer), patch)]))
    assert scan.shape == (folded.cfg.n_layers, corrupt.shape[1])
    torch.testing.assert_close(scan[layer, pos], manual)


# --- Main Demo: "Hooks: intervening on activations" -----------------------------------------------
def test_main_demo_head_ablation(folded, run):
    tokens, layer_to_ablate, head_index_to_ablate = run[0], 0, 7

    def head_ablation_hook(value, hook):
        value[:, :, head_index_to_ablate, :] = 0.0
        return value

    with torch.no_grad():
        original_loss = folded(tokens, return_type="loss")
        ablated_loss = folded.run_with_hooks(
            tokens, return_type="loss", fwd_hooks=[(get_act_name("v", layer_to_ablate), head_ablation_hook)]
        )
        # zero values give zero head output: the same ablation through hook_z
        via_z = folded.run_with_hooks(
            tokens, return_type="loss", fwd_hooks=[(get_act_name("z", layer_to_ablate), head_ablation_hook)]
        )
    assert not torch.isclose(original_loss, ablated_loss)
    torch.testing.assert_close(ablated_loss, via_z)


# --- Main Demo: "Activation patching on the IOI task" ---------------------------------------------
def test_main_demo_residual_stream_patching(folded, clean_corrupt):
    clean_tokens, corrupted_tokens, right, other = clean_corrupt

    def logits_to_logit_diff(logits):
        return logits[0, -1, right] - logits[0, -1, other]

    with torch.no_grad():
        clean_logits, clean_cache = folded.run_with_cache(clean_tokens)
        corrupted_logits = folded(corrupted_tokens)
    clean_logit_diff = logits_to_logit_diff(clean_logits)
    corrupted_logit_diff = logits_to_logit_diff(corrupted_logits)

    def residual_stream_patching_hook(resid_pre, hook, position):
        resid_pre[:, position, :] = clean_cache[hook.name][:, position, :]
        return resid_pre

    num_positions = len(clean_tokens[0])
    result = torch.zeros((folded.cfg.n_layers, num_positions))
    with torch.no_grad():
        for layer in range(folded.cfg.n_layers):
            for position in range(num_positions):
                hook_fn = partial(residual_stream_patching_hook, position=position)
                patched = folded.run_with_hooks(
                    corrupted_tokens, fwd_hooks=[(get_act_name("resid_pre", layer), hook_fn)]
                )
                result[layer, position] = (logits_to_logit_diff(patched) - corrupted_logit_diff) / (
                    clean_logit_diff - corrupted_logit_diff
                )

        def metric(logits):
            return (logits_to_logit_diff(logits) - corrupted_logit_diff) / (clean_logit_diff - corrupted_logit_diff)

        library = patching.get_act_patch_resid_pre(folded, corrupted_tokens, clean_cache, metric)
    torch.testing.assert_close(result, library, atol=1e-5, rtol=1e-5)
    same = (clean_tokens[0] == corrupted_tokens[0]).nonzero()[:, 0]
    torch.testing.assert_close(result[0, same], torch.zeros(len(same)), atol=1e-5, rtol=0)  # same token: no effect


# --- direct logit attribution (Main / Exploratory Demo) -------------------------------------------
@torch.no_grad()
def test_direct_logit_attribution_adds_up_to_the_logit_difference(folded, run):
    tokens, answers, logits, cache = run
    rows = torch.arange(len(tokens))
    logit_diff = logits[rows, -1, answers[:, 0]] - logits[rows, -1, answers[:, 1]]
    directions = folded.tokens_to_residual_directions(answers)
    diff_directions = directions[:, 0] - directions[:, 1]  # norm weights folded into W_U, no unembedding bias
    final = cache.apply_ln_to_stack(cache["resid_post", -1][None, :, -1], layer=-1, pos_slice=-1)[0]
    torch.testing.assert_close((final * diff_directions).sum(-1), logit_diff, atol=1e-4, rtol=1e-4)
    per_component, labels = cache.decompose_resid(layer=-1, pos_slice=-1, apply_ln=True, return_labels=True)
    assert labels[0] == "embed" and len(labels) == 1 + 2 * folded.cfg.n_layers
    dla = (per_component * diff_directions).sum(-1)
    torch.testing.assert_close(dla.sum(0), logit_diff, atol=1e-4, rtol=1e-4)
    per_head = cache.stack_head_results(layer=-1, pos_slice=-1, apply_ln=True)
    assert per_head.shape == (folded.cfg.n_layers * folded.cfg.n_heads, len(tokens), folded.cfg.d_model)
    attn = per_component[1::2].sum(0)  # attention outputs, the sum of the heads'
    torch.testing.assert_close(per_head.sum(0), attn, atol=1e-4, rtol=1e-4)
