"""The report's plots (mllm_cl/report_plots.py) and chance levels (mllm_cl/chance.py), checked on real
matplotlib figures and the files `report --format` writes; every expected value is worked by hand."""

import json
import os
import xml.etree.ElementTree as ET

import pytest
from matplotlib.colors import to_rgba
from PIL import Image

from mllm_cl.chance import level, levels, option_count
from mllm_cl.report import CHANCE_NOTE, NO_CHANCE_NOTE, compare, figures, main
from mllm_cl.report_plots import BASELINE_GID, DIAGONAL_GID, GREY, UNTRAINED_GID
from mllm_cl.results import StreamResults

TASKS = ["cub", "count", "pathvqa"]
HELDOUT = ["ai2d", "chart"]
LABELS = ["base", "cub", "count", "pathvqa"]
# Task columns as tests/test_continual.py (by hand: learning 68.3, avg acc 78.3, forgetting 17.5,
# BWT -15.0, FWT 15.0 pp). Held-out: Δ = ((0.45-0.50) + (0.90-0.80)) / 2 = +2.5; max drop per set
# 0.50-0.30 and 0.80-0.60, mean 20.0; recovered 0.45-0.30 and 0.90-0.60, mean 22.5.
R = [
    [0.20, 0.10, 0.30, 0.50, 0.80],
    [0.80, 0.20, 0.40, 0.30, 0.60],
    [0.85, 0.90, 0.50, 0.40, 0.70],
    [0.70, 0.70, 0.95, 0.45, 0.90],
]
# ai2d: options listed four ways: 4 letter lines, 2 letter lines, MMStar's "Options: A: .., B: ..,
# C: .." (3) and a label set of 5: chance = (1/4 + 1/2 + 1/3 + 1/5) / 4.
AI2D_PROMPTS = [
    "Which part is the leaf?\nA. a\nB. b\nC. c\nD. d\nAnswer with the option's letter from the given choices directly.",
    "Is it day?\nA. yes\nB. no\nAnswer with the option's letter from the given choices directly.",
    "What animal is shown?\nOptions: A: cat, B: dog, C: fish",
    "Which shape is this? Choose one of: square, circle, triangle, star, heart.",
]
AI2D_CHANCE = (1 / 4 + 1 / 2 + 1 / 3 + 1 / 5) / 4
# chart: open answers. Normalised references: yes, yes, no, 12, {12, yes}: "yes" is in 3 of 5 samples.
CHART_REFS = [["yes"], [" Yes "], ["no"], ["12"], ["12", "YES"]]
CHART_MAJORITY = 3 / 5


def make_run(folder, predictions=True):
    os.makedirs(folder, exist_ok=True)
    res = StreamResults(list(TASKS), list(HELDOUT))
    for label, row in zip(LABELS, R, strict=True):
        res.add_row(label, dict(zip(res.columns, row, strict=True)))
    res.write(str(folder))
    if predictions:  # ai2d in row 0 only, chart in row 1 only: the first row holding a set is read
        write_set(
            folder / "predictions" / "0_base",
            "ai2d",
            [{"prompt": p, "references": ["A"]} for p in AI2D_PROMPTS],
        )
        write_set(
            folder / "predictions" / "1_cub",
            "chart",
            [{"prompt": "How many?", "references": r} for r in CHART_REFS],
        )
    return str(folder)


def write_set(folder, name, samples):
    os.makedirs(folder, exist_ok=True)
    lines = [
        json.dumps({"id": f"{name}-{i}", "prediction": "x", "score": 0.0, **s}) + "\n"
        for i, s in enumerate(samples)
    ]
    (folder / f"{name}.jsonl").write_text("".join(lines))


def test_option_count_by_hand():
    assert [option_count(p) for p in AI2D_PROMPTS] == [4, 2, 3, 5]
    assert option_count("(A) red (B) blue (C) green") == 3
    assert option_count("What colour is the triangle?") == 0
    assert option_count("Plan A. Then go.") == 0  # one letter is no option list
    assert option_count("Pick:\nB. x\nC. y") == 0  # options start at A


def test_levels_chance_and_majority(tmp_path):
    found = levels(make_run(tmp_path / "run"))
    assert set(found) == {"ai2d", "chart"}
    assert found["ai2d"].kind == "chance" and found["ai2d"].value == pytest.approx(AI2D_CHANCE)
    assert found["chart"].kind == "majority" and found["chart"].value == pytest.approx(CHART_MAJORITY)
    assert found["chart"].detail == "'yes'"
    tie = level([{"prompt": "?", "references": [a]} for a in ("b", "a", "b", "a")])
    assert tie.value == pytest.approx(0.5) and tie.detail == "'a'"  # ties: alphabetical
    # Options in only some prompts: not a multiple-choice set, so the majority rate (A in 2 of 3).
    mixed = level(
        [{"prompt": AI2D_PROMPTS[0], "references": ["A"]}] * 2 + [{"prompt": "?", "references": ["B"]}]
    )
    assert mixed.kind == "majority" and mixed.value == pytest.approx(2 / 3)
    assert levels(make_run(tmp_path / "bare", predictions=False)) == {}


def line_axes(fig):
    return fig.axes[0]


def baselines(ax):
    return [line for line in ax.get_lines() if str(line.get_gid()).startswith(BASELINE_GID)]


def test_every_accuracy_axis_is_0_to_100_percent(tmp_path):
    figs = figures([make_run(tmp_path / "run")], names=["mine"])
    assert sorted(figs) == ["avg_seen", "heatmap_mine", "heldout", "heldout_sets_mine"]
    for stem in ("avg_seen", "heldout", "heldout_sets_mine"):
        ax = line_axes(figs[stem])
        assert ax.get_ylim() == (0.0, 100.0) and "(%)" in ax.get_ylabel()
    heat = figs["heatmap_mine"].axes[0]
    assert heat.images[0].get_clim() == (0.0, 100.0)
    assert figs["heatmap_mine"].axes[1].get_ylabel() == "accuracy (%)"  # the colour bar
    texts = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in heat.texts}
    assert texts[(1, 0)] == "80.0" and texts[(3, 2)] == "95.0" and texts[(0, 4)] == "80.0"
    # The per-set curves are the matrix's held-out columns, in %.
    ax = line_axes(figs["heldout_sets_mine"])
    curves = {
        line.get_label(): list(line.get_ydata())
        for line in ax.get_lines()
        if not str(line.get_gid()).startswith(BASELINE_GID)
    }
    assert curves == {"ai2d": pytest.approx([50, 30, 40, 45]), "chart": pytest.approx([80, 60, 70, 90])}


def test_chance_lines_at_hand_computed_levels(tmp_path):
    figs = figures([make_run(tmp_path / "run")], names=["mine"])
    ax = line_axes(figs["heldout_sets_mine"])
    lines = {line.get_label().split(":")[0]: line for line in baselines(ax)}
    assert set(lines) == {"ai2d", "chart"}
    assert list(lines["ai2d"].get_ydata()) == pytest.approx([AI2D_CHANCE * 100] * 2)
    assert list(lines["chart"].get_ydata()) == pytest.approx([CHART_MAJORITY * 100] * 2)
    assert "chance" in lines["ai2d"].get_label() and "majority" in lines["chart"].get_label()
    curve = {line.get_label(): line for line in ax.get_lines()}
    assert lines["ai2d"].get_linestyle() == "--"
    assert to_rgba(lines["chart"].get_color()) == to_rgba(
        curve["chart"].get_color()
    )  # same colour as its set
    (mean,) = baselines(line_axes(figs["heldout"]))  # one run: one grey line at the mean of the two
    assert list(mean.get_ydata()) == pytest.approx([(AI2D_CHANCE + CHART_MAJORITY) / 2 * 100] * 2)
    assert to_rgba(mean.get_color()) == to_rgba(GREY)
    assert baselines(line_axes(figs["avg_seen"])) == []


def test_no_predictions_no_line_and_the_report_says_so(tmp_path):
    bare = make_run(tmp_path / "bare", predictions=False)
    figs = figures([bare])
    assert all(baselines(line_axes(figs[s])) == [] for s in ("heldout", "heldout_sets_bare"))
    text = compare([bare])
    assert NO_CHANCE_NOTE in text and CHANCE_NOTE not in text
    with_preds = compare([make_run(tmp_path / "run")])
    assert CHANCE_NOTE in with_preds
    # ai2d: base 50, lowest 30, final 45, max drop 20, recovered 15; chance 32.1.
    assert (
        "| ai2d | 50.0 | 30.0 | 45.0 | +20.0 | +15.0 | 32.1 (chance, mean of 1/k over 2..5 options) |"
        in with_preds
    )
    assert "| chart | 80.0 | 60.0 | 90.0 | +20.0 | +30.0 | 60.0 (majority, 'yes') |" in with_preds


def test_two_runs_with_different_levels_get_one_line_each(tmp_path):
    a = make_run(tmp_path / "a")
    b = make_run(tmp_path / "b", predictions=False)
    write_set(
        tmp_path / "b" / "predictions" / "0_base", "ai2d", [{"prompt": AI2D_PROMPTS[1], "references": ["A"]}]
    )
    write_set(tmp_path / "b" / "predictions" / "0_base", "chart", [{"prompt": "?", "references": ["no"]}])
    lines = baselines(line_axes(figures([a, b], names=["a", "b"])["heldout"]))
    # a: (0.3208 + 0.6) / 2; b: (1/2 + 1/1) / 2, each in its run's colour (C0, C1).
    assert [line.get_ydata()[0] for line in lines] == pytest.approx(
        [(AI2D_CHANCE + CHART_MAJORITY) / 2 * 100, (0.5 + 1.0) / 2 * 100]
    )
    assert [to_rgba(line.get_color()) for line in lines] == [to_rgba("C0"), to_rgba("C1")]


def patches(ax, gid):
    return {tuple(map(int, p.get_gid().split("-")[1:])): p for p in ax.patches if p.get_gid().startswith(gid)}


def test_heatmap_diagonal_outlined_and_untrained_cells_hatched(tmp_path):
    ax = figures([make_run(tmp_path / "run")], names=["mine"])["heatmap_mine"].axes[0]
    # Task j (0-based) is trained in row j + 1: untrained = column j in rows 0..j; held-out never.
    untrained = patches(ax, UNTRAINED_GID)
    assert set(untrained) == {(0, 0), (0, 1), (1, 1), (0, 2), (1, 2), (2, 2)}
    for (r, j), p in untrained.items():
        assert p.get_hatch() == "///" and p.get_xy() == (j - 0.5, r - 0.5) and not p.get_fill()
    diagonal = patches(ax, DIAGONAL_GID)
    assert set(diagonal) == {(1, 0), (2, 1), (3, 2)}
    for (r, j), p in diagonal.items():
        x, y = p.get_xy()
        assert (x + p.get_width() / 2, y + p.get_height() / 2) == pytest.approx((j, r))
        assert to_rgba(p.get_edgecolor()) == to_rgba("red") and p.get_hatch() is None
    # A matrix in progress (after task 1 only): the diagonal has one cell, untrained cells stop at row 1.
    res = StreamResults(TASKS, HELDOUT, [r[:] for r in R[:2]], LABELS[:2])
    from mllm_cl.report_plots import heatmap_figure

    partial = heatmap_figure(res, "p").axes[0]
    assert set(patches(partial, DIAGONAL_GID)) == {(1, 0)}
    assert set(patches(partial, UNTRAINED_GID)) == {(0, 0), (0, 1), (1, 1), (0, 2), (1, 2)}


def test_summary_in_the_figures(tmp_path):
    figs = figures([make_run(tmp_path / "run")], names=["mine"])
    title = figs["heatmap_mine"].axes[0].get_title()
    assert "avg acc 78.3 · Δ learning +68.3 · Δ held-out +2.5" in title
    assert "forgetting +17.5 · BWT \u221215.0 · FWT +15.0" in title
    assert (
        "Δ held-out +2.5 · max drop +20.0 · recovered +22.5"
        in line_axes(figs["heldout_sets_mine"]).get_title()
    )
    legend = [t.get_text() for t in line_axes(figs["heldout"]).get_legend().get_texts()]
    assert legend[0] == "mine: Δ held-out +2.5"
    legend = [t.get_text() for t in line_axes(figs["avg_seen"]).get_legend().get_texts()]
    assert legend == ["mine: avg acc 78.3, forgetting +17.5"]


def test_format_pdf_and_svg_files(tmp_path, capsys):
    run = make_run(tmp_path / "runs" / "run")
    stems = ["avg_seen", "heatmap_run", "heldout", "heldout_sets_run"]
    assert main([run, "--names", "run", "--format", "pdf", "--out", str(tmp_path / "pdf")]) == 0
    assert sorted(os.listdir(tmp_path / "pdf")) == sorted([f"{s}.pdf" for s in stems] + ["report.md"])
    for s in stems:
        assert (tmp_path / "pdf" / f"{s}.pdf").read_bytes().startswith(b"%PDF")
    assert main([run, "--names", "run", "--format", "svg", "--out", str(tmp_path / "svg")]) == 0
    root = ET.parse(tmp_path / "svg" / "heatmap_run.svg").getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    ids = {el.get("id") for el in root.iter() if el.get("id")}
    assert {i for i in ids if i.startswith(DIAGONAL_GID)} == {"diagonal-1-0", "diagonal-2-1", "diagonal-3-2"}
    assert len({i for i in ids if i.startswith(UNTRAINED_GID)}) == 6
    assert any(el.tag.endswith("pattern") for el in root.iter())  # the hatch
    svg = (tmp_path / "svg" / "heldout_sets_run.svg").read_text()
    assert svg.count(f'id="{BASELINE_GID}') == 2
    assert main([run, "--out", str(tmp_path / "png")]) == 0  # default: png
    with Image.open(tmp_path / "png" / "heatmap_run.png") as img:
        assert img.format == "PNG"
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main([run, "--format", "jpg"])
    assert "invalid choice: 'jpg'" in capsys.readouterr().err
