"""Saved predictions and `report --examples`: the answers that changed between rows."""

from __future__ import annotations

import json
from pathlib import Path

from mllm_cl.predictions import changed, format_examples, rows


def _write(run: Path, row: str, eval_set: str, records: list[dict]) -> None:
    folder = run / "predictions" / row
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{eval_set}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def _rec(sid: str, pred: str, score: float) -> dict:
    return {
        "id": sid,
        "prompt": f"How many planes? ({sid})",
        "prediction": pred,
        "references": ["2"],
        "score": score,
    }


def test_changed_answers_between_consecutive_rows(tmp_path):
    _write(
        tmp_path, "0_base", "heldout", [_rec("1", "a plane", 1.0), _rec("2", "2", 1.0), _rec("10", "x", 0.0)]
    )
    _write(
        tmp_path,
        "1_count",
        "heldout",
        [_rec("1", "The airplane is 8.", 0.0), _rec("2", "2", 1.0), _rec("10", "y", 0.0)],
    )
    _write(
        tmp_path,
        "2_colour",
        "heldout",
        [_rec("1", "a plane", 1.0), _rec("2", "2", 1.0), _rec("10", "y", 0.0)],
    )
    _write(
        tmp_path, "10_late", "heldout", [_rec("1", "a plane", 1.0), _rec("2", "3", 0.0), _rec("10", "y", 0.0)]
    )
    assert [(i, label) for i, label, _ in rows(str(tmp_path))] == [
        (0, "base"),
        (1, "count"),
        (2, "colour"),
        (10, "late"),
    ]
    got = [
        (b, a, o["id"], o["prediction"], n["prediction"]) for b, a, o, n in changed(str(tmp_path), "heldout")
    ]
    assert got == [
        ("base", "count", "1", "a plane", "The airplane is 8."),
        ("base", "count", "10", "x", "y"),
        ("count", "colour", "1", "The airplane is 8.", "a plane"),
        ("colour", "late", "2", "2", "3"),
    ]
    text = format_examples(str(tmp_path), n=1)
    assert "### heldout: base -> count: 2 answers changed (0 now better, 1 now worse)" in text
    assert "### heldout: count -> colour: 1 answers changed (1 now better, 0 now worse)" in text
    assert "'The airplane is 8.' (score 0)" in text
    assert "id 10" not in text  # n=1: only the first changed sample of base -> count is shown


def test_no_predictions_says_so(tmp_path):
    assert "no saved predictions" in format_examples(str(tmp_path), 3)
