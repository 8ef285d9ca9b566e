"""gpu_check.md from gpu_check.json: tables of the measured figures, the targets, the profile."""

from __future__ import annotations

TARGETS = {"mfu": 0.40, "fit_over_plain": 0.95, "plan_error": 0.15, "eval_speedup": 10.0}
GIB = 2**30


def training_runs(summary: dict) -> list[dict]:
    """Every training figure dict (plain: one per step, fit: one per checkpointing setting)."""
    runs = []
    for step in summary["steps"]:
        figures = step.get("figures")
        if step["name"].startswith("eval") or not figures:
            continue
        for r in figures if isinstance(figures, list) else [figures]:
            runs.append({**r, "step": step["name"]})
    return runs


def _eval(summary: dict) -> dict | None:
    return next((s.get("figures") for s in summary["steps"] if s["name"].startswith("eval")), None)


def fit_over_plain(runs: list[dict]) -> list[dict]:
    """fit tokens/s over plain tokens/s, pairing runs of one family and checkpointing setting."""
    plain = {(r["family"], r["checkpointing"]): r for r in runs if r["path"] == "plain"}
    pairs = []
    for r in runs:
        other = plain.get((r["family"], r["checkpointing"]))
        if r["path"] == "fit" and other:
            pairs.append({"family": r["family"], "checkpointing": r["checkpointing"], "precision": r["precision"],
                          "fit": r["tokens_per_s"], "plain": other["tokens_per_s"],
                          "ratio": r["tokens_per_s"] / other["tokens_per_s"]})  # fmt: skip
    return pairs


def targets(summary: dict) -> dict:
    """Each target of issue 14: the value measured and met / missed / not run."""
    runs, dry = training_runs(summary), summary["mode"].startswith("dry-run")

    def verdict(ok, value):
        status = "not run" if value is None else ("met" if ok else "missed")
        return {"value": value, "status": "n/a (dry run)" if dry else status}

    mfus = [r["mfu"] for r in runs if r["path"] == "plain" and r["batch"] >= 4]
    mixed = [p["ratio"] for p in fit_over_plain(runs) if p["precision"] == "bf16-mixed"]
    errors = [abs(r["plan_over_measured"] - 1) for r in runs if r.get("plan_over_measured")]
    ev = _eval(summary)
    ev_ok = ev is not None and ev["speedup"] >= TARGETS["eval_speedup"] and ev["identical"] == ev["samples"]
    return {
        "mfu_plain_best": verdict(mfus and max(mfus) >= TARGETS["mfu"], max(mfus) if mfus else None),
        "fit_over_plain_worst": verdict(
            mixed and min(mixed) >= TARGETS["fit_over_plain"], min(mixed) if mixed else None
        ),
        "plan_error_worst": verdict(
            errors and max(errors) <= TARGETS["plan_error"], max(errors) if errors else None
        ),
        "eval_speedup": verdict(ev_ok, ev and ev["speedup"]),
    }


def _f(x, fmt="{:.2f}"):
    return "n/a" if x is None else fmt.format(x)


def render(summary: dict) -> str:
    probe, lines = summary["probe"], []
    gpu = probe.get("gpu", {})
    lines += [f"# GPU check: {summary['mode']}", ""]
    if gpu:
        lines.append(f"device: {gpu['name']} (sm {gpu['capability']}, {gpu['memory_gib']:.0f} GiB, {gpu['sms']} SMs); "
                     f"measured bf16 matmul {gpu['bf16_matmul_tflops']:.0f} TFLOP/s (8192^3, median of 10); "
                     f"nvidia-smi driver, SM clock, max: {gpu.get('nvidia_smi')}")  # fmt: skip
    else:
        lines.append(f"device: no CUDA GPU (torch {probe.get('packages', {}).get('torch')})")
    pk = probe.get("packages", {})
    lines.append("packages: " + ", ".join(f"{k} {v or 'MISSING'}" for k, v in pk.items())
                 + f"; python {probe.get('python')}; torch CUDA {probe.get('torch_cuda')}")  # fmt: skip
    if probe.get("import_error"):
        lines.append(
            f"**mllm_cl does not import: {probe['import_error']}** (carry wheels: benchmarks/gpu_wheels.sh)"
        )
    lines += [f"total {summary['seconds']:.0f} s (budget {summary['budget_s']:.0f} s)", ""]
    lines += ["## Checks", "", "| check | status | s | command |", "|---|---|---|---|"]
    for s in summary["steps"]:
        lines.append(f"| {s['name']} | {s['status']} | {_f(s.get('seconds'), '{:.0f}')} | `{s['command']}` |")
    lines += _pytest(summary) + _training(summary) + _memory(summary) + _evaluation(summary)
    lines += _targets(summary) + _profiles(summary) + _failures(summary)
    return "\n".join(lines) + "\n"


def _pytest(summary):
    step = next(s for s in summary["steps"] if s["name"] == "pytest_gpu")
    tests = step.get("tests") or []
    out = ["", "## pytest -m gpu", ""]
    if not tests:
        return out + [f"no test results ({step['status']})"]
    has_lwf = any("lwf" in t["test"].lower() for t in tests)
    out += ["| test | outcome | message |", "|---|---|---|"]
    out += [f"| {t['test']} | {t['outcome']} | {t.get('message', '')} |" for t in tests]
    return out + [
        "",
        f"LwF under bf16 with the FSDP1 precision context: {'covered' if has_lwf else 'NO gpu test found'}",
    ]


def _training(summary):
    runs = training_runs(summary)
    out = ["", "## Training throughput (SA Proj, 7B shapes, random weights, one GPU)", ""]
    if not runs:
        return out + ["not run"]
    out += ["| family | path | precision / weights | checkpointing | batch x seq | tokens/s | TFLOP/s | MFU | peak GiB |",
            "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in runs:
        peak = r.get("peak_memory_bytes")
        out.append(f"| {r['family']} | {r['path']} | {r['precision']} / {r.get('weights', 'bf16')} | "
                   f"{'on' if r['checkpointing'] else 'off'} | {r['batch']} x {r['seq']} | {r['tokens_per_s']:,.0f} | "
                   f"{r['tflops_per_s']:.0f} | {r['mfu']:.1%} | {_f(peak and peak / GIB, '{:.1f}')} |")  # fmt: skip
    pairs = fit_over_plain(runs)
    if pairs:
        out += ["", "fit over plain (tokens/s; plain = pure bf16 weights and AdamW state):", "",
                "| family | checkpointing | fit precision | fit | plain | fit / plain |", "|---|---|---|---|---|---|"]  # fmt: skip
        out += [f"| {p['family']} | {'on' if p['checkpointing'] else 'off'} | {p['precision']} | {p['fit']:,.0f} | "
                f"{p['plain']:,.0f} | {p['ratio']:.3f} |" for p in pairs]  # fmt: skip
    return out


def _memory(summary):
    runs = [r for r in training_runs(summary) if r["path"] == "fit"]
    out = ["", "## Peak memory of the fit step vs `plan`", ""]
    if not runs:
        return out + ["not run"]
    out += ["| family | precision / weights | checkpointing | measured peak GiB | plan GiB | plan / measured | "
            "allocated before the run GiB | plan command |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in runs:
        planned = (r["plan"].get("memory") or {}).get("gpu_total")
        peak = r.get("peak_memory_bytes")
        out.append(f"| {r['family']} | {r['precision']} / {r['weights']} | {'on' if r['checkpointing'] else 'off'} | "
                   f"{_f(peak and peak / GIB, '{:.1f}')} | {_f(planned and planned / GIB, '{:.1f}')} | "
                   f"{_f(r.get('plan_over_measured'), '{:.3f}')} | "
                   f"{_f(r.get('allocated_before_bytes') and r['allocated_before_bytes'] / GIB, '{:.2f}')} | "
                   f"`{r['plan']['command']}` |")  # fmt: skip
    return out + ["", "plan counts weights, gradients, AdamW state, activations and logits; not the CUDA context "
                  "or allocator fragmentation. For fp32 weights under bf16-mixed it is given --dtype float32, "
                  "which also counts the bf16 activations in fp32."]  # fmt: skip


def _evaluation(summary):
    ev = _eval(summary)
    out = ["", "## Batched vs batch-1 greedy evaluation", ""]
    if not ev:
        return out + ["not run"]
    return out + ["| model | device | samples | batch | batch-1 s | batched s | speed-up | identical answers |",
                  "|---|---|---|---|---|---|---|---|",
                  f"| {ev['model']} ({ev['dtype']}) | {ev['device']} | {ev['samples']} | {ev['batch_size']} | "
                  f"{ev['seconds_batch_1']:.2f} | {ev['seconds_batched']:.2f} | {ev['speedup']:.1f}x | "
                  f"{ev['identical']}/{ev['samples']} |"]  # fmt: skip


def _targets(summary):
    t = summary["targets"]
    rows = [("MFU of the plain loop, micro-batch >= 4", "mfu_plain_best", ">= 40%", "{:.1%}"),
            ("fit (bf16-mixed) / plain tokens/s, worst pair", "fit_over_plain_worst", ">= 0.95", "{:.3f}"),
            ("plan vs measured peak: worst relative error", "plan_error_worst", "<= 15%", "{:.1%}"),
            ("batched / batch-1 eval, identical answers", "eval_speedup", ">= 10x", "{:.1f}x")]  # fmt: skip
    out = ["", "## Targets (issue 14)", "", "| target | goal | measured | status |", "|---|---|---|---|"]
    return out + [
        f"| {name} | {goal} | {_f(t[k]['value'], fmt)} | {t[k]['status']} |" for name, k, goal, fmt in rows
    ]


def _profiles(summary):
    out = ["", "## What limits MFU: torch.profiler over the fit steps", ""]
    found = False
    for r in training_runs(summary):
        p = r.get("profile")
        if not p:
            continue
        found = True
        kinds = ", ".join(f"{k} {v:.3f} s" for k, v in p["seconds_by_kind"].items())
        out += [f"### {r['family']} fit, {r['precision']}, checkpointing {'on' if r['checkpointing'] else 'off'}", "",
                f"{'GPU kernels' if r['device'] != 'cpu' else 'CPU ops'} busy {p['busy_s']:.3f} s of "
                f"{p['wall_s']:.3f} s wall ({_f(p['busy_fraction'], '{:.0%}')}); "
                f"by kind: {kinds}", "", "```", p["table"], "```", ""]  # fmt: skip
    return out if found else out + ["no profile"]


def _failures(summary):
    bad = [s for s in summary["steps"] if s["status"] in ("failed", "timeout")]
    out = []
    for s in bad:
        out += ["", f"## {s['name']}: {s['status']} (end of its output)", "", "```", s.get("tail", ""), "```"]
    return out
