"""The course chapter (notebooks/course/, hooked_llava.course): checkers pass on the solutions, fail with a
useful message on deliberately wrong solutions, the student version stubs every exercise, and every course
notebook executes top to bottom with the solutions filled in.

Needs the shipped Shapes checkpoints (skipped with the reason otherwise); executing the notebooks also needs
nbclient and ipykernel (the "dev" extra).
"""

from __future__ import annotations

import ast
import inspect
import os
from functools import partial
from pathlib import Path

import pytest
import torch
from transformer_lens import ActivationCache

from hooked_llava.shapes import checkpoint_path

ROOT = Path(__file__).resolve().parent.parent
COURSE_DIR = ROOT / "notebooks" / "course"
NOTEBOOKS = sorted(p.name for p in COURSE_DIR.glob("[0-9]*.ipynb"))
nbformat = pytest.importorskip("nbformat", reason="nbformat is needed to read the notebooks (pip install -e '.[dev]')")
pytestmark = pytest.mark.skipif(
    not all(checkpoint_path(n).is_dir() for n in ("shapes-llava", "shapes-lm")),
    reason="the shipped Shapes checkpoints are missing",
)

from hooked_llava.course import section1 as s1  # noqa: E402
from hooked_llava.course import section2 as s2  # noqa: E402
from hooked_llava.course import section3 as s3  # noqa: E402
from hooked_llava.course import section4 as s4  # noqa: E402
from hooked_llava.course import section5 as s5  # noqa: E402
from hooked_llava.course import section6 as s6  # noqa: E402
from hooked_llava.course import tests as checkers  # noqa: E402
from hooked_llava.course.student import STUB, strip_solutions, student_notebook  # noqa: E402

SECTIONS = (s1, s2, s3, s4, s5, s6)
CHECKERS = sorted(name.removeprefix("test_") for name, _ in inspect.getmembers(checkers, inspect.isfunction)
                  if name.startswith("test_"))  # fmt: skip


def _solution(name: str):
    return next(getattr(m, name) for m in SECTIONS if hasattr(m, name))


@pytest.fixture(scope="module")
def models():
    from hooked_llava import HookedLlava

    return {"llava": HookedLlava.from_pretrained("shapes-llava"), "lm": HookedLlava.from_pretrained("shapes-lm")}


@pytest.mark.parametrize("name", CHECKERS)
def test_checker_passes_on_the_solution(name, models, capsys):
    getattr(checkers, f"test_{name}")(_solution(name), models["llava"])
    assert f"All tests in `test_{name}` passed!" in capsys.readouterr().out


def test_text_checkers_pass_on_the_base_lm(models, capsys):
    checkers.test_question_inputs(s6.question_inputs, models["lm"])
    assert "passed" in capsys.readouterr().out


# --- deliberately wrong solutions: each checker must fail and say what differs ----------------------------
def _off_by_one_rank(model, cache, token, positions):
    return s2.answer_ranks(model, cache, token, positions) + 1


def _dla_without_scale(model, cache, inputs, a, b):
    last = int(inputs.last[0])
    return s2.head_dla(model, cache, inputs, a, b) * cache["ln_final.hook_scale"][0, last]


def _lpi_with_resid_pre_scale(model, cache, inputs, target):  # σ² from the wrong residual
    fake = {k: cache[k] for k in cache.keys()}
    n = model.cfg.n_layers
    fake[f"blocks.{n - 1}.hook_resid_post"] = cache[f"blocks.{n - 1}.hook_resid_pre"]
    return s3.log_prob_increase_heads(model, ActivationCache(fake, model), inputs, target)


def _zero_next_head(z, hook, head):
    return s3.zero_head_hook(z, hook, (head + 1) % z.shape[2])


def _knockout_swapped(scores, hook, source, target):
    return s4.knockout_hook(scores, hook, source=target, target=source)


def _symmetric_window(layer, n_layers, window):
    return list(range(max(0, layer - window // 2), min(n_layers, layer + window // 2 + 1)))


def _knockout_log_change(model, inputs, source, target, window):
    return s4.knockout_change(model, inputs, source, target, window).div(100).log1p()


def _patch_resid_post(model, corrupted, clean_cache, metric, positions):
    out = torch.zeros(model.cfg.n_layers, len(positions))
    for layer in range(model.cfg.n_layers):
        for i, pos in enumerate(positions.tolist()):
            hook = partial(s5.patch_position_hook, position=pos, clean_cache=clean_cache)
            with torch.no_grad():
                out[layer, i] = metric(
                    model.run_with_hooks(corrupted, fwd_hooks=[(f"blocks.{layer}.hook_resid_post", hook)])
                )
    return out


def _path_without_scale(model, clean_cache, corrupt_cache, inputs, layer, head, positions, a, b):
    scale = float(corrupt_cache["ln_final.hook_scale"][0, int(inputs.last[0]), 0])
    return s5.path_patch_direct(model, clean_cache, corrupt_cache, inputs, layer, head, positions, a, b) * scale


def _sharpened_pattern(cache, layer):  # as if the scores were not scaled by 1/sqrt(d_head) (here: 1.5x)
    p = s1.attention_pattern(cache, layer).pow(1.5)
    return p / p.sum(-1, keepdim=True)


def _resid_one_layer_late(cache, layer):
    return s1.resid_pre_from_parts(cache, layer) + cache[f"blocks.{layer}.hook_attn_out"]


def _lens_one_layer_late(model, cache, layer, positions):
    return s2.logit_lens(model, cache, min(layer + 1, model.cfg.n_layers), positions)


WRONG = {
    "image_positions": (lambda inputs: s1.image_positions(inputs) + 1, "values differ"),
    "patch_row_col": (lambda inputs, pos: s1.patch_row_col(inputs, pos)[::-1], "(row, col) of position"),
    "merged_embedding": (lambda model, inputs, cache: model.W_E[inputs.input_ids], "values differ"),
    "attention_pattern": (_sharpened_pattern, "attention pattern of layer"),
    "resid_pre_from_parts": (_resid_one_layer_late, "resid_pre of layer"),
    "answer_probability": (lambda model, inputs, w: s1.answer_probability(model, inputs, w) ** 0.5, "probability of"),
    "logit_lens": (_lens_one_layer_late, "logit lens at readout 0"),
    "answer_ranks": (_off_by_one_rank, "answer ranks"),
    "head_results": (lambda model, cache, layer: s2.head_results(model, cache, layer - 1), "head results of layer 1"),
    "head_dla": (_dla_without_scale, "head DLA"),
    "attention_to_object": (lambda cache, inputs, n: s3.attention_to_object(cache, inputs, n) * 2, "object's patches"),
    "log_prob_increase_heads": (_lpi_with_resid_pre_scale, "log-probability increase per head"),
    "zero_head_hook": (_zero_next_head, "zero-ablated"),
    "ablation_drop": (lambda *args: -s3.ablation_drop(*args), "drop of the logit difference"),
    "knockout_hook": (_knockout_swapped, "blocked in layers"),
    "window_layers": (_symmetric_window, "window 2"),
    "knockout_change": (_knockout_log_change, "question->last, window 3"),
    "patch_position_hook": (lambda resid, hook, position, clean_cache: resid, "patched at position"),
    "patch_residual_scan": (_patch_resid_post, "patched metric"),
    "attribution_residual": (lambda *args: -s5.attribution_residual(*args), "attribution per"),
    "path_patch_direct": (_path_without_scale, "direct path through head"),
    "question_inputs": (lambda model, ex, visual: s6.question_inputs(model, ex, False), "shape"),
    "mean_head_scores": (lambda model, examples, visual: s6.mean_head_scores(model, examples[:1], visual), "mean head"),
    "top_k_overlap": (lambda a, b, k: s6.top_k_overlap(a, b, k + 1), "top-"),
    "rank_correlation": (lambda a, b: float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]), "Spearman"),
}


def test_every_checker_has_a_wrong_solution():
    assert sorted(WRONG) == CHECKERS


@pytest.mark.parametrize("name", sorted(WRONG))
def test_checker_fails_on_a_wrong_solution(name, models):
    wrong, message = WRONG[name]
    with pytest.raises(AssertionError, match=r"(got|expected|differ)") as err:
        getattr(checkers, f"test_{name}")(wrong, models["llava"])
    assert message in str(err.value), f"the checker's message does not say what differs: {err.value}"


def test_checker_reports_a_wrong_type(models):
    with pytest.raises(AssertionError, match="expected a tensor of shape .* got list"):
        checkers.test_image_positions(lambda inputs: inputs.positions("image")[0].tolist(), models["llava"])


# --- notebooks ----------------------------------------------------------------------------------------------
def _read(name):
    return nbformat.read(COURSE_DIR / name, as_version=4)


def test_there_are_six_sections():
    assert len(NOTEBOOKS) == 6, NOTEBOOKS


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_valid_clean_and_calls_its_checkers(name):
    nb = _read(name)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert not [i for i, c in enumerate(code) if c.outputs or c.execution_count], f"{name}: clear the outputs"
    source = "\n".join(c.source for c in code)
    exercises = [node.name for c in code if "# SOLUTION" in c.source for node in ast.parse(c.source).body
                 if isinstance(node, ast.FunctionDef)]  # fmt: skip
    assert exercises, f"{name} has no exercises"
    for exercise in exercises:
        assert exercise in CHECKERS, f"{name}: exercise {exercise} has no checker in hooked_llava.course.tests"
        assert f"tests.test_{exercise}(" in source, f"{name}: exercise {exercise} is never checked"


def test_every_checker_is_used_by_a_notebook():
    source = "\n".join(c.source for n in NOTEBOOKS for c in _read(n).cells)
    assert [n for n in CHECKERS if f"tests.test_{n}(" not in source] == []


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_student_version_stubs_every_exercise(name):
    nb = student_notebook(_read(name))
    for cell in (c for c in nb.cells if c.cell_type == "code"):
        assert "# SOLUTION" not in cell.source and "# END SOLUTION" not in cell.source
        ast.parse(cell.source)
    solution = [c.source for c in _read(name).cells if c.cell_type == "code"]
    n_regions = sum(s.count("# END SOLUTION") for s in solution)
    assert n_regions >= 3, f"{name} has only {n_regions} exercises"
    assert sum(c.source.count(STUB) for c in nb.cells if c.cell_type == "code") == n_regions


def test_strip_solutions_keeps_the_indentation_and_rejects_open_regions():
    source = "def f(x):\n    '''Doc.'''\n    # SOLUTION\n    return x + 1\n    # END SOLUTION\n\n\nprint(1)\n"
    assert strip_solutions(source) == f"def f(x):\n    '''Doc.'''\n    {STUB}\n\n\nprint(1)\n"
    with pytest.raises(ValueError, match="never closed"):
        strip_solutions("def f():\n    # SOLUTION\n    return 1\n")
    with pytest.raises(ValueError, match="without a '# SOLUTION'"):
        strip_solutions("x = 1\n# END SOLUTION\n")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_course_notebook_executes_with_solutions(name, monkeypatch):
    nbclient = pytest.importorskip(
        "nbclient", reason="nbclient is needed to execute notebooks (pip install -e '.[dev]')"
    )
    pytest.importorskip("ipykernel", reason="ipykernel is needed to execute notebooks (pip install -e '.[dev]')")
    # The kernel imports this checkout's hooked_llava (not another installed copy).
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    nb = _read(name)
    nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(COURSE_DIR)}}
    ).execute()
    out = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    n_checks = sum(c.source.count("tests.test_") for c in nb.cells if c.cell_type == "code")
    assert out.count("` passed!") == n_checks, f"{name}: not every checker passed"
    assert "Notebook run time" in out, f"{name} did not reach its findings cell"
