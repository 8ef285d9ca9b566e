"""benchmarks/gpu_check.sh (issue 14): the plan, the dry run on CPU, and the figures' arithmetic.

The GPU run itself needs a lent GPU; here we check that every planned command exists and runs at
CPU size, that the FLOP count is the docstring's formula, that 7B-shaped samples have the token
layout the configs imply, and that the targets are judged as the issue states them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check_report  # noqa: E402
import gpu_throughput as gt  # noqa: E402

# What issue 14 asks the script to run, as pieces of the planned commands.
REQUIRED = {
    "pytest -m gpu": ["-m pytest -m gpu"],
    "LLaVA plain loop": ["gpu_throughput.py", "--family llava"],
    "LLaVA fit, checkpointing off and on, profiled": ["gpu_fit_throughput.py", "llava_saproj.yaml", "--checkpointing both", "--profile"],
    "7B batched eval": ["eval_throughput.py", "--model llava7b", "--samples 64", "--batch-size 32"],
    "Qwen2.5-VL plain loop": ["gpu_throughput.py", "--family qwen2_5_vl"],
    "Qwen2.5-VL fit": ["gpu_fit_throughput.py", "qwen25vl_saproj.yaml"],
    "LLaVA-OneVision": ["llava_onevision"],
}  # fmt: skip


def gpu_check(*args, env=None, timeout=60) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def planned_commands(stdout: str) -> list[str]:
    return [line.split("$ ", 1)[1] for line in stdout.splitlines() if line.strip().startswith("$ ")]


def test_list_plans_every_check_within_the_budget():
    out = gpu_check("--list")
    assert out.returncode == 0, out.stderr
    commands = planned_commands(out.stdout)
    for what, pieces in REQUIRED.items():
        assert any(all(p in c for p in pieces) for c in commands), f"no planned command for {what}"
    budget, total = map(int, re.search(r"budget (\d+) s; estimates add up to (\d+) s", out.stdout).groups())
    assert budget == 480 and total <= budget  # issue 14: at most 8 minutes on one GPU
    for command in commands:  # every script and config a command names is in the repository
        for path in re.findall(r"\S+\.(?:py|yaml)\b", command):
            assert (ROOT / path).exists() or "onevision" in path, f"{command}: {path} missing"


def test_step_flops_is_the_documented_formula():
    # Hand-computed: N_vision 10 (5 tokens), N_proj 2 (3 image tokens), N_llm 100 (7 tokens), 30 trainable.
    counts = {
        "vision": {"total": 10, "trainable": 0},
        "projector": {"total": 2, "trainable": 0},
        "llm": {"total": 100, "trainable": 30},
    }
    f = gt.step_flops(counts, tokens=7, image_tokens=3, vision_tokens=5)
    assert (f["forward"], f["backward_act"], f["backward_weights"]) == (1512, 1400, 420)
    assert f["total"] == 3332
    counts["vision"]["trainable"] = 4  # a trainable tower also needs the input gradients below the LLM
    f = gt.step_flops(counts, tokens=7, image_tokens=3, vision_tokens=5)
    assert (f["backward_act"], f["backward_weights"]) == (1400 + 12 + 100, 420 + 40)


@pytest.mark.parametrize(
    "family, image_tokens, vision_tokens",
    [
        ("llava", (336 // 14) ** 2, (336 // 14) ** 2 + 1),  # CLIP ViT-L/14 at 336 px, plus its CLS token
        ("qwen2_5_vl", (672 // 28) ** 2, (672 // 14) ** 2),  # 14 px patches, merged 2x2
    ],
)
def test_7b_shaped_samples_and_smoke_model(family, image_tokens, vision_tokens):
    fam, config, processor, size = gt.shape_setup(family, smoke=True)
    encoder = gt.Encoder(fam, processor, max_length=10**9)
    samples = gt.fixed_samples(encoder, 2, text=40, image_size=size)
    batch = gt.to_device(encoder.collate([encoder.encode_train(s) for s in samples]), "cpu", torch.float32)
    image_id = fam.image_token_id(processor)
    assert batch["input_ids"].shape == (2, image_tokens + 40)
    assert [int((row == image_id).sum()) for row in batch["input_ids"]] == [image_tokens] * 2

    model = gt.build(fam, config, "cpu", dtype=torch.float32)  # NaN-poisoned, then every tensor initialised
    assert all(torch.isfinite(p).all() for p in model.parameters())
    gt.apply_recipe(fam, model, "SAProj")
    seen = gt.VisionTokens(fam, model)
    loss = model(**batch).loss
    assert torch.isfinite(loss) and seen.tokens == 2 * vision_tokens


def test_targets_are_judged_as_issue_14_states_them():
    run = {"family": "llava", "checkpointing": False, "batch": 8}
    summary = {
        "mode": "gpu",
        "steps": [
            {"name": "llava_plain", "figures": {**run, "path": "plain", "mfu": 0.45, "tokens_per_s": 1000.0}},
            {"name": "llava_fit", "figures": [{**run, "path": "fit", "precision": "bf16-mixed", "mfu": 0.4,
                                               "tokens_per_s": 900.0, "plan_over_measured": 1.1}]},
            {"name": "eval_llava7b", "figures": {"speedup": 12.0, "identical": 63, "samples": 64}},
        ],
    }  # fmt: skip
    t = gpu_check_report.targets(summary)
    assert t["mfu_plain_best"] == {"value": 0.45, "status": "met"}
    assert t["fit_over_plain_worst"]["status"] == "missed" and t["fit_over_plain_worst"]["value"] == 0.9
    assert t["plan_error_worst"]["status"] == "met"  # 10 % off
    assert t["eval_speedup"]["status"] == "missed"  # fast, but one answer differs


@pytest.mark.slow
def test_dry_run_parses_every_config_and_smoke_runs_every_check(tmp_path):
    out = gpu_check("--dry-run", env={"OUT_DIR": str(tmp_path)}, timeout=1500)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert set(summary["probe"]["help"].values()) == {"ok"}  # every script's --help
    steps = {s["name"]: s for s in summary["steps"]}
    try:
        gt.get_family("llava_onevision")
        onevision = True
    except ValueError:
        onevision = False
    for name, step in steps.items():
        expected = "ok" if onevision or not name.startswith("onevision") else "skipped: family"
        assert step["status"].startswith(expected), (name, step["status"], step.get("tail"))
    md = (tmp_path / "gpu_check.md").read_text()
    assert all(f"| {name} |" in md for name in steps)
    assert any("test_fsdp1_bf16_on_gpu" in t["test"] for t in steps["pytest_gpu"]["tests"])
    fit = steps["llava_fit"]["figures"]
    assert [r["checkpointing"] for r in fit] == [False, True] and "profile" in fit[0]
    assert all(r["model_freed"] for r in fit)  # the second run's peak memory is its own
    assert fit[0]["plan"]["rc"] == 0 and "--no-gradient-checkpointing" in fit[0]["plan"]["command"]
    assert all(r["plan"]["memory"]["gpu_total"] > 0 for r in fit)  # the figure gpu_check.md sets beside the peak
    assert sorted(os.listdir(tmp_path)) == ["gpu_check.json", "gpu_check.log", "gpu_check.md"]
