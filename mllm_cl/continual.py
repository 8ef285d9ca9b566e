"""Continual-learning summaries of an accuracy matrix.

``R`` has one row per evaluation point: row 0 before any training, row ``i`` after
training task ``i`` (1-based). Columns ``0..T-1`` are the tasks' own eval sets (column
``j`` belongs to task ``j``, 0-based); the remaining columns are held-out eval sets.
NaN marks "not evaluated" and is skipped by every mean. A matrix with fewer than
``T + 1`` rows (a run in progress) is summarised over the tasks trained so far.

Definitions (T = rows - 1 tasks trained, task j learned at row j + 1, H = held-out columns):

* forgetting (Chaudhry et al. 2018, "Riemannian Walk", Eq. 5): f_j = max_{j+1 <= l <= T-1} R[l, j]
  - R[T, j] for j < T-1: the best accuracy *after* task j was learned minus the final one (the base
  row and the rows before task j do not count); ``forgetting`` is its mean over j.
* BWT / FWT (Lopez-Paz & Ranzato 2017, as Avalanche): mean_j R[T, j] - R[j+1, j];
  mean_{j>=1} R[j, j] - R[0, j].
* held-out change (Zhu et al. 2025): Δ_i = mean_h R[i, h] - R[0, h]. ``heldout_change`` is Δ_T
  (final row), ``heldout_change_avg`` the stage average (1/T) Σ_{i=1..T} Δ_i, ``heldout_change_sum``
  the sum Σ_{i=1..T} Δ_i (area under the held-out change curve).
* per held-out set h (Zhu et al.'s forgetting-then-recovery): ``heldout_max_drop/<h>`` =
  R[0, h] - min_{1<=i<=T} R[i, h] (negative: never below the base) and ``heldout_recovery/<h>`` =
  R[T, h] - min_{1<=i<=T} R[i, h] (how much came back by the end, >= 0); their means over h are
  ``heldout_max_drop`` and ``heldout_recovery``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

Matrix = Sequence[Sequence[float]] | np.ndarray


def _nanmean(values: Iterable[float]) -> float:
    # np.nanmean warns on all-NaN input; "nothing to average" is a normal case here.
    kept = [float(v) for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else float("nan")


def _nanmax(values: Iterable[float]) -> float:
    kept = [float(v) for v in values if not math.isnan(v)]
    return max(kept) if kept else float("nan")


def _nanmin(values: Iterable[float]) -> float:
    kept = [float(v) for v in values if not math.isnan(v)]
    return min(kept) if kept else float("nan")


def validate_matrix(R: Matrix, num_tasks: int) -> None:
    """Checks the shape and values of an accuracy matrix.

    Args:
        R: Accuracy matrix with at most ``num_tasks + 1`` rows.
        num_tasks: Number of tasks ``T`` in the sequence.

    Raises:
        ValueError: If ``num_tasks < 1``, the matrix is empty, has more than ``T + 1`` rows,
            rows of different lengths, fewer than ``T`` columns, or a value outside [0, 1].
    """
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
    try:
        rows = [[float(v) for v in row] for row in R]
    except (TypeError, ValueError) as err:
        raise ValueError(f"accuracy matrix must be a 2-D table of numbers: {err}") from None
    if not rows:
        raise ValueError("accuracy matrix has no rows")
    if len(rows) > num_tasks + 1:
        raise ValueError(f"accuracy matrix has {len(rows)} rows, at most num_tasks + 1 = {num_tasks + 1}")
    widths = {len(row) for row in rows}
    if len(widths) > 1:
        raise ValueError(f"accuracy matrix rows have different lengths: {sorted(widths)}")
    if widths.pop() < num_tasks:
        raise ValueError(f"accuracy matrix has {len(rows[0])} columns, fewer than num_tasks = {num_tasks}")
    for i, row in enumerate(rows):
        for j, value in enumerate(row):
            # `not 0 <= v <= 1` is also true for inf; NaN is allowed and skipped.
            if not math.isnan(value) and not 0.0 <= value <= 1.0:
                raise ValueError(f"accuracy matrix value R[{i}][{j}] = {value} is outside [0, 1]")


def _as_array(R: Matrix, num_tasks: int) -> np.ndarray:
    validate_matrix(R, num_tasks)
    return np.asarray([[float(v) for v in row] for row in R], dtype=float)


def summarize(R: Matrix, num_tasks: int) -> dict[str, float]:
    """Summarises an accuracy matrix with the usual continual-learning metrics.

    With ``T`` the number of trained tasks (``rows - 1``), the keys are
    ``avg_accuracy`` (final accuracy over trained tasks), ``learning`` (gain on each task
    right after learning it), ``forgetting`` (Chaudhry et al.: best accuracy after the task
    was learned minus the final one, last task excluded), ``bwt`` (final minus just-learned
    accuracy, last task excluded), ``fwt`` (accuracy on task ``j`` before learning it minus
    the untrained accuracy, ``j >= 1``), ``heldout_avg`` and ``heldout_change`` (final held-out
    accuracy and its change since row 0), ``heldout_change_avg`` / ``heldout_change_sum`` (that
    change averaged / summed over rows 1..T), ``heldout_max_drop`` and ``heldout_recovery``
    (see the module docstring), plus per-column ``learning/<j>``, ``forgetting/<j>``,
    ``heldout_change/<h>``, ``heldout_max_drop/<h>`` and ``heldout_recovery/<h>``.

    Args:
        R: Accuracy matrix (see module docstring).
        num_tasks: Number of tasks in the whole sequence.

    Returns:
        A flat dict of floats; NaN where nothing could be averaged.

    Raises:
        ValueError: If the matrix is invalid (see :func:`validate_matrix`).
    """
    A = _as_array(R, num_tasks)
    T = A.shape[0] - 1
    out: dict[str, float] = {}
    learning = {j: A[j + 1, j] - A[0, j] for j in range(T)}
    forgetting = {j: _nanmax(A[j + 1 : T, j]) - A[T, j] for j in range(T - 1)}
    cols = range(num_tasks, A.shape[1])
    heldout = {h: A[T, h] - A[0, h] for h in cols}
    lowest = {h: _nanmin(A[1:, h]) for h in cols} if T else {}
    per_set = {
        "learning": learning,
        "forgetting": forgetting,
        "heldout_change": heldout,
        "heldout_max_drop": {h: A[0, h] - low for h, low in lowest.items()},
        "heldout_recovery": {h: A[T, h] - low for h, low in lowest.items()},
    }
    for name, per_column in per_set.items():
        out[name] = _nanmean(per_column.values())
        out.update({f"{name}/{col}": float(value) for col, value in per_column.items()})
    stages = [_nanmean(A[i, num_tasks:] - A[0, num_tasks:]) for i in range(1, T + 1)]
    kept = [d for d in stages if not math.isnan(d)]
    out["heldout_change_avg"] = sum(kept) / len(kept) if kept else math.nan
    out["heldout_change_sum"] = sum(kept) if kept else math.nan
    out["avg_accuracy"] = _nanmean(A[T, :T])
    out["heldout_avg"] = _nanmean(A[T, num_tasks:])
    out["bwt"] = _nanmean(A[T, j] - A[j + 1, j] for j in range(T - 1))
    out["fwt"] = _nanmean(A[j, j] - A[0, j] for j in range(1, T))
    return out


def per_row_summary(R: Matrix, num_tasks: int) -> list[dict[str, float]]:
    """Summarises every row of an accuracy matrix, e.g. for plotting over training.

    Args:
        R: Accuracy matrix (see module docstring).
        num_tasks: Number of tasks in the whole sequence.

    Returns:
        Per row ``i``: ``row``, ``avg_seen`` (mean over tasks ``j < i``; NaN for row 0),
        ``heldout_avg`` and ``heldout_change`` (mean per-column change since row 0, so
        NaN cells drop out pairwise as in :func:`summarize`).

    Raises:
        ValueError: If the matrix is invalid (see :func:`validate_matrix`).
    """
    A = _as_array(R, num_tasks)
    return [
        {
            "row": i,
            "avg_seen": _nanmean(A[i, :i]),
            "heldout_avg": _nanmean(A[i, num_tasks:]),
            "heldout_change": _nanmean(A[i, num_tasks:] - A[0, num_tasks:]),
        }
        for i in range(A.shape[0])
    ]
