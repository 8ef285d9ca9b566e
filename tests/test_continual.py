"""Hand-computed continual-learning summaries for mllm_cl.continual."""

import math

import numpy as np
import pytest

from mllm_cl.continual import per_row_summary, summarize, validate_matrix

NAN = float("nan")

# 3 tasks (columns 0-2) and 1 held-out set (column 3).
#         task0  task1  task2  heldout
R = [
    [0.20, 0.10, 0.30, 0.50],  # before training
    [0.80, 0.20, 0.40, 0.45],  # after task 1
    [0.85, 0.90, 0.50, 0.40],  # after task 2
    [0.70, 0.70, 0.95, 0.55],  # after task 3
]


def test_summarize_full_matrix():
    s = summarize(R, num_tasks=3)
    # avg_accuracy = (0.70 + 0.70 + 0.95) / 3
    assert s["avg_accuracy"] == pytest.approx(2.35 / 3)
    # learning: 0.80-0.20 = 0.60, 0.90-0.10 = 0.80, 0.95-0.30 = 0.65 -> 2.05 / 3
    assert s["learning/0"] == pytest.approx(0.60)
    assert s["learning/1"] == pytest.approx(0.80)
    assert s["learning/2"] == pytest.approx(0.65)
    assert s["learning"] == pytest.approx(2.05 / 3)
    # forgetting: task0 max(0.20, 0.80, 0.85) - 0.70 = 0.15; task1 max(0.10, 0.20, 0.90) - 0.70 = 0.20
    assert s["forgetting/0"] == pytest.approx(0.15)
    assert s["forgetting/1"] == pytest.approx(0.20)
    assert "forgetting/2" not in s  # the last task cannot be forgotten yet
    assert s["forgetting"] == pytest.approx(0.175)
    # bwt: 0.70-0.80 = -0.10, 0.70-0.90 = -0.20
    assert s["bwt"] == pytest.approx(-0.15)
    # fwt: task1 0.20-0.10 = 0.10, task2 0.50-0.30 = 0.20
    assert s["fwt"] == pytest.approx(0.15)
    # held-out: 0.55 final, 0.55-0.50 = 0.05 change
    assert s["heldout_avg"] == pytest.approx(0.55)
    assert s["heldout_change"] == pytest.approx(0.05)
    assert s["heldout_change/3"] == pytest.approx(0.05)
    assert all(isinstance(v, float) for v in s.values())


def test_summarize_accepts_numpy():
    assert summarize(np.array(R), 3) == pytest.approx(summarize(R, 3))


def test_forgetting_follows_chaudhry_rows_after_the_task_was_learned():
    # Chaudhry et al. 2018: f_j = max over rows after task j was learned (l = j+1 .. T-1) - final.
    # Task 0 was best before any training (0.9), but that row does not count: 0.5 - 0.4, not 0.9 - 0.4.
    s = summarize([[0.9, 0.1], [0.5, 0.2], [0.4, 0.8]], num_tasks=2)
    assert s["forgetting"] == pytest.approx(0.1)
    assert s["bwt"] == pytest.approx(-0.1)
    # 3 tasks: task 1 is learned at row 2; rows 0 and 1 (0.95, 0.99 before learning it) do not count.
    s = summarize([[0.1, 0.95, 0.0], [0.8, 0.99, 0.0], [0.6, 0.5, 0.1], [0.6, 0.3, 0.9]], num_tasks=3)
    assert s["forgetting/0"] == pytest.approx(0.8 - 0.6)  # max(rows 1, 2) = 0.8
    assert s["forgetting/1"] == pytest.approx(0.5 - 0.3)  # max(row 2) = 0.5
    assert s["forgetting"] == pytest.approx(0.2)


def test_heldout_change_over_stages_max_drop_and_recovery():
    s = summarize(R, 3)  # held-out column 3: 0.50 -> 0.45 -> 0.40 -> 0.55
    # Δ_i = R[i, 3] - R[0, 3]: -0.05, -0.10, +0.05
    assert s["heldout_change"] == pytest.approx(0.05)  # final row
    assert s["heldout_change_avg"] == pytest.approx(-0.10 / 3)
    assert s["heldout_change_sum"] == pytest.approx(-0.10)
    assert s["heldout_max_drop/3"] == pytest.approx(0.50 - 0.40)
    assert s["heldout_recovery/3"] == pytest.approx(0.55 - 0.40)

    # Two held-out sets (columns 2, 3), one NaN cell at the end.
    m = [[0.5, 0.5, 0.60, 0.30], [0.9, 0.5, 0.30, 0.35], [0.7, 0.9, 0.45, NAN]]
    s = summarize(m, 2)
    # Δ_1 = mean(0.30-0.60, 0.35-0.30) = -0.125; Δ_2 = mean(0.45-0.60) = -0.15 (NaN skipped)
    assert s["heldout_change_avg"] == pytest.approx((-0.125 - 0.15) / 2)
    assert s["heldout_change_sum"] == pytest.approx(-0.275)
    assert s["heldout_change"] == pytest.approx(-0.15)
    assert s["heldout_max_drop/2"] == pytest.approx(0.30)  # 0.60 - min(0.30, 0.45)
    assert s["heldout_max_drop/3"] == pytest.approx(-0.05)  # never below the base: 0.30 - 0.35
    assert s["heldout_recovery/2"] == pytest.approx(0.15)  # 0.45 - 0.30
    assert math.isnan(s["heldout_recovery/3"])
    assert s["heldout_max_drop"] == pytest.approx(0.125) and s["heldout_recovery"] == pytest.approx(0.15)
    assert s["forgetting"] == pytest.approx(0.9 - 0.7)


def test_summarize_skips_nan():
    nan_matrix = [row[:] for row in R]
    nan_matrix[3][1] = NAN  # task1 not evaluated at the end
    s = summarize(nan_matrix, 3)
    assert s["avg_accuracy"] == pytest.approx((0.70 + 0.95) / 2)
    assert math.isnan(s["forgetting/1"])
    assert s["forgetting"] == pytest.approx(0.15)  # task0 only
    assert s["bwt"] == pytest.approx(-0.10)
    assert s["learning"] == pytest.approx(2.05 / 3)  # untouched by the NaN


def test_summarize_all_nan_and_no_heldout():
    s = summarize([[0.1, NAN], [0.6, NAN]], num_tasks=1)
    assert s["learning"] == pytest.approx(0.5)
    assert math.isnan(s["heldout_avg"]) and math.isnan(s["heldout_change"])
    s = summarize([[0.1, 0.2], [0.6, 0.3]], num_tasks=2)
    assert math.isnan(s["heldout_change"]) and math.isnan(s["heldout_avg"])
    assert not any(k.startswith("heldout_change/") for k in s)


def test_single_task_has_no_forgetting_bwt_fwt():
    s = summarize([[0.3, 0.6], [0.9, 0.5]], num_tasks=1)
    assert s["avg_accuracy"] == pytest.approx(0.9)
    assert s["learning"] == pytest.approx(0.6)
    assert s["heldout_change"] == pytest.approx(-0.1)
    assert math.isnan(s["forgetting"]) and math.isnan(s["bwt"]) and math.isnan(s["fwt"])


def test_summarize_partial_matrix():
    # Only tasks 1 and 2 trained so far: rows 0-2.
    s = summarize(R[:3], num_tasks=3)
    assert s["avg_accuracy"] == pytest.approx((0.85 + 0.90) / 2)
    assert s["learning"] == pytest.approx((0.60 + 0.80) / 2)
    assert "learning/2" not in s
    # forgetting task0: max(0.20, 0.80) - 0.85 = -0.05; bwt task0: 0.85 - 0.80
    assert s["forgetting"] == pytest.approx(-0.05)
    assert s["bwt"] == pytest.approx(0.05)
    assert s["fwt"] == pytest.approx(0.20 - 0.10)
    assert s["heldout_avg"] == pytest.approx(0.40)
    assert s["heldout_change"] == pytest.approx(-0.10)


def test_summarize_baseline_only():
    s = summarize(R[:1], num_tasks=3)
    assert math.isnan(s["avg_accuracy"]) and math.isnan(s["learning"])
    assert math.isnan(s["heldout_change_avg"]) and math.isnan(s["heldout_recovery"])
    assert s["heldout_avg"] == pytest.approx(0.50)


def test_per_row_summary():
    rows = per_row_summary(R, 3)
    assert [r["row"] for r in rows] == [0, 1, 2, 3]
    assert math.isnan(rows[0]["avg_seen"])
    assert [r["avg_seen"] for r in rows[1:]] == pytest.approx([0.80, (0.85 + 0.90) / 2, 2.35 / 3])
    assert [r["heldout_avg"] for r in rows] == pytest.approx([0.50, 0.45, 0.40, 0.55])
    assert [r["heldout_change"] for r in rows] == pytest.approx([0.0, -0.05, -0.10, 0.05])


def test_per_row_summary_nan_and_partial():
    # 2 tasks, held-out columns 2 and 3, only the row after task 1 so far.
    rows = per_row_summary([[0.2, 0.1, NAN, 0.5], [NAN, 0.3, 0.4, 0.6]], num_tasks=2)
    assert len(rows) == 2
    assert math.isnan(rows[1]["avg_seen"])  # its only seen task was not evaluated
    assert rows[1]["heldout_avg"] == pytest.approx((0.4 + 0.6) / 2)
    # Column 2 has no baseline, so only column 3 counts: 0.6 - 0.5 (a difference of means would be 0).
    assert rows[1]["heldout_change"] == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("matrix", "num_tasks", "message"),
    [
        ([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]], 1, "rows"),
        ([[0.1, 0.2], [0.3]], 2, "different lengths"),
        ([[0.1, 1.2]], 1, "outside"),
        ([[-0.1, 0.2]], 1, "outside"),
        ([[0.1, float("inf")]], 1, "outside"),
        ([[0.1], [0.2]], 2, "columns"),
        ([], 1, "no rows"),
        ([[0.1]], 0, "num_tasks"),
        ([["x"]], 1, "numbers"),
    ],
)
def test_validate_matrix_errors(matrix, num_tasks, message):
    with pytest.raises(ValueError, match=message):
        validate_matrix(matrix, num_tasks)
    with pytest.raises(ValueError):
        summarize(matrix, num_tasks)


def test_validate_matrix_accepts_nan_and_fewer_rows():
    validate_matrix([[NAN, 0.0, 1.0]], 2)
    validate_matrix(np.array(R[:2]), 3)
    validate_matrix(R, 3)
