"""`device_map`: the placement plan, where parameters and the residual go, and numerics equal to
the single-device model. On CPU the devices are aliases ("cpu:1", "cpu:2", ...): tensors moved there
stay on the CPU, so `devices.move` is recorded to see where each one was sent."""

from __future__ import annotations

import re

import pandas as pd
import pytest
import torch

from hooked_llava.loading import devices
from hooked_llava.model.hooked_llava import HookedLlava
from hooked_llava.model.kv_cache import KeyValueCache
from hooked_llava.testing import random_images, tiny_model

PROMPTS = [
    "USER: <image>\nWhat is the color of the circle?\nASSISTANT:",
    "USER: <image>\nIs the square red?\nASSISTANT:",
]
C = torch.device
# blocks 0 | 1, 2 on two aliases; vision, projector, final norm and unembedding each elsewhere
MAP = {
    "vision": "cpu:1",
    "projector": "cpu:2",
    "embed": "cpu:0",
    "blocks.0": "cpu:1",
    "blocks.1:3": "cpu:2",
    "ln_final": "cpu:3",
    "unembed": "cpu:0",
}
PLAN = {
    "vision": C("cpu", 1),
    "projector": C("cpu", 2),
    "embed": C("cpu", 0),
    "blocks.0": C("cpu", 1),
    "blocks.1": C("cpu", 2),
    "blocks.2": C("cpu", 2),
    "ln_final": C("cpu", 3),
    "unembed": C("cpu", 0),
}


@pytest.fixture(scope="module")
def pair():
    model, hf = tiny_model(seed=0)  # three blocks
    return model, HookedLlava.from_hf(hf, model.processor, device_map=MAP)


@pytest.fixture(scope="module")
def inputs(pair):
    return pair[0].prepare(images=random_images(2, seed=1), prompts=PROMPTS)


class Recorder:
    """Stands in for `devices.move`: remembers the device each moved tensor was sent to."""

    def __init__(self):
        self.sent_to: dict[int, torch.device] = {}
        self.targets: list[torch.device] = []

    def __call__(self, t, device):
        out = t.to(device)
        self.sent_to[out.data_ptr()], _ = device, self.targets.append(device)
        return out


# --- the plan -------------------------------------------------------------------------------------
def test_explicit_map_places_every_part_where_named(pair):
    model, _ = pair
    assert devices.plan_devices(model.cfgs, MAP) == PLAN
    several = {"blocks": "cuda:1", "blocks.2": "cpu", "vision": "cuda:0", "projector": "cuda:0"}
    plan = devices.plan_devices(model.cfgs, {**several, "embed": "cuda:0", "ln_final": "cpu", "unembed": "cpu"})
    assert [plan[f"blocks.{i}"] for i in range(3)] == [C("cuda", 1), C("cuda", 1), C("cpu")]  # later key wins
    assert plan["vision"] == C("cuda", 0) and plan["unembed"] == C("cpu")


def test_a_list_of_devices_is_split_into_runs_balanced_by_parameters(pair):
    model, _ = pair
    numels = devices.part_numels(model)
    # by hand: vision 23872, projector 6272, embed 2688, blocks 36992 each, ln_final 64, unembed 2688;
    # total 147552, so the first device takes the parts whose midpoint lies below 73776
    head = {"vision": 23872, "projector": 6272, "embed": 2688}
    assert numels == head | {"blocks.0": 36992, "blocks.1": 36992, "blocks.2": 36992, "ln_final": 64, "unembed": 2688}
    plan = devices.plan_devices(model.cfgs, ["cuda:0", "cpu"], numels)
    assert list(plan.values()) == [C("cuda", 0)] * 4 + [C("cpu")] * 4
    plan = devices.plan_devices(model.cfgs, ["cuda:0", "cuda:1", "cuda:2"])  # blocks alone counted
    assert [plan[f"blocks.{i}"] for i in range(3)] == [C("cuda", 0), C("cuda", 1), C("cuda", 2)]
    assert plan["vision"] == C("cuda", 0) and plan["unembed"] == C("cuda", 2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only fallback")
def test_auto_without_cuda_is_the_cpu(pair):
    assert set(devices.plan_devices(pair[0].cfgs, "auto").values()) == {C("cpu")}


@pytest.mark.parametrize(
    ("device_map", "message"),
    [
        ({"vision": "cpu", "blocks": "cpu"}, "places no device for projector, embed, ln_final, unembed"),
        ({**MAP, "lm_head": "cpu"}, "key 'lm_head' is not a part of this model"),
        ({**MAP, "blocks.2:5": "cpu"}, "outside the 3 blocks"),
        ({**MAP, "blocks.2:2": "cpu"}, "outside the 3 blocks"),
        (torch.cuda.device_count() + 1, "CUDA devices, but"),
        (0, "CUDA devices, but"),
        ("balanced", "is not understood"),
        ([], "empty list"),
    ],
)
def test_bad_maps_say_what_to_pass(pair, device_map, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        devices.plan_devices(pair[0].cfgs, device_map)


def test_device_and_device_map_together_are_refused(pair):
    with pytest.raises(ValueError, match="either device= .* or device_map="):
        HookedLlava._build(None, {}, torch.float32, "cpu", None, {}, device_map="auto")


# --- placement ------------------------------------------------------------------------------------
def expected_device(name):
    """The map above, from parameter names (written out independently of `devices.part_of`)."""
    if name.startswith("blocks.0."):
        return C("cpu", 1)
    if name.startswith(("blocks.1.", "blocks.2.", "projector.")):
        return C("cpu", 2)
    return {"embed.W_E": C("cpu", 0), "unembed.w_u": C("cpu", 0), "ln_final.w": C("cpu", 3)}.get(name, C("cpu", 1))


def test_every_parameter_is_sent_to_its_planned_device(pair, monkeypatch):
    _, hf = tiny_model(seed=0)
    record = Recorder()
    monkeypatch.setattr(devices, "move", record)
    split = HookedLlava.from_hf(hf, None, device_map=MAP)
    names = [n for n, _ in split.named_parameters()]
    assert any(n.startswith("vision.") for n in names) and "ln_final.w" in names
    assert {n: record.sent_to[p.data_ptr()] for n, p in split.named_parameters()} == {
        n: expected_device(n) for n in names
    }
    assert split.device_plan() == PLAN and split.cfg.device == "cpu:0"


def test_the_residual_moves_where_the_plan_says(pair, inputs, monkeypatch):
    _, split = pair
    record, seen = Recorder(), {}
    monkeypatch.setattr(devices, "move", record)

    def where(name):
        def look(t, hook):
            seen.setdefault(name, record.sent_to.get(t.data_ptr()))

        return look

    hooks = [(f"blocks.{i}.hook_resid_pre", where(f"blocks.{i}")) for i in range(3)]
    hooks.append(("projector.hook_in", where("projector")))
    handles = [  # registered after the placement's own pre-hooks, so they see the moved inputs
        getattr(split, name).register_forward_pre_hook(lambda m, args, name=name: where(name)(args[0], None))
        for name in ("vision", "ln_final")
    ]
    try:
        split.run_with_hooks(inputs, fwd_hooks=hooks)
    finally:
        for handle in handles:
            handle.remove()
    assert seen == {k: v for k, v in PLAN.items() if k not in ("embed", "unembed")}
    assert record.targets[-1] == C("cpu", 0)  # last of all: the final residual to the unembedding


def test_a_single_device_model_has_no_plan_and_no_pre_hooks(pair):
    model, _ = pair
    assert model._device_plan is None
    assert set(model.device_plan().values()) == {C("cpu")}
    assert not any(m._forward_pre_hooks for m in model.modules())


# --- numerics equal to the single-device model ------------------------------------------------------
def test_logits_loss_cache_and_generate_equal_the_single_device_model(pair, inputs):
    model, split = pair
    assert torch.equal(split(inputs), model(inputs))
    assert torch.equal(split(inputs, return_type="loss"), model(inputs, return_type="loss"))
    _, cache = model.run_with_cache(inputs)
    _, split_cache = split.run_with_cache(inputs)
    assert list(split_cache.keys()) == list(cache.keys())
    assert all(torch.equal(split_cache[k], cache[k]) for k in cache.keys())
    greedy = dict(max_new_tokens=4, do_sample=False, stop_at_eos=False, verbose=False)
    assert torch.equal(split.generate(inputs, **greedy), model.generate(inputs, **greedy))
    no_cache = dict(greedy, use_past_kv_cache=False)
    assert torch.equal(split.generate(inputs, **no_cache), model.generate(inputs, **greedy))


def test_run_blocks_from_a_cached_residual_equals_the_single_device_model(pair, inputs):
    model, split = pair
    _, cache = model.run_with_cache(inputs, names_filter="blocks.1.hook_resid_pre")
    args = (cache["blocks.1.hook_resid_pre"], inputs.attention_mask, inputs.position_ids(), 1)
    assert torch.equal(split.run_blocks(*args), model.run_blocks(*args))


def test_knockout_and_patching_equal_the_single_device_model(pair, inputs):
    from analyses.information_flow.attention_knockout import knockout_sweep
    from analyses.patching.activation import patch_image_blocks

    model, split = pair
    sweeps = [knockout_sweep(m, inputs, "Image→Last", window=1, progress=False) for m in (model, split)]
    pd.testing.assert_frame_equal(sweeps[1], sweeps[0], check_exact=True)
    corrupted = model.prepare(images=random_images(2, seed=7), prompts=PROMPTS)

    def metric(logits):
        return logits[:, -1, :3]

    patched = [patch_image_blocks(m, corrupted, inputs, metric) for m in (model, split)]
    assert torch.equal(patched[1], patched[0])


def test_llava_next_image_newline_goes_with_the_projector():
    from test_architectures import _next

    model, hf = _next()
    plan = {**{k: v for k, v in MAP.items() if not k.startswith("blocks")}, "blocks": "cpu:2", "blocks.0": "cpu:1"}
    split = HookedLlava.from_hf(hf, model.processor, device_map=plan)
    inputs = model.prepare(images=random_images(2, size=48, seed=2), prompts=PROMPTS)
    assert torch.equal(split(inputs), model(inputs))
    assert devices.part_of("image_newline") == "projector"


def test_kv_cache_entries_live_on_their_layers_devices(pair):
    model, _ = pair
    cache = KeyValueCache.init_cache(model.cfg, [C("meta")] * 2 + [C("cpu")], 2)
    assert [e.past_keys.device for e in cache] == [C("meta"), C("meta"), C("cpu")]
    with pytest.raises(ValueError, match="one device per layer: 2 devices for 3 layers"):
        KeyValueCache.init_cache(model.cfg, ["cpu", "cpu"])


# --- the memory table ---------------------------------------------------------------------------------
def _published(kind, d, mlp, layers, heads, kv_heads, vocab):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaNextConfig

    clip = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16)
    clip.image_size, clip.patch_size = 336, 14
    text = LlamaConfig(hidden_size=d, intermediate_size=mlp, num_hidden_layers=layers, num_attention_heads=heads)
    text.num_key_value_heads, text.vocab_size = kv_heads, vocab
    kw = dict(vision_config=clip.to_dict(), text_config=text.to_dict(), image_token_index=vocab - 64)
    if kind == "next":
        pinpoints = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
        return LlavaNextConfig(**kw, vision_feature_layer=-2, image_grid_pinpoints=pinpoints)
    return LlavaConfig(**kw, vision_feature_layer=-2)


def _size(n):
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def test_the_memory_table_in_the_docs_matches_the_configs():
    from hooked_llava.model.config import configs_from_hf

    rows = {
        "LLaVA-1.5-7B": _published("1.5", 4096, 11008, 32, 32, 32, 32064),
        "LLaVA-1.5-13B": _published("1.5", 5120, 13824, 40, 40, 40, 32064),
        "LLaVA-NeXT-34B": _published("next", 7168, 20480, 60, 56, 8, 64064),
    }
    for name, config in rows.items():
        with torch.device("meta"):
            model = HookedLlava(configs_from_hf(config, torch.float16))
        b = devices.part_bytes(model, torch.float16)
        blocks = sum(v for k, v in b.items() if k.startswith("blocks."))
        cells = [b["vision"], b["projector"], b["embed"], b["blocks.0"], blocks, b["ln_final"], b["unembed"]]
        row = f"| {name}, {model.cfg.n_layers} blocks | " + " | ".join(map(_size, [*cells, sum(b.values())])) + " |"
        assert row in devices.__doc__, row
    assert b["blocks.0"] == 2 * (2 * 7168 * 7168 + 2 * 7168 * 1024 + 3 * 7168 * 20480 + 2 * 7168)  # 34B, by hand


# --- across a GPU and the CPU ---------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_split_across_the_gpu_and_the_cpu_matches_the_single_device_forward(pair, inputs):
    _, hf = tiny_model(seed=0)
    model = HookedLlava.from_hf(hf, pair[0].processor, device="cuda")
    split = HookedLlava.from_hf(hf, pair[0].processor, device_map=["cuda:0", "cpu"])
    plan = split.device_plan()
    assert plan["blocks.0"].type == "cuda" and plan["unembed"] == C("cpu")
    for name, p in split.named_parameters():
        assert p.device.type == plan[devices.part_of(name)].type, name
    torch.testing.assert_close(split(inputs).cuda(), model(inputs), rtol=1e-4, atol=1e-4)
    _, cache = split.run_with_cache(inputs)
    assert cache["blocks.0.hook_resid_pre"].device.type == "cuda" and cache["ln_final.hook_scale"].device.type == "cpu"
    greedy = dict(max_new_tokens=3, do_sample=False, stop_at_eos=False, verbose=False)
    assert torch.equal(split.generate(inputs, **greedy).cuda(), model.generate(inputs, **greedy))


def test_from_pretrained_places_a_text_model_and_checks_the_map_first():
    with pytest.raises(ValueError, match=re.escape("places no device for embed, ln_final, unembed")):
        HookedLlava.from_pretrained("shapes-lm", device_map={"blocks": "cpu"})
    model = HookedLlava.from_pretrained("shapes-lm")
    split = HookedLlava.from_pretrained("shapes-lm", device_map=["cpu:0", "cpu:1"])
    assert list(split.device_plan())[:2] == ["embed", "blocks.0"]  # no vision parts in a text model
    assert set(split.device_plan().values()) == {C("cpu", 0), C("cpu", 1)}
    tokens = model.to_tokens("the red circle is on the left")
    assert torch.equal(split(tokens), model(tokens))
