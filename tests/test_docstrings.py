"""Every `>>>` example in the analyses runs, against a tiny model (`model`, `inputs`, `image`)."""

from __future__ import annotations

import doctest
import importlib
import inspect

import pytest

MODULES = [
    "information_flow.flows", "information_flow.attention_knockout", "information_flow.stats", "ablation",
    "patching.activation", "patching.common", "patching.attribution", "plotting.flows", "patch_maps.anyres",
    "report.explain", "information_flow.sweep", "information_flow.examples", "information_flow.gqa",
]  # fmt: skip


@pytest.fixture(scope="module")
def namespace(tiny, images):
    """What the examples assume: a model, a batch, a clean/corrupted pair and a metric."""
    import analyses
    from analyses.information_flow.sweep import run_sweep, shapes_examples

    model, _ = tiny
    inputs = model.prepare(
        images=images, questions=["What is the color of the circle?", "Is the square red or blue?"],
        boxes=[[(0, 0, 16, 16)], [(8, 8, 32, 24)]],
    )  # fmt: skip
    red = model.to_single_token("red")
    metric = lambda logits: logits[:, -1, red].mean()  # noqa: E731
    corrupted = inputs.with_pixels(inputs.pixel_values.flip(0))
    return {
        **{name: getattr(analyses, name) for name in analyses.__all__},
        "run_sweep": run_sweep, "shapes_examples": shapes_examples,
        "model": model, "inputs": inputs, "image": images[0], "clean": inputs, "corrupted": corrupted,
        "other_pixels": corrupted.pixel_values, "metric": metric, "layer": 1,
        "corrupted_metric": float(metric(model(corrupted))),
    }  # fmt: skip


@pytest.mark.parametrize("name", MODULES)
def test_examples_run(name, namespace, tmp_path, monkeypatch):
    module = importlib.import_module(f"analyses.{name}")
    monkeypatch.chdir(tmp_path)
    scope, parser, ran = {**vars(module), **namespace}, doctest.DocTestParser(), 0
    public = [o for o in vars(module).values() if getattr(o, "__module__", None) == module.__name__]
    for obj in public:
        is_error = inspect.isclass(obj) and issubclass(obj, Exception)
        if (inspect.isfunction(obj) or inspect.isclass(obj)) and not obj.__name__.startswith("_") and not is_error:
            assert ">>>" in (inspect.getdoc(obj) or ""), f"{name}.{obj.__name__} has no example"
        for example in parser.get_examples(inspect.getdoc(obj) or ""):
            exec(compile(example.source, f"<{name}.{getattr(obj, '__name__', name)}>", "exec"), scope)
            ran += 1
    assert ran >= 1
