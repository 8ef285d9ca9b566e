"""mllm_cl.report on run directories written by the real StreamResults."""

import json
import math
import os
import subprocess
import sys

import pytest
from PIL import Image

from mllm_cl.continual import summarize
from mllm_cl.report import (
    COLUMNS,
    DASH,
    MINUS,
    compare,
    figures,
    fmt_pp,
    log_figures_to_tensorboard,
    main,
    plot,
    quadrants,
)
from mllm_cl.results import StreamResults

NAN = float("nan")
TASKS = ["cub", "count", "pathvqa"]
HELDOUT = ["ai2d"]
# Same matrix as tests/test_continual.py, whose summaries were computed by hand.
R = [
    [0.20, 0.10, 0.30, 0.50],
    [0.80, 0.20, 0.40, 0.45],
    [0.85, 0.90, 0.50, 0.40],
    [0.70, 0.70, 0.95, 0.55],
]
LABELS = ["base", "cub", "count", "pathvqa"]


def make_run(folder, matrix=R, tasks=TASKS, heldout=HELDOUT, recipe=None, domains=None):
    os.makedirs(folder, exist_ok=True)
    res = StreamResults(list(tasks), list(heldout))
    for label, row in zip(LABELS, matrix, strict=False):
        res.add_row(label, dict(zip(res.columns, row, strict=True)))
    res.write(str(folder))
    if recipe is not None:
        config = f"model:\n  family: llava\n  recipe:\n    class_path: {recipe}\n    init_args: {{}}\n"
        (folder / "config.yaml").write_text(config)
    if domains is not None:  # the key another module adds to results.json
        path = folder / "results.json"
        state = json.loads(path.read_text())
        path.write_text(json.dumps({**state, "domains": domains}))
    return str(folder)


def table_rows(text):
    """{run name: [cells]} of the comparison table (the first table in the report)."""
    block = text.split("\n\n")[1].splitlines()
    assert block[0].startswith("| run | Δ learning | Δ held-out |")
    return {
        cells[0]: cells[1:]
        for cells in ([c.strip() for c in line.strip("|").split("|")] for line in block[2:])
    }


def test_fmt_pp():
    assert fmt_pp(0.249, signed=True) == "+24.9"
    assert fmt_pp(-0.006, signed=True) == f"{MINUS}0.6"
    assert fmt_pp(0.764) == "76.4"
    assert fmt_pp(-0.0001, signed=True) == "+0.0"
    assert fmt_pp(NAN) == DASH and fmt_pp(None, signed=True) == DASH


def test_compare_table_matches_summarize(tmp_path):
    a = make_run(tmp_path / "version_0", recipe="strategies.freeze.SAProj")
    b_matrix = [[0.2, 0.1, 0.3, 0.5], [0.9, 0.1, 0.3, 0.2], [0.3, 0.95, 0.3, 0.1]]  # 2 of 3 tasks so far
    b = make_run(tmp_path / "version_1", matrix=b_matrix, recipe="LLM")
    c = make_run(tmp_path / "plain", matrix=[row[:3] for row in R], heldout=[])  # no config, no held-out
    text = compare([a, b, c])
    rows = table_rows(text)
    assert list(rows) == ["SAProj", "LLM", "plain"]
    for name, matrix, heldout in (("SAProj", R, HELDOUT), ("LLM", b_matrix, HELDOUT), ("plain", R, [])):
        s = summarize([row[: 3 + len(heldout)] for row in matrix], 3)
        assert rows[name][:-1] == [fmt_pp(s[key], signed) for _, key, signed in COLUMNS]
    # By hand (see tests/test_continual.py): learning 2.05/3, held-out +0.05 (final), stage average
    # (-0.05 - 0.10 + 0.05) / 3, max drop 0.50 - 0.40, recovered 0.55 - 0.40, avg 2.35/3, forgetting
    # 0.175, BWT -0.15, FWT 0.15, held-out avg 0.55.
    assert rows["SAProj"] == [
        "+68.3", "+5.0", f"{MINUS}3.3", "+10.0", "+15.0", "78.3", "+17.5", f"{MINUS}15.0", "+15.0", "55.0", "3/3",
    ]  # fmt: skip
    assert rows["LLM"][-1] == "2/3"  # a run in progress says so
    assert rows["LLM"][:2] == ["+77.5", f"{MINUS}40.0"]  # ((0.9-0.2) + (0.95-0.1)) / 2; 0.1 - 0.5
    assert rows["plain"][1] == DASH and rows["plain"][9] == DASH
    # Then every run's full matrix, in percentage points.
    assert "## SAProj" in text and "| after | cub | count | pathvqa | ai2d |" in text
    assert "| pathvqa | 70.0 | 70.0 | 95.0 | 55.0 |" in text
    assert "ID img" not in text  # no domains -> no 2x2 section
    assert list(table_rows(compare([a, b], names=["x", "y"]))) == ["x", "y"]


def test_same_recipe_twice_is_told_apart_by_folder(tmp_path):
    a = make_run(tmp_path / "version_0", recipe="SAProj")
    b = make_run(tmp_path / "version_1", recipe="SAProj")
    assert list(table_rows(compare([a, b]))) == ["SAProj (version_0)", "SAProj (version_1)"]


def test_quadrants_by_hand(tmp_path):
    # Columns: task "imagenet" (ID/ID), held-out "v2" and "flowers" (OOD img / ID text),
    # "wikiqa" (ID img / OOD text), "bsccm" (OOD/OOD, not evaluated after task 1).
    matrix = [
        [0.40, 0.30, 0.50, 0.60, 0.20],
        [0.90, 0.20, 0.40, 0.30, NAN],
    ]
    domains = {
        "imagenet": {"image": "id", "text": "id"},
        "v2": {"image": "ood", "text": "id"},
        "flowers": {"image": "OOD", "text": "ID"},
        "wikiqa": {"image": "id", "text": "ood"},
        "bsccm": {"image": "ood", "text": "ood"},
        "not_a_column": {"image": "id", "text": "id"},
    }
    run = make_run(
        tmp_path / "run", matrix, ["imagenet"], ["v2", "flowers", "wikiqa", "bsccm"], domains=domains
    )
    raw = json.loads((tmp_path / "run" / "results.json").read_text())
    q = quadrants(raw)
    assert [r["label"] for r in q] == ["base", "cub"]
    assert q[0]["ID img / ID text"] == pytest.approx(0.40)
    assert q[0]["OOD img / ID text"] == pytest.approx((0.30 + 0.50) / 2)
    assert q[0]["ID img / OOD text"] == pytest.approx(0.60)
    assert q[0]["OOD img / OOD text"] == pytest.approx(0.20)
    assert q[1]["ID img / ID text"] == pytest.approx(0.90)
    assert q[1]["OOD img / ID text"] == pytest.approx((0.20 + 0.40) / 2)
    assert q[1]["ID img / OOD text"] == pytest.approx(0.30)
    assert math.isnan(q[1]["OOD img / OOD text"])
    assert quadrants({k: v for k, v in raw.items() if k != "domains"}) == []
    text = compare([run])
    assert "| after | ID img / ID text | ID img / OOD text | OOD img / ID text | OOD img / OOD text |" in text
    assert "| base | 40.0 | 60.0 | 40.0 | 20.0 |" in text
    assert f"| cub | 90.0 | 30.0 | 30.0 | {DASH} |" in text
    assert "- OOD img / ID text: v2, flowers" in text
    with pytest.raises(ValueError, match="must each be 'id' or 'ood'"):
        quadrants({**raw, "domains": {"v2": {"image": "shifted", "text": "id"}}})


def test_plot_writes_valid_pngs(tmp_path):
    a = make_run(tmp_path / "a", recipe="SAProj")
    b = make_run(tmp_path / "b", matrix=R[:2], recipe="strategies.freeze.Full")
    paths = plot([a, b], str(tmp_path / "out"))
    names = sorted(os.path.basename(p) for p in paths)
    assert names == [
        "avg_seen.png", "heatmap_Full.png", "heatmap_SAProj.png", "heldout.png",
        "heldout_sets_Full.png", "heldout_sets_SAProj.png",
    ]  # fmt: skip
    for path in paths:
        assert os.path.getsize(path) > 0
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            assert img.format == "PNG" and img.size[0] > 100 and img.size[1] > 100


def test_tensorboard_helper_writes_image_summaries(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = make_run(tmp_path / "run", recipe="SAProj")
    figs = figures([run])
    log_figures_to_tensorboard(run, figs)
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(run))
    acc = EventAccumulator(run, size_guidance={"images": 0})
    acc.Reload()
    assert sorted(acc.Tags()["images"]) == sorted(f"report/{k}" for k in figs)
    image = acc.Images("report/heatmap_SAProj")[0]
    assert image.width > 100 and image.height > 100 and len(image.encoded_image_string) > 0


def test_main_writes_report_and_plots(tmp_path, capsys):
    a = make_run(tmp_path / "runs" / "version_0", recipe="SAProj")
    b = make_run(tmp_path / "runs" / "version_1", recipe="MLPGateUp")
    assert main([a, b]) == 0
    out_dir = tmp_path / "runs" / "report"  # default: the first run's parent / report
    printed = capsys.readouterr().out
    assert "| SAProj | +68.3 | +5.0 |" in printed
    assert str(out_dir / "report.md") in printed and str(out_dir / "heldout.png") in printed
    assert (out_dir / "report.md").read_text() == compare([a, b])
    assert main([a, "--names", "mine", "--out", str(tmp_path / "o"), "--no-plots"]) == 0
    assert os.listdir(tmp_path / "o") == ["report.md"]
    assert "| mine |" in (tmp_path / "o" / "report.md").read_text()


def test_main_without_results_exits_2_with_one_line(tmp_path, capsys):
    good = make_run(tmp_path / "good")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([good, str(empty)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(empty) in err and "fit" in err
    assert not (tmp_path / "report").exists()


def test_cli_dispatches_report(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-m", "mllm_cl", "report", str(empty)], cwd=root, capture_output=True, text=True
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(empty) in lines[0] and "results.json" in lines[0]


def test_heldout_set_curves_and_probe_correlation(tmp_path):
    """Per held-out set: base, lowest, final, max drop, recovered; and Pearson's r across rows between
    the live probe's number mass (probe.jsonl) and the mean held-out change, checked with `statistics`."""
    import statistics

    from mllm_cl.probe_report import probe_correlation

    # 3 tasks, held-out sets ai2d (column 3) and chart (column 4).
    matrix = [
        [0.2, 0.1, 0.3, 0.50, 0.80],
        [0.8, 0.2, 0.4, 0.30, 0.60],
        [0.85, 0.9, 0.5, 0.40, 0.70],
        [0.7, 0.7, 0.95, 0.45, 0.90],
    ]
    run = make_run(tmp_path / "run", matrix, heldout=["ai2d", "chart"], recipe="Full")
    mass = {"counting": [0.10, 0.60, 0.40, 0.20], "caption": [0.05, 0.05, 0.05, 0.30]}
    records = [{"label": "step", "sets": {"counting": {"number_mass": 0.99}}}]  # not a matrix row: ignored
    for i, label in enumerate(["base", "after_cub", "after_count", "after_pathvqa"]):
        sets = {name: {"number_mass": values[i], "n": 4.0} for name, values in mass.items()}
        records.append({"label": label, "sets": sets})
    (tmp_path / "run" / "probe.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    # Mean held-out change per row: 0, ((0.30-0.50) + (0.60-0.80)) / 2 = -0.20, -0.10, (-0.05 + 0.10) / 2
    change = [0.0, -0.20, -0.10, 0.025]
    corr = probe_correlation(
        StreamResults.from_dict(json.loads((tmp_path / "run" / "results.json").read_text())), records
    )
    assert corr["counting"][1] == 4 and corr["counting"][0] == pytest.approx(
        statistics.correlation(mass["counting"], change)
    )
    assert corr["caption"][0] == pytest.approx(statistics.correlation(mass["caption"], change))
    assert corr["counting"][0] < -0.5  # more number mass, more held-out loss
    text = compare([run])
    assert "### Full: held-out sets" in text
    # ai2d: base 50, lowest after training 30, final 45, max drop 20, recovered 15.
    assert "| ai2d | 50.0 | 30.0 | 45.0 | +20.0 | +15.0 |" in text
    # chart: base 80, lowest 60, final 90: dropped 20, recovered 30 (ends above its base).
    assert "| chart | 80.0 | 60.0 | 90.0 | +20.0 | +30.0 |" in text
    assert "### Full: counting-bias probe vs held-out change" in text
    assert "| cub | " + MINUS + "20.0 | 0.0500 | 0.6000 |" in text
    r = statistics.correlation(mass["counting"], change)
    assert "- counting: r = " + f"{r:+.2f}".replace("-", MINUS) + " over 4 rows" in text
    assert "counting-bias" not in compare([make_run(tmp_path / "no_probe", recipe="Full")])
