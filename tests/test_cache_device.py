"""`run_with_cache(device=...)`: each activation moves to `device` as its hook fires, values unchanged;
devices that cannot hold the cache are refused before the forward."""

from __future__ import annotations

import pytest
import torch

CUDA = torch.cuda.is_available()


def _no_hooks_left(model) -> bool:
    return all(not hp._forward_hooks and not hp._backward_hooks for hp in model.hook_dict.values())


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")])
def test_cache_on_cpu_holds_every_activation_equal_to_the_default_cache(tiny, batch, device):
    model, _ = tiny
    logits, on_device = model.run_with_cache(batch)
    logits_cpu, on_cpu = model.run_with_cache(batch, device=device)
    assert set(on_cpu.keys()) == set(on_device.keys()) == {n for n in model.hook_dict if model.hook_fires(n)}
    for name in on_device.keys():
        assert on_cpu[name].device.type == "cpu", name
        assert on_cpu[name].dtype == on_device[name].dtype, name
        torch.testing.assert_close(on_cpu[name], on_device[name].cpu(), rtol=0, atol=0, msg=name)
    torch.testing.assert_close(logits_cpu, logits, rtol=0, atol=0)
    assert _no_hooks_left(model)


def test_activations_are_moved_as_their_hooks_fire_not_after_the_forward(tiny, batch):
    """The cache fills during the forward: when a hook in the middle fires, the activations that came
    before it (and its own) are already in the cache, on the requested device, and later ones are not
    yet there (TransformerLens' caching-hook behaviour)."""
    model, _ = tiny
    cache: dict = {}
    _, fwd, _ = model.get_caching_hooks(device="cpu", cache=cache)
    middle = "blocks.0.hook_resid_pre"
    seen: dict = {}

    def spy(x, hook):
        seen.update(names=list(cache), devices={v.device.type for v in cache.values()})

    with model.hooks(fwd_hooks=[*fwd, (middle, spy)]):  # the caching hook on `middle` runs first
        model(batch)
    names = [name for name, _ in fwd]
    assert set(seen["names"]) == set(names[: names.index(middle) + 1])
    assert 0 < len(seen["names"]) < len(cache) == len(names)
    assert seen["devices"] == {"cpu"}


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("meta", "device='meta' would cache shapes without values"),
        ("no-such-device", "is not a torch device"),
        (torch.float32, "is not a torch device"),
        pytest.param(
            "cuda",
            "cannot cache on device 'cuda': it is not available here",
            marks=pytest.mark.skipif(CUDA, reason="CUDA present"),
        ),
    ],
)
def test_devices_that_cannot_hold_the_cache_are_refused_before_the_forward(tiny, batch, device, message):
    model, _ = tiny
    with pytest.raises(ValueError, match=message):
        model.run_with_cache(batch, device=device)
    assert _no_hooks_left(model)


def test_remove_batch_dim_and_pos_slice_apply_on_the_target_device(tiny, images):
    model, _ = tiny
    one = model.prepare(images=images[:1], prompts=["USER: <image>\nWhat is the color?\nASSISTANT:"])
    _, full = model.run_with_cache(one)
    _, sliced = model.run_with_cache(one, device="cpu", remove_batch_dim=True, pos_slice=-1)
    resid = "blocks.0.hook_resid_post"
    torch.testing.assert_close(sliced[resid], full[resid][0, -1:].cpu(), rtol=0, atol=0)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cache_on_cpu_from_cuda_equals_the_cuda_cache_and_keeps_gpu_memory_low(tiny, batch):
    model, _ = tiny
    model.to("cuda")
    try:
        _, on_gpu = model.run_with_cache(batch)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        _, on_cpu = model.run_with_cache(batch, device="cpu")
        for name in on_gpu.keys():
            assert on_cpu[name].device.type == "cpu", name
            torch.testing.assert_close(on_cpu[name], on_gpu[name].cpu(), rtol=0, atol=0, msg=name)
    finally:
        model.to("cpu")
