"""The same config and seed, run twice on CPU, give the same accuracy matrix and the same weights."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.helpers import fit_cli


def run(tmp: Path, name: str) -> tuple[dict, dict]:
    task = {
        "class_path": "Synthetic",
        "init_args": {"skill": "colour", "n": 8, "seed": 3, "image_size": 32, "object_size": [0.25, 0.45]},
    }
    model = {"family": "llava", "recipe": {"class_path": "Full"}, "lr": 3e-3, "max_new_tokens": 3}
    data = {"batch_size": 4, "tasks": [{"name": "c", "train": task, "eval": task, "steps": 12}]}
    run_dir, weights = fit_cli(tmp, name, model, data)
    return json.loads((run_dir / "results.json").read_text()), weights


def test_same_seed_same_matrix_and_weights(tmp_path):
    first, w1 = run(tmp_path, "one")
    second, w2 = run(tmp_path, "two")
    assert first["matrix"] == second["matrix"]
    assert w1.keys() == w2.keys()
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert any(not torch.equal(w1[k], torch.zeros_like(w1[k])) for k in w1)
