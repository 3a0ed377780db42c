"""Attention knockout (study B, METHODS.md §3): forbid target queries to attend to source keys.

`knockout` runs one configuration. `knockout_sweep` runs the study's sweep (for every
plotted layer, block a window of layers around it) for several flows and returns a tidy
DataFrame; `summarize_knockout` gives the per flow/layer mean with a 95% confidence interval.

The sweep is built for speed without changing a result: one base pass runs the vision tower
and caches every `resid_pre` and every layer's keys/values; a configuration starts at the
first layer of its window from the cached residual, and only the positions from its first
target query on are recomputed (earlier ones cannot see the knockout: attention is causal),
over the cached keys/values of the prefix (`model.run_blocks` with `past`). Configurations
run together as batch rows (`inputs[rows]`, repeats allowed), each row with its own knockout mask.
"""

# ruff: noqa: F722  (jaxtyping shape strings are not Python expressions)

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from functools import partial
from statistics import NormalDist
from typing import Any, NamedTuple

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from hooked_llava import HookedLlava, LlavaInputs
from hooked_llava.geometry import BoxRule, related_mask
from hooked_llava.kv_cache import KeyValueCacheEntry

from . import ranges

Positions = str | Sequence[int] | Tensor
FlowSpec = str | tuple[Positions, Positions]
# The study's six flows, as (source, target) position sets.
FLOWS: dict[str, tuple[str, str]] = {
    "question->last": ("question", "last"),
    "image->last": ("image", "last"),
    "image->question": ("image", "question"),
    "last->last": ("last", "last"),
    "related->question": ("related", "question"),
    "other->question": ("other_image", "question"),
}
_ROLE_ALIASES = {"other": "other_image", "related_image": "related"}
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
            "other_image", ...) or explicit positions (negative ones count from the end; positions
            outside the sequence raise).
        target: query positions, same forms.
        layers: a layer or the layers to block in, in `0..n_layers-1` (negative ones count from
            the end); the causal mask stays everywhere.

    Example:
        >>> logits = knockout(model, inputs, "image", "last", layers=range(0, 2))
    """
    hook = partial(block_scores, target=flow_mask(inputs, target), source=flow_mask(inputs, source))
    hooks = [(f"blocks.{layer}.attn.hook_attn_scores", hook) for layer in _layers(model, layers)]
    return model.run_with_hooks(inputs, fwd_hooks=hooks)


def window_layers(layer: int, n_layers: int, window: int = 9) -> range:
    """Layers blocked for plotted `layer`, placed as study B's code places them (METHODS.md §3):
    `range(max(0, l - w // 2), min(L, l - (-w // 2)))`, i.e. `w // 2` layers before `l` and
    `w - 1 - w // 2` after (9 gives l-4 ... l+4; an even 4 gives l-2 ... l+1), clipped at the ends.

    Example:
        >>> list(window_layers(0, 32))  # [0, 1, 2, 3, 4]
    """
    layer = ranges.index(layer, n_layers, "layer")
    window = ranges.count(window, "window")
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))


def flow_mask(inputs: LlavaInputs, where: Positions, box_rule: BoxRule = "exclusive") -> Tensor:
    """`inputs.as_mask` with explicit positions range-checked, and the "related" / "other_image"
    roles built with `box_rule` (see `hooked_llava.geometry.box_to_patches`).

    Example:
        >>> flow_mask(inputs, "related", box_rule="pil")  # the study's one-pixel-wider boxes
    """
    where = ranges.positions(inputs, where)
    if isinstance(where, str) and _ROLE_ALIASES.get(where, where) in ("related", "other_image"):
        related = related_mask(inputs, box_rule)
        return related if _ROLE_ALIASES.get(where, where) == "related" else inputs.image_mask & ~related
    return inputs.as_mask(where)


def resolve_flows(flows: FlowSpec | Sequence[FlowSpec] | Mapping[str, tuple] | None) -> dict[str, tuple]:
    """Flow names ("image->last", "Image→Last", "other->question") or (source, target) pairs, by label.

    Example:
        >>> resolve_flows(["image->last", ("question", [5, 6])])
        {'image->last': ('image', 'last'), 'question->[5, 6]': ('question', [5, 6])}
    """
    if flows is None:
        return dict(FLOWS)
    if isinstance(flows, Mapping):
        return dict(flows)
    items = [flows] if isinstance(flows, str) else list(flows)
    resolved = {}
    for item in items:
        if isinstance(item, str):
            name = item.lower().replace("→", "->").replace(" ", "")
            if name not in FLOWS and name.count("->") != 1:
                raise ValueError(f"unknown flow {item!r}: use 'source->target' (e.g. {list(FLOWS)}) or a pair.")
            source, target = FLOWS.get(name) or tuple(_ROLE_ALIASES.get(r, r) for r in name.split("->"))
            resolved[name] = (source, target)
        elif isinstance(item, tuple) and len(item) == 2:
            label = (p if isinstance(p, str) else str(torch.as_tensor(p).tolist()) for p in item)
            resolved["->".join(label)] = item
        else:
            raise TypeError(f"a flow is a name like 'image->last' or a (source, target) pair, got {item!r}.")
    return resolved


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


def t_quantile(p: float, df: int) -> float:
    """Student-t quantile: exact for 1 and 2 degrees of freedom, a 4-term Cornish–Fisher
    expansion otherwise (relative error < 2e-3 at df=3, < 1e-5 from df=8).

    Example:
        >>> round(t_quantile(0.975, 4), 3)  # 2.776
    """
    if df == 1:
        return math.tan(math.pi * (p - 0.5))
    if df == 2:
        return (2 * p - 1) * math.sqrt(2 / (4 * p * (1 - p)))
    z = NormalDist().inv_cdf(p)
    terms = [
        (z**3 + z) / 4,
        (5 * z**5 + 16 * z**3 + 3 * z) / 96,
        (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384,
        (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160,
    ]
    return z + sum(term / df ** (k + 1) for k, term in enumerate(terms))


MIN_N = 5  # fewer examples than this get no confidence interval: the t interval is too wide to read


def _upper_bound(df: pd.DataFrame, value: str) -> pd.Series:
    """Per row, the largest value the metric can take: a probability can at most rise to 1, so the
    relative change is at most (1 − p_base) / p_base (in %), the log-probability change −log p_base."""
    inf = pd.Series(math.inf, index=df.index)
    if "p_base" not in df:
        return inf
    p = df["p_base"].astype(float)
    if value in ("rel_change", "rel_change_pct"):
        return (1 - p) / p * 100
    if value == "delta_log_prob":
        return -p.map(math.log)
    return pd.Series(1.0, index=df.index) if value in ("p_base", "p_blocked") else inf


def _lower_bound(value: str) -> float:
    """The smallest value the metric can take: a relative change cannot go below −100 %."""
    return {"rel_change": -100.0, "rel_change_pct": -100.0, "p_base": 0.0, "p_blocked": 0.0}.get(value, -math.inf)


def _interval(df: pd.DataFrame, value: str, by: list[str], confidence: float, min_n: int) -> pd.DataFrame:
    """Per group: n, mean and the Student-t interval, clipped to the metric's range (NaN for n < min_n)."""
    frame = df[by].assign(v=df[value].astype(float), top=_upper_bound(df, value))
    stats = frame.groupby(by, sort=False).agg(
        n=("v", "count"), mean=("v", "mean"), sem=("v", "sem"), top=("top", "mean")
    )
    quantile = [t_quantile((1 + confidence) / 2, int(n) - 1) if n >= max(min_n, 2) else math.nan for n in stats["n"]]
    half = stats["sem"] * quantile
    low = (stats["mean"] - half).clip(lower=_lower_bound(value))
    high = (stats["mean"] + half).clip(upper=stats["top"])
    return stats[["n", "mean"]].assign(ci_low=low, ci_high=high).reset_index()


def summarize_knockout(
    df: pd.DataFrame,
    value: str | Sequence[str] | None = None,
    confidence: float = 0.95,
    by: Sequence[str] = ("flow", "layer"),
    min_n: int = MIN_N,
) -> pd.DataFrame:
    """Per flow and layer: mean of `value` over examples with a Student-t confidence interval.

    The interval stays within what the metric can take: a relative change is at least −100 % and at
    most the mean of (1 − p_base) / p_base × 100; a log-probability change (nats) at most the mean of
    −log p_base (the upper bounds need a `p_base` column). With fewer than `min_n` examples (default
    5) the interval is NaN: at n = 2 a 95% t interval is ±12.7 standard errors, too wide to read.

    Args:
        df: `knockout_sweep` output (or a sweep's knockout table), one row per example, flow and layer.
        value: the column to summarise (default `rel_change`, or `rel_change_pct` when that is the one
            present); a list of columns gives `{value}_mean`, `{value}_ci_low`, `{value}_ci_high` for each.
        confidence: the interval's coverage.
        by: the grouping columns.
        min_n: the fewest examples that get an interval.

    Returns:
        Tidy DataFrame with columns `by`, n, mean, ci_low, ci_high (for one value) or `by`, n and
        the prefixed columns of each value (for a list); n counts the examples with a value.

    Example:
        >>> summarize_knockout(knockout_sweep(model, inputs, "image->last"))
    """
    names = [value] if isinstance(value, str) else list(value) if value is not None else [_default_value(df)]
    missing = [c for c in [*by, *names] if c not in df.columns]
    if missing:
        raise ValueError(f"summarize_knockout: no column(s) {missing} in the table (it has {list(df.columns)}).")
    parts = [_interval(df, name, list(by), confidence, min_n) for name in names]
    if isinstance(value, str) or value is None:
        return parts[0]
    out = parts[0][[*by, "n"]]
    for name, part in zip(names, parts, strict=True):
        out = out.assign(**{f"{name}_{k}": part[k].to_numpy() for k in ("mean", "ci_low", "ci_high")})
    return out


def _default_value(df: pd.DataFrame) -> str:
    return "rel_change_pct" if "rel_change_pct" in df and "rel_change" not in df else "rel_change"
