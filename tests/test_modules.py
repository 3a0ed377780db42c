"""Every analyses submodule imports as a module, none shadowed by a package-level function of the same name."""

from __future__ import annotations

import importlib
import pkgutil
import types

import pytest

import analyses

SUBMODULES = sorted(info.name for info in pkgutil.iter_modules(analyses.__path__))


def test_the_walk_finds_the_analyses():
    renamed = {"lens", "readout", "patch_grid", "patch_maps", "occlusion", "attention_knockout", "flows"}
    assert renamed <= set(SUBMODULES)
    assert not {"logit_lens", "patch_importance", "knockout"} & set(SUBMODULES)


@pytest.mark.parametrize("name", SUBMODULES)
def test_submodule_is_importable_and_not_shadowed(name):
    module = importlib.import_module(f"analyses.{name}")
    assert isinstance(module, types.ModuleType)
    assert module.__name__ == f"analyses.{name}"
    # `import analyses.<name> as m` binds the package attribute, which must be the module itself.
    assert getattr(analyses, name) is module, f"analyses.{name} is shadowed by {getattr(analyses, name)!r}"


def test_package_functions_keep_their_names():
    from analyses.lens import logit_lens
    from analyses.patch_maps import patch_importance

    assert analyses.logit_lens is logit_lens and analyses.patch_importance is patch_importance
    assert all(not isinstance(getattr(analyses, name), types.ModuleType) for name in analyses.__all__)
