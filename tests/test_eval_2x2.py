"""2x2 ID/OOD evaluation: a tiny run of configs/demo_2x2.yaml writes domains and `report` shows the quadrants."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from mllm_cl.cli import main
from mllm_cl.report import main as report_main
from tests.helpers import ROOT


def _shrink(config: dict, out: Path) -> dict:
    """The demo config at test size: tiny model, 3 steps, a few samples per eval set."""
    config["model"]["tiny"] = "tiny"
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(out / "runs")
    for cb in config["trainer"]["callbacks"]:
        cb["init_args"].update(limit=4, max_new_tokens=2)
    config["data"].update(eval_limit=6, eval_batch_size=4)
    task = config["data"]["tasks"][0]
    task["steps"], task["train"]["init_args"]["n"] = 3, 48
    for source in [task["eval"]] + [h["data"] for h in config["data"]["heldout"]]:
        source["init_args"]["image_size"] = 32
    return config


@pytest.fixture(scope="module")
def run_2x2(tmp_path_factory):
    out = tmp_path_factory.mktemp("2x2")
    config = _shrink(yaml.safe_load((ROOT / "configs" / "demo_2x2.yaml").read_text()), out)
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(path), "--trainer.default_root_dir", str(out)])
    (run,) = list((out / "runs").glob("*/version_*"))
    return config, run


def test_results_carry_domains(run_2x2):
    config, run = run_2x2
    results = json.loads((run / "results.json").read_text())
    want = {
        h["name"]: {"image": h.get("image_domain", "id"), "text": h.get("text_domain", "id")}
        for h in config["data"]["heldout"]
    }
    want["count"] = {"image": "id", "text": "id"}
    assert results["domains"] == want
    # All four quadrants are filled.
    assert {(d["image"], d["text"]) for d in want.values()} == {
        ("id", "id"),
        ("id", "ood"),
        ("ood", "id"),
        ("ood", "ood"),
    }


def test_report_shows_quadrants(run_2x2, tmp_path, capsys):
    _, run = run_2x2
    assert report_main([str(run), "--no-plots", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "report.md").read_text()
    assert "ID / OOD (image x text)" in text
    results = json.loads((run / "results.json").read_text())
    cols, domains = results["columns"], results["domains"]
    table = [line for line in text.splitlines() if line.startswith("| after") and "img" in line]
    assert table, text
    header = [c.strip() for c in table[0].strip("|").split("|")]
    rows = [line for line in text.splitlines() if line.startswith("| base") or line.startswith("| count")]
    quad_rows = [r for r in rows if r.count("|") == len(header) + 1]
    assert len(quad_rows) == len(results["row_labels"])
    for label, line in zip(results["row_labels"], quad_rows[-len(results["row_labels"]) :], strict=True):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == label
        row = results["matrix"][results["row_labels"].index(label)]
        for name, cell in zip(header[1:], cells[1:], strict=True):
            image, text_dom = (p.split()[0].lower() for p in name.split(" / "))
            vals = [
                row[cols.index(c)] for c, d in domains.items() if (d["image"], d["text"]) == (image, text_dom)
            ]
            vals = [v for v in vals if v is not None and not math.isnan(v)]
            assert float(cell) == pytest.approx(100 * sum(vals) / len(vals), abs=0.051)


def _emt_by_hand(prompt: str, prediction: str, reference: str) -> float:
    """EMT on a "Choose one of: a, b, c." prompt: right when the answer names exactly one label, the reference."""
    labels = [w.strip() for w in prompt.split("Choose one of:")[1].strip().rstrip(".").split(",")]
    words = prediction.lower().replace(".", " ").split()
    named = [label for label in labels if label in words]
    return float(len(named) == 1 and named[0] == reference)


def test_per_set_generation_options_apply(run_2x2):
    """shape_classify (emt, stop ".", 3 new tokens) answers in at most 3 words where the sets on the
    model's default (4 tokens) answer in 4, and its matrix cells are EMT scores of its predictions,
    with the labels its prompts name."""
    _, run = run_2x2
    results = json.loads((run / "results.json").read_text())
    col = results["columns"].index("shape_classify")
    for i, label in enumerate(results["row_labels"]):
        folder = run / "predictions" / f"{i}_{label}"
        records = [json.loads(x) for x in (folder / "shape_classify.jsonl").read_text().splitlines()]
        assert len(records) == 6  # data.eval_limit
        assert all(len(r["prediction"].split()) <= 3 and "." not in r["prediction"] for r in records)
        scores = [_emt_by_hand(r["prompt"], r["prediction"], r["references"][0]) for r in records]
        assert results["matrix"][i][col] == pytest.approx(sum(scores) / len(scores))
    base = [
        json.loads(x)["prediction"]
        for x in (run / "predictions" / "0_base" / "id_id.jsonl").read_text().splitlines()
    ]
    assert max(len(p.split()) for p in base) == 4  # the untrained model rambles to the default budget
    probes = [json.loads(x)["label"] for x in (run / "probe.jsonl").read_text().splitlines()]
    assert [p for p in probes if p != "step"] == ["base", "after_count"]
