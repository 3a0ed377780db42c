"""Attention knockout (study B, METHODS.md §3): forbid target queries to attend to source keys.

`knockout` runs one configuration. `knockout_sweep` runs the study's sweep (for every
plotted layer, block a window of layers around it) for several flows and returns a tidy
DataFrame. The flows are resolved in `analyses.information_flow.flows`;
`analyses.information_flow.stats.summarize_knockout` gives the per flow/layer mean with a 95% confidence interval.

The sweep is built for speed without changing a result: one base pass runs the vision tower
and caches every `resid_pre` and every layer's keys/values; a configuration starts at the
first layer of its window from the cached residual, and only the positions from its first
target query on are recomputed (earlier ones cannot see the knockout: attention is causal),
over the cached keys/values of the prefix (`model.run_blocks` with `past`). Configurations
run together as batch rows (`inputs[rows]`, repeats allowed), each row with its own knockout mask.
"""

# ruff: noqa: F722  (jaxtyping shape strings are not Python expressions)

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any, NamedTuple

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from analyses import ranges
from analyses.information_flow.flows import FlowSpec, Positions, flow_mask, resolve_flows, window_layers
from hooked_llava import HookedLlava, LlavaInputs
from hooked_llava.inputs.geometry import BoxRule
from hooked_llava.model.kv_cache import KeyValueCacheEntry

COLUMNS = ["flow", "layer", "example", "p_base", "p_blocked", "rel_change", "delta_log_prob"]


def block_scores(
    scores: Float[Tensor, "batch head q k"],
    hook: Any,
    target: Bool[Tensor, "batch q"],
    source: Bool[Tensor, "batch k"],
    active: Bool[Tensor, " batch"] | None = None,
) -> Float[Tensor, "batch head q k"]:
    """Hook on `hook_attn_scores`: add `finfo(dtype).min` to the scores from `target` queries to
    `source` keys, per batch row (only in rows where `active`, when given).

    The scores already hold the causal/padding mask (`finfo.min`), so adding to a masked entry
    would overflow to -inf; clamping at `finfo.min` keeps every softmax row finite (no NaN)
    and changes nothing else: a blocked entry gets weight exactly 0 either way.

    Example:
        >>> hook = partial(block_scores, target=inputs.mask("last"), source=inputs.mask("image"))
        >>> logits = model.run_with_hooks(inputs, fwd_hooks=[("blocks.1.attn.hook_attn_scores", hook)])
    """
    target, source = target.to(scores.device), source.to(scores.device)
    queries = target.any(0).nonzero()[:, 0]  # only these query rows change: edit them alone
    block = target[:, queries, None] & source[:, None, :]  # [batch, n_queries, k]
    block = block if active is None else block & active.to(scores.device)[:, None, None]
    lowest = torch.finfo(scores.dtype).min
    rows = scores[:, :, queries]
    rows = torch.where(block[:, None], (rows + lowest).clamp_min(lowest), rows)
    return scores.index_copy(2, queries, rows)


def knockout(
    model: HookedLlava, inputs: LlavaInputs, source: Positions, target: Positions, layers: int | Sequence[int]
) -> Float[Tensor, "batch pos d_vocab"]:
    """Logits with attention from `target` queries to `source` keys blocked in `layers`, all heads.

    Args:
        model: the model.
        inputs: the prepared batch.
        source: key positions, a role ("image", "question", "last", "text", "related",
            "other_image", ...) or explicit positions (negative ones count back from each row's last real token, so
            `[-1]` is every row's answer position on a right-padded batch too; positions outside
            the sequence raise).
        target: query positions, same forms.
        layers: a layer or the layers to block in, in `0..n_layers-1` (negative ones count from
            the end); the causal mask stays everywhere.

    Example:
        >>> logits = knockout(model, inputs, "image", "last", layers=range(0, 2))
    """
    hook = partial(block_scores, target=flow_mask(inputs, target), source=flow_mask(inputs, source))
    hooks = [(f"blocks.{layer}.attn.hook_attn_scores", hook) for layer in _layers(model, layers)]
    return model.run_with_hooks(inputs, fwd_hooks=hooks)


def _layers(model: HookedLlava, layers: int | Sequence[int]) -> list[int]:
    return ranges.indices(layers, model.cfg.n_layers, "layer")


def _answer_ids(model: HookedLlava, answer: Any, n: int, greedy: Int[Tensor, " batch"]) -> Int[Tensor, " batch"]:
    """Token ids of the explained answer per row: None → the greedy token, else an id, a one-token
    string, or one of those per row."""
    if answer is None:
        return greedy
    if isinstance(answer, (int, str)) or (isinstance(answer, Tensor) and answer.ndim == 0):
        answer = [answer] * n
    ids = [model.to_single_token(a) if isinstance(a, str) else ranges.token_id(a, model.cfg.d_vocab) for a in answer]
    if len(ids) != n:
        raise ValueError(f"answer gives {len(ids)} tokens for {n} examples; give one per example or one for all.")
    return torch.tensor(ids, device=greedy.device)


class _Config(NamedTuple):
    """One batch row of a sweep: `flow` knocked out in layers `start..stop-1` of `example`."""

    start: int
    stop: int
    flow: str
    layer: int
    example: int = 0


def knockout_sweep(
    model: HookedLlava,
    inputs: LlavaInputs,
    flows: FlowSpec | Sequence[FlowSpec] | Mapping[str, tuple] | None = None,
    window: int = 9,
    answer: Any = None,
    batch_size: int = 16,
    progress: bool = True,
    box_rule: BoxRule = "exclusive",
) -> pd.DataFrame:
    """The study's knockout sweep: for every flow, plotted layer and example, the answer probability.

    For plotted layer l the flow is blocked in `window_layers(l, L, window)`; `p` is the
    softmax probability of the answer token at the last position (in float32, or the model's
    precision if higher) and `rel_change` is the study's `(p_blocked - p_base) / p_base * 100`.
    `delta_log_prob` is the same change in nats, `log p_blocked - log p_base`, taken from the
    log-softmax (not the log of rounded probabilities), so it still shows effects on confident
    answers where `rel_change` saturates. The study keeps only examples the model answers
    correctly: filter `inputs` first.

    Args:
        model: the model.
        inputs: the examples, one per row (padding allowed).
        flows: names ("question->last", "image->last", "image->question", "last->last",
            "related->question", "other->question", any "role->role"), (source, target) pairs
            of roles/positions, or a {label: (source, target)} mapping. Default: all six.
        window: consecutive layers blocked per plotted layer, 1 or more (placed as in
            `window_layers`, clipped at the ends).
        answer: the token explained: None (the unblocked greedy token), an id or a one-token
            string, or one of those per example.
        batch_size: configurations per forward pass (and examples per base pass).
        progress: show a tqdm bar over the configurations.
        box_rule: how the "related"/"other" flows turn boxes into patches: "exclusive"
            (default: `x1`, `y1` exclusive) or "pil" (the study's code, one pixel wider).

    Returns:
        Tidy DataFrame with columns flow, layer, example, p_base, p_blocked, rel_change
        (percent), delta_log_prob (nats).

    Example:
        >>> df = knockout_sweep(model, inputs, ["question->last", "image->last"])
    """
    flows, n_layers, frames = resolve_flows(flows), model.cfg.n_layers, []
    window, batch_size = ranges.count(window, "window"), ranges.count(batch_size, "batch_size")
    inputs = inputs.to(next(model.parameters()).device)
    plan = [_Config(w.start, w.stop, f, layer) for f in flows for layer in range(n_layers)
            for w in [window_layers(layer, n_layers, window)]]  # fmt: skip
    per_row = not (answer is None or isinstance(answer, (int, str)) or getattr(answer, "ndim", 1) == 0)
    with torch.no_grad(), tqdm(total=len(plan) * len(inputs), disable=not progress, desc="knockout") as bar:
        for first in range(0, len(inputs), batch_size):
            rows = list(range(first, min(first + batch_size, len(inputs))))
            wanted = answer[first : rows[-1] + 1] if per_row else answer
            part = _sweep_rows(model, inputs[rows], flows, plan, wanted, batch_size, bar, box_rule)
            frames.append(part.assign(example=part.example + first))
    df = pd.concat(frames, ignore_index=True)
    order = df.flow.map(list(flows).index)
    return df.assign(order=order).sort_values(["order", "layer", "example"], ignore_index=True)[COLUMNS]


def _sweep_rows(model: HookedLlava, inputs: LlavaInputs, flows: dict, plan: list[_Config], answer: Any,
                batch_size: int, bar: Any, box_rule: BoxRule) -> pd.DataFrame:  # fmt: skip
    """The sweep for a group of examples: one base pass, then every configuration in row batches."""
    names = [f"blocks.{s}.hook_resid_pre" for s in sorted({c.start for c in plan})]
    names += [f"blocks.{layer}.attn.{h}" for layer in range(model.cfg.n_layers) for h in ("hook_rot_k", "hook_v")]
    final, cache = model.run_with_cache(inputs, stop_at_layer=model.cfg.n_layers, names_filter=names)
    last = final[torch.arange(len(inputs)), inputs.last]
    base = model.unembed(model.ln_final(last[:, None]))[:, 0]
    ids = _answer_ids(model, answer, len(inputs), base.argmax(-1))
    masks = {label: (flow_mask(inputs, t, box_rule), flow_mask(inputs, s, box_rule)) for label, (s, t) in flows.items()}
    _warn_empty(masks)
    todo = sorted(c._replace(example=e) for c in plan for e in range(len(inputs)))
    blocked = []
    for i in range(0, len(todo), batch_size):
        chunk = todo[i : i + batch_size]
        blocked.append(_log_prob(_run_chunk(model, inputs, cache, masks, chunk), ids[[c.example for c in chunk]]))
        bar.update(len(chunk))
    df = pd.DataFrame(todo, columns=list(_Config._fields)).drop(columns=["start", "stop"])
    log_base = _log_prob(base, ids).cpu()[torch.tensor(df.example.tolist(), dtype=torch.long)]
    log_blocked = torch.cat(blocked).cpu()
    df["p_base"], df["p_blocked"] = log_base.exp().numpy(), log_blocked.exp().numpy()
    df["rel_change"] = (df.p_blocked - df.p_base) / df.p_base * 100
    return df.assign(delta_log_prob=(log_blocked - log_base).numpy())


def _run_chunk(model: HookedLlava, inputs: LlavaInputs, cache: Any, masks: dict[str, tuple],
               chunk: list[_Config]) -> Float[Tensor, "rows d_vocab"]:  # fmt: skip
    """Run a batch of configurations block by block. A row joins at the first layer of its window,
    from the cached unblocked residual (rows are sorted by start layer, so joiners append).
    Positions before the first target query keep their unblocked values (attention is causal),
    so only the positions from there on are recomputed, over the cached keys/values of the prefix."""
    examples = [c.example for c in chunk]
    start, stop = torch.tensor([c.start for c in chunk]), torch.tensor([c.stop for c in chunk])
    target = torch.stack([masks[c.flow][0][c.example] for c in chunk])
    source = torch.stack([masks[c.flow][1][c.example] for c in chunk])
    p0 = int(torch.cat([target.any(0).nonzero()[:, 0], inputs.last[examples]]).min())
    mask2d, positions = inputs.attention_mask[examples], inputs.position_ids()[examples, p0:]
    hooks = []  # one hook per layer for the whole chunk: it takes the rows that have joined so far
    for layer in range(chunk[0].start, model.cfg.n_layers):
        active = ((start <= layer) & (layer < stop)).to(target.device)
        hook = partial(_joined_rows, target=target[:, p0:], source=source, active=active)
        hooks += [(f"blocks.{layer}.attn.hook_attn_scores", hook)] if active.any() else []
    x = cache[f"blocks.{chunk[0].start}.hook_resid_pre"][:0, p0:]
    with model.hooks(fwd_hooks=hooks):
        for layer in range(chunk[0].start, model.cfg.n_layers):
            joining = [e for e, c in zip(examples, chunk, strict=True) if c.start == layer]
            x = torch.cat([x, cache[f"blocks.{layer}.hook_resid_pre"][joining, p0:]]) if joining else x
            n = x.shape[0]
            keys, values = (cache[f"blocks.{layer}.attn.{h}"][examples[:n], :p0] for h in ("hook_rot_k", "hook_v"))
            past: list[KeyValueCacheEntry | None] = [None] * layer + [KeyValueCacheEntry(keys, values, frozen=True)]
            x = model.run_blocks(x, mask2d[:n], positions[:n], layer, layer + 1, past_kv_cache=past)
    last = x[torch.arange(len(chunk), device=x.device), inputs.last[examples].to(x.device) - p0]
    return model.unembed(model.ln_final(last[:, None]))[:, 0]


def _joined_rows(scores: Tensor, hook: Any, target: Tensor, source: Tensor, active: Tensor) -> Tensor:
    """`block_scores` for the first `scores.shape[0]` rows of a chunk (the rows that have joined)."""
    n = scores.shape[0]
    return block_scores(scores, hook, target[:n], source[:n], active[:n])


def _log_prob(logits: Tensor, ids: Tensor) -> Float[Tensor, " batch"]:
    """`log p(ids)` from the log-softmax, in float32 or the logits' precision if higher."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    return logits.to(dtype).log_softmax(-1).gather(-1, ids.to(logits.device)[:, None])[:, 0]


def _warn_empty(masks: dict[str, tuple[Tensor, Tensor]]) -> None:
    for label, (target, source) in masks.items():
        if not (target.any(1) & source.any(1)).all():
            msg = f"flow {label!r} has no source or no target positions in some examples: p_blocked = p_base there."
            warnings.warn(msg, stacklevel=4)
