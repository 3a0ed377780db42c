"""The layout keeps itself: every module imports as itself (no package attribute shadows it), no
import cycles (imports inside functions included), no module over 400 lines, no folder over 15
modules, and the public names of `hooked_llava` and `analyses` stay where users import them."""

from __future__ import annotations

import importlib
import pkgutil
import types
from pathlib import Path

import grimp
import pytest

import analyses
import hooked_llava

ROOTS = (hooked_llava, analyses)
# What `hooked_llava.__all__` and `analyses.__all__` held before the layout moved into packages.
PUBLIC = {
    "hooked_llava": "LLAVA15_TEMPLATE ROLES CheckpointError HookedLlava InvalidConfigError KeyValueCache "
    "KeyValueCacheEntry LanguageConfig LlavaInputs UnsupportedConfigError VisionConfig",
    "analyses": "ablate_heads attribute_attn_out attribute_heads attribute_image_blocks attribute_residual "
    "head_ablation_scan knockout knockout_sweep patch_attn_out patch_heads patch_image_blocks patch_residual "
    "plot_head_scan plot_knockout plot_patching plot_sweep summarize_knockout FrozenReadout "
    "direct_logit_attribution embedding_projection faithfulness lens_positions log_prob_increase logit_lens mrr "
    "patch_importance plot_head_scores plot_logit_lens plot_patch_heatmap reciprocal_ranks token_ranks top_heads "
    "top_k_table top_units vocab_scores word_forms",
}
OPTIONAL = ("sae_lens", "ray")


def _modules() -> list[str]:
    names = []
    for root in ROOTS:
        names += [info.name for info in pkgutil.walk_packages(root.__path__, prefix=f"{root.__name__}.")]
    return sorted(names)


def _files() -> list[Path]:
    return [p for root in ROOTS for p in Path(root.__path__[0]).rglob("*.py")]


@pytest.mark.parametrize("name", _modules())
def test_module_imports_and_is_not_shadowed(name):
    module = importlib.import_module(name)
    parent_name, _, leaf = name.rpartition(".")
    parent = importlib.import_module(parent_name)
    assert isinstance(module, types.ModuleType) and module.__name__ == name
    # `import a.b.c as m` reads the attribute `c` of `a.b`, which must be the module itself.
    assert getattr(parent, leaf) is module, f"{name} is shadowed by {getattr(parent, leaf)!r}"


@pytest.mark.parametrize("root", ["hooked_llava", "analyses"])
def test_public_names_are_still_importable(root):
    package = importlib.import_module(root)
    missing = [name for name in PUBLIC[root].split() if not hasattr(package, name)]
    assert not missing, f"{root} lost {missing}"
    assert set(PUBLIC[root].split()) <= set(package.__all__)
    assert all(not isinstance(getattr(package, name), types.ModuleType) for name in package.__all__)


def _strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative: the groups of modules that import each other, directly or not."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups = []
    for start in edges:
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    groups.append(sorted(group))
    return groups


def test_no_import_cycles_lazy_imports_included():
    graph = grimp.build_graph(
        "hooked_llava", "analyses", include_external_packages=False, exclude_type_checking_imports=True
    )
    edges = {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    assert _strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # the check
    assert _strongly_connected(edges) == []


def test_the_core_imports_no_optional_integration_at_import_time():
    graph = grimp.build_graph("hooked_llava", "analyses", include_external_packages=True)
    for library in OPTIONAL:
        if library not in graph.modules:
            continue
        importers = {m for m in graph.find_modules_that_directly_import(library)}
        allowed = ("hooked_llava.saes.", "analyses.saes.", "analyses.information_flow.ray_sweep")
        assert all(m.startswith(allowed) for m in importers), sorted(importers)


def test_module_and_folder_sizes():
    long = {str(p): n for p in _files() if (n := len(p.read_text().splitlines())) > 400}
    assert not long, f"modules over 400 lines: {long}"
    folders: dict[Path, int] = {}
    for p in _files():
        folders[p.parent] = folders.get(p.parent, 0) + 1
    crowded = {str(f): n for f, n in folders.items() if n > 15}
    assert not crowded, f"folders with more than 15 modules: {crowded}"


def test_import_linter_contracts_are_kept():
    """The contracts in pyproject.toml (layers, a core free of analyses/shapes/course/CLI, optional
    integrations only in their own modules), as `lint-imports` checks them in CI."""
    lint = pytest.importorskip("importlinter.cli")
    root = Path(hooked_llava.__path__[0]).parent
    if not (root / "pyproject.toml").exists():
        pytest.skip("not a source checkout")
    import os

    cwd = os.getcwd()
    try:
        os.chdir(root)
        assert lint.lint_imports() == 0  # 0: every contract kept
    finally:
        os.chdir(cwd)
