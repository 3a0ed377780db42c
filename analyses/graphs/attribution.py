"""`attribute`: the attribution graph of one prompt through transcoders (circuit-tracer's algorithm).

1. The clean run gives the active features, error terms and the logit targets (the most probable
   tokens, at most `max_n_logits`, until their probabilities reach `desired_logit_prob`).
2. The frozen replacement model is run on `batch_size` copies of the prompt; each backward pass gives
   the in-edges of `batch_size` targets (see `replacement.py`).
3. The logit rows come first; then the feature rows, all of them, or, with `max_feature_nodes`, the
   most influential features first (influence re-estimated from the rows found so far).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from analyses.graphs.graph import Graph, position_table
from analyses.graphs.influence import partial_influence
from analyses.graphs.replacement import CleanRun, FrozenModel, clean_run


def logit_targets(logits: torch.Tensor, max_n_logits: int, desired_logit_prob: float) -> tuple[list[int], torch.Tensor]:
    """The most probable tokens until their probabilities sum to `desired_logit_prob` (at most `max_n_logits`)."""
    probs = logits.float().softmax(-1)
    top = probs.topk(min(max_n_logits, len(probs)))
    n = int(torch.searchsorted(top.values.cumsum(0), torch.tensor(desired_logit_prob))) + 1
    n = min(n, len(top.values))
    return top.indices[:n].tolist(), top.values[:n].cpu()


def attribute(
    model: Any,
    inputs: Any,
    ts: Any,
    max_n_logits: int = 10,
    desired_logit_prob: float = 0.95,
    max_feature_nodes: int | None = None,
    batch_size: int = 64,
    update_interval: int = 4,
    verbose: bool = False,
) -> Graph:
    """The attribution graph of row 0 of `inputs` (a `LlavaInputs` from `model.prepare`).

    Args:
        model: the HookedLlava.
        inputs: the prompt (with its image); only row 0 is attributed.
        ts: the transcoders (`hooked_llava.transcoders.load_transcoders`).
        max_n_logits: most logit targets.
        desired_logit_prob: stop adding logit targets once their probabilities sum to this.
        max_feature_nodes: most feature nodes (the most influential first); None for all active features.
        batch_size: targets per backward pass.
        update_interval: batches between re-rankings of the features when `max_feature_nodes` caps them.
        verbose: show a progress bar.

    Returns:
        The `Graph` (full adjacency, unpruned).
    """
    if len(ts) != model.cfg.n_layers:
        raise ValueError(f"the transcoder set has {len(ts)} layers but the model has {model.cfg.n_layers}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    clean = clean_run(model, inputs, ts)
    targets, probs = logit_targets(clean.logits, max_n_logits, desired_logit_prob)
    frozen = FrozenModel(model, inputs, ts, clean, batch_size)
    nnz = len(clean.active)
    n_cols = nnz + (len(ts) + 1) * clean.embed.shape[0]
    logit_rows = torch.cat(
        [frozen.rows(frozen.logit_reading[torch.arange(len(c)), c]) for c in torch.tensor(targets).split(batch_size)]
    )
    n_sel = nnz if max_feature_nodes is None else min(max_feature_nodes, nnz)

    def readings(chunk: torch.Tensor) -> torch.Tensor:
        return frozen.feature_readings(*clean.active[chunk].unbind(1))

    feature_rows, order = feature_rows_by_influence(
        frozen.rows, readings, nnz, logit_rows, probs, n_sel, batch_size, update_interval, verbose
    )
    return assemble_graph(model, inputs, ts, clean, targets, probs, logit_rows, feature_rows, order, n_cols)


def feature_rows_by_influence(
    rows_of: Callable[[torch.Tensor], torch.Tensor],
    readings: Callable[[torch.Tensor], torch.Tensor],
    nnz: int,
    logit_rows: torch.Tensor,
    probs: torch.Tensor,
    n_sel: int,
    batch_size: int,
    update_interval: int,
    verbose: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The in-edges of `n_sel` of the `nnz` active features (all, or the most influential first) and which
    features they are. `readings(chunk)` gives batch row `i`'s reading of feature `chunk[i]`, and `rows_of`
    turns readings into in-edge rows (columns: the `nnz` features first)."""
    rows = torch.zeros(n_sel, logit_rows.shape[1])
    order = torch.zeros(n_sel, dtype=torch.long)
    visited = torch.zeros(nnz, dtype=torch.bool)
    logit_nodes = torch.arange(len(probs)) + logit_rows.shape[1]
    done = 0
    bar = tqdm(total=n_sel, desc="feature rows", disable=not verbose)
    while done < n_sel:
        if n_sel == nnz:
            pending = torch.arange(nnz)
        else:
            row_nodes = torch.cat([logit_nodes, order[:done]])
            infl = partial_influence(torch.cat([logit_rows, rows[:done]]), row_nodes, probs)[:nnz]
            ranked = infl.argsort(descending=True)
            pending = ranked[~visited[ranked]][: min(update_interval * batch_size, n_sel - done)]
        for chunk in pending.split(batch_size):
            rows[done : done + len(chunk)] = rows_of(readings(chunk)).cpu()
            order[done : done + len(chunk)] = chunk
            visited[chunk] = True
            done += len(chunk)
            bar.update(len(chunk))
    bar.close()
    return rows, order


def assemble_graph(
    model: Any,
    inputs: Any,
    ts: Any,
    clean: CleanRun,
    targets: list[int],
    probs: torch.Tensor,
    logit_rows: torch.Tensor,
    feature_rows: torch.Tensor,
    order: torch.Tensor,
    n_cols: int,
) -> Graph:
    """The `Graph`: the square adjacency in node order `[selected features, errors, tokens, logits]`."""
    nnz = len(clean.active)
    selected, perm = order.sort()
    columns = torch.cat([selected, torch.arange(nnz, n_cols)])
    n_sel, n_logits = len(selected), len(targets)
    n_nodes = len(columns) + n_logits
    adjacency = torch.zeros(n_nodes, n_nodes)
    adjacency[:n_sel, : len(columns)] = feature_rows[perm][:, columns]
    adjacency[-n_logits:, : len(columns)] = logit_rows[:, columns].cpu()
    tok = model.processor.tokenizer
    ids = inputs.input_ids[0].cpu()
    return Graph(
        input_string=tok.decode(ids.tolist()),
        input_tokens=ids,
        logit_targets=targets,
        logit_tokens=model.to_str_tokens(torch.tensor(targets)),
        logit_probabilities=probs,
        active_features=clean.active.cpu(),
        activation_values=clean.values.cpu(),
        selected_features=selected,
        adjacency_matrix=adjacency,
        n_layers=len(ts),
        positions=position_table(inputs, model.to_str_tokens(ids)),
        scan=ts.scan,
    )
