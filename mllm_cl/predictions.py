"""Saved predictions: read ``predictions/<row>/<set>.jsonl`` and show the answers that changed.

`fit` writes one folder per row of the accuracy matrix (``0_base``, ``1_<task>``, ...) and `validate`
/ `test` one per stage; every line is one scored sample: id, prompt, prediction, references, score
and the metric's per-sample parts. ``python -m mllm_cl report RUN --examples N`` prints, for every
eval set and every pair of consecutive rows, up to N samples whose answer changed — the qualitative
side of forgetting ("The airplane is 8." after a counting task).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator

_ROW = re.compile(r"^(\d+)_(.+)$")


def rows(run_dir: str) -> list[tuple[int, str, str]]:
    """(index, label, folder) of every fit row with saved predictions, in row order."""
    root = os.path.join(run_dir, "predictions")
    if not os.path.isdir(root):
        return []
    found = [(_ROW.match(name), name) for name in os.listdir(root)]
    return sorted((int(m.group(1)), m.group(2), os.path.join(root, name)) for m, name in found if m)


def read_set(folder: str, eval_set: str) -> dict[str, dict]:
    """{sample id: record} of one eval set in one row folder ({} when the file is absent)."""
    path = os.path.join(folder, f"{eval_set}.jsonl")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as fh:
        return {str(r["id"]): r for r in map(json.loads, filter(str.strip, fh))}


def eval_sets(run_dir: str) -> list[str]:
    names: set[str] = set()
    for _, _, folder in rows(run_dir):
        names.update(f[: -len(".jsonl")] for f in os.listdir(folder) if f.endswith(".jsonl"))
    return sorted(names)


def changed(run_dir: str, eval_set: str) -> Iterator[tuple[str, str, dict, dict]]:
    """(row before, row after, record before, record after) for every sample whose answer changed
    between consecutive rows, in sample-id order within each pair of rows."""
    ordered = rows(run_dir)
    for (_, before, f0), (_, after, f1) in zip(ordered, ordered[1:], strict=False):
        old, new = read_set(f0, eval_set), read_set(f1, eval_set)
        for sid in sorted(old.keys() & new.keys(), key=_natural):
            if old[sid]["prediction"] != new[sid]["prediction"]:
                yield before, after, old[sid], new[sid]


def _natural(text: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", text)]


def _short(text: str, width: int = 100) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def format_examples(run_dir: str, n: int) -> str:
    """Markdown: per eval set and pair of rows, the number of changed answers and up to `n` of them."""
    if not rows(run_dir):
        return f"{run_dir}: no saved predictions (predictions/<row>/<set>.jsonl); re-run fit to write them"
    lines = [f"## Changed answers: {run_dir}"]
    for eval_set in eval_sets(run_dir):
        by_pair: dict[tuple[str, str], list] = {}
        for before, after, old, new in changed(run_dir, eval_set):
            by_pair.setdefault((before, after), []).append((old, new))
        for (before, after), pairs in by_pair.items():
            gained = sum(new["score"] > old["score"] for old, new in pairs)
            lost = sum(new["score"] < old["score"] for old, new in pairs)
            lines.append(
                f"\n### {eval_set}: {before} -> {after}: {len(pairs)} answers changed "
                f"({gained} now better, {lost} now worse)"
            )
            for old, new in pairs[:n]:
                lines.append(f"- id {old['id']}: {_short(old['prompt'])}")
                lines.append(f"  - references: {_short(' | '.join(map(str, old['references'])))}")
                lines.append(f"  - {before}: {_short(old['prediction'])!r} (score {old['score']:g})")
                lines.append(f"  - {after}: {_short(new['prediction'])!r} (score {new['score']:g})")
    if len(lines) == 1:
        lines.append("\nNo answer changed between rows.")
    return "\n".join(lines)
