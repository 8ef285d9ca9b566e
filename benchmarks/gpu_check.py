"""The GPU checks as one run: steps, time budget, and the JSON + markdown summary (see gpu_check.sh).

Each check is a subprocess running one of the repository's own commands (printed as run), in priority
order under a time budget: a step whose estimate no longer fits is skipped and said so, a step past
its timeout is killed with its process group. Per-step figures come back as JSON files in a scratch
folder; the summary folder gets three files only (the device tool returns at most eight):
gpu_check.json (every step: command, status, seconds, figures), gpu_check.md (tables, targets,
profile) and gpu_check.log (every step's output).

    python benchmarks/gpu_check.py --list        # the planned checks and budget (no torch import)
    python benchmarks/gpu_check.py --dry-run     # CPU: --help, config parsing, smoke runs, summary
    python benchmarks/gpu_check.py               # on the GPU
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUDGET_S = 480  # 8 minutes on one H100/H200 for everything after the install
FAMILIES = ("llava", "qwen2_5_vl", "llava_onevision")
SMOKE = {  # appended to a step's argv for --dry-run: the same command at CPU size
    "gpu_throughput.py": "--device cpu --smoke --steps 1 --warmup 1 --batch 2".split(),
    "gpu_fit_throughput.py": "--device cpu --smoke --steps 1 --warmup 1 --batch 2 --workers 0".split(),
    "eval_throughput.py": "--model tiny --device cpu --samples 4 --batch-size 2 --max-new-tokens 2".split(),
}


@dataclass
class Step:
    """One check: `argv` after the Python executable; `family` must exist for it to run."""

    name: str
    title: str
    argv: list[str]
    estimate_s: int
    timeout_s: int
    family: str | None = None
    result: dict = field(default_factory=dict)

    @property
    def script(self) -> str | None:
        return next((Path(a).name for a in self.argv if a.endswith(".py")), None)

    def command(self) -> str:
        return "python " + " ".join(self.argv)


def plan_steps() -> list[Step]:
    """Every check, most important first (the budget cuts from the end)."""
    b, cfg = "benchmarks/", "configs/"
    plain = [b + "gpu_throughput.py", "--batch", "8", "--steps", "6", "--warmup", "2"]
    fit = [b + "gpu_fit_throughput.py", "--batch", "8", "--steps", "6", "--warmup", "2"]
    onevision_config = cfg + "onevision_saproj.yaml"
    ov_fit = (["--recipe-config", onevision_config] if (ROOT / onevision_config).exists()
              else ["--recipe-config", cfg + "llava_saproj.yaml", "--family", "llava_onevision"])  # fmt: skip
    return [
        Step("pytest_gpu", "pytest -m gpu (FSDP1 + bf16; LwF under FSDP1 precision)",
             ["-m", "pytest", "-m", "gpu", "tests", "-q", "-p", "no:cacheprovider"], 60, 150),
        Step("llava_plain", "LLaVA-1.5-7B SA Proj, plain loop, pure bf16", [*plain, "--family", "llava"], 30, 90),
        Step("llava_fit", "LLaVA-1.5-7B SA Proj, fit (recipe: bf16-mixed, fp32 weights), checkpointing off/on, profile",
             [*fit, "--recipe-config", cfg + "llava_saproj.yaml", "--checkpointing", "both", "--profile", "2"], 75, 150),
        Step("eval_llava7b", "LLaVA-1.5-7B greedy eval: 64 mixed-length prompts, batch 1 vs 32",
             [b + "eval_throughput.py", "--model", "llava7b", "--device", "cuda", "--samples", "64",
              "--batch-size", "32", "--max-new-tokens", "8"], 50, 120),
        Step("llava_plain_ckpt", "LLaVA-1.5-7B SA Proj, plain loop, pure bf16, checkpointing",
             [*plain, "--family", "llava", "--checkpointing"], 30, 90),
        Step("qwen_plain", "Qwen2.5-VL-7B SA Proj, plain loop, pure bf16", [*plain, "--family", "qwen2_5_vl"], 35, 90),
        Step("qwen_fit", "Qwen2.5-VL-7B SA Proj, fit (recipe), checkpointing off",
             [*fit, "--recipe-config", cfg + "qwen25vl_saproj.yaml", "--checkpointing", "off"], 45, 120),
        Step("llava_fit_bf16", "LLaVA-1.5-7B SA Proj, fit in bf16-true (like the plain loop; plan's bf16 model)",
             [*fit, "--recipe-config", cfg + "llava_saproj.yaml", "--checkpointing", "on",
              "--precision", "bf16-true", "--dtype", "bfloat16"], 40, 120),
        Step("onevision_plain", "LLaVA-OneVision-7B SA Proj, plain loop, pure bf16",
             [*plain, "--family", "llava_onevision"], 35, 90, family="llava_onevision"),
        Step("onevision_fit", "LLaVA-OneVision-7B SA Proj, fit (recipe), checkpointing off",
             [*fit, *ov_fit, "--checkpointing", "off"], 45, 120, family="llava_onevision"),
    ]  # fmt: skip


def smoke_argv(step: Step) -> list[str]:
    if step.name == "pytest_gpu":
        return [*step.argv, "--collect-only"]
    argv = [a if a != "cuda" else "cpu" for a in step.argv] + SMOKE[step.script]
    return argv + (["--profile", "1"] if "--profile" in step.argv else [])


# ---- running ----------------------------------------------------------------------------------
def run(argv: list[str], log, timeout: float, env: dict) -> tuple[str, int | None, str]:
    """(status, return code, output) of one subprocess in its own process group."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=timeout)
        status = "ok" if proc.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # dataloader workers too
        out, _ = proc.communicate()
        status = "timeout"
    log.write(f"\n===== {' '.join(argv)}  [{status}, {time.perf_counter() - start:.0f} s]\n{out}")
    log.flush()
    return status, proc.returncode, out


def probe() -> dict:
    """Versions, the GPU and its measured bf16 matmul rate, which families exist (run as --probe)."""
    import importlib.metadata as md

    sys.path.insert(0, str(ROOT))  # this checkout's mllm_cl, not an installed copy
    info: dict = {"python": sys.version.split()[0], "executable": sys.executable, "packages": {}}
    for name in "torch lightning transformers jsonargparse datasets peft torchmetrics pytest".split():
        try:
            info["packages"][name] = md.version(name)
        except md.PackageNotFoundError:
            info["packages"][name] = None
    try:
        import mllm_cl.cli  # noqa: F401  (jsonargparse, lightning, transformers, datasets all load)
        from mllm_cl.families import get_family

        info["families"] = {}
        for name in FAMILIES:
            try:
                get_family(name)
                info["families"][name] = True
            except Exception:  # noqa: BLE001  (a family not there yet: its steps are skipped)
                info["families"][name] = False
    except Exception as err:  # noqa: BLE001
        info["import_error"] = f"{type(err).__name__}: {err}"
    import torch

    info["torch_cuda"], info["cuda"] = torch.version.cuda, torch.cuda.is_available()
    if info["cuda"]:
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                       "memory_gib": props.total_memory / 2**30, "sms": props.multi_processor_count}  # fmt: skip
        info["gpu"]["bf16_matmul_tflops"] = _matmul_rate(torch)
        try:
            smi = [
                "nvidia-smi",
                "--query-gpu=driver_version,clocks.sm,clocks.max.sm",
                "--format=csv,noheader",
            ]
            info["gpu"]["nvidia_smi"] = subprocess.run(
                smi, capture_output=True, text=True, timeout=20
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError) as err:
            info["gpu"]["nvidia_smi"] = str(err)
    return info


def _matmul_rate(torch, n: int = 8192, reps: int = 10) -> float:
    """Measured bf16 dense ceiling: median of `reps` random n^3 products after warm-up (CUDA events)."""
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n**3 / sorted(times)[reps // 2] / 1e12


def execute(args, steps: list[Step], out_dir: Path) -> dict:
    py, work = sys.executable, Path(tempfile.mkdtemp(prefix="gpu_check_"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "MLLM_CL_CACHE": str(work / "cache")}  # fmt: skip
    t0 = time.perf_counter()
    try:
        return _execute(args, steps, out_dir, py, work, env, t0)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _execute(args, steps, out_dir, py, work, env, t0) -> dict:
    with open(out_dir / "gpu_check.log", "w") as log:
        status, _, out = run([py, __file__, "--probe", str(work / "probe.json")], log, 180, env)
        info = json.loads((work / "probe.json").read_text()) if status == "ok" else {"error": out[-2000:]}
        print(f"[gpu_check] probe: {status}  torch {info.get('packages', {}).get('torch')}  "
              f"cuda {info.get('cuda')}  {info.get('gpu', {}).get('name', '')}", flush=True)  # fmt: skip
        scripts = sorted({s.script for s in steps if s.script}) if args.dry_run else []
        for script in scripts:  # --help works
            st, _, _ = run([py, f"benchmarks/{script}", "--help"], log, 300, env)
            info.setdefault("help", {})[script] = st
            print(f"[gpu_check] {script} --help: {st}", flush=True)
        for step in steps:
            step.result = _run_step(args, step, info, py, work, env, log, t0)
            r = step.result
            print(
                f"[gpu_check] {step.name}: {r['status']} ({r.get('seconds', 0):.0f} s)  {step.command()}",
                flush=True,
            )
    return {"mode": "dry-run (CPU smoke: figures are not measurements)" if args.dry_run else "gpu",
            "probe": info, "budget_s": args.budget, "seconds": time.perf_counter() - t0,
            "steps": [{"name": s.name, "title": s.title, "command": s.command(), **s.result} for s in steps]}  # fmt: skip


def _run_step(args, step, info, py, work, env, log, t0) -> dict:
    if step.family and not info.get("families", {}).get(step.family):
        return {"status": f"skipped: family {step.family} not available"}
    if not args.dry_run and not info.get("cuda"):
        return {"status": "skipped: no CUDA GPU"}
    left = args.budget - (time.perf_counter() - t0)
    if not args.dry_run and step.estimate_s > left:
        return {"status": f"skipped: time budget ({left:.0f} s left, needs ~{step.estimate_s} s)"}
    argv = smoke_argv(step) if args.dry_run else list(step.argv)
    out_json = work / f"{step.name}.json"
    if step.name == "pytest_gpu":
        argv += [] if args.dry_run else ["--junitxml", str(work / "pytest.xml")]
    else:
        argv += ["--json", str(out_json)]
    timeout = 600 if args.dry_run else min(step.timeout_s, left + 30)
    start = time.perf_counter()
    status, rc, out = run([py, *argv], log, timeout, env)
    result = {
        "status": status,
        "rc": rc,
        "seconds": time.perf_counter() - start,
        "ran": "python " + " ".join(argv),
    }
    if step.name == "pytest_gpu":
        result["tests"] = _pytest_results(work / "pytest.xml", out, args.dry_run)
    elif out_json.exists():
        result["figures"] = json.loads(out_json.read_text())
    if status != "ok":
        result["tail"] = out[-1500:]
    return result


def _pytest_results(xml: Path, out: str, collect_only: bool) -> list[dict]:
    if collect_only:
        return [{"test": line.strip(), "outcome": "collected"} for line in out.splitlines() if "::" in line]
    if not xml.exists():
        return []
    tests = []
    for case in ET.parse(xml).getroot().iter("testcase"):
        outcome = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
        message = next((c.get("message", "") for c in case if c.tag != "system-out"), "")
        tests.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "message": (message or "")[:300]})  # fmt: skip
    return tests


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--list", action="store_true", help="print the planned checks and budget, run nothing")
    p.add_argument("--dry-run", action="store_true", help="CPU: --help, configs, smoke runs, summary")
    p.add_argument("--budget", type=float, default=float(os.environ.get("GPU_CHECK_BUDGET_S", BUDGET_S)))
    p.add_argument(
        "--out-dir",
        type=Path,
        default=Path(os.environ.get("OUT_DIR") or os.environ.get("OUT") or "gpu_check_out"),
    )
    p.add_argument("--probe", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.probe:
        args.probe.write_text(json.dumps(probe(), indent=2))
        return 0
    steps = plan_steps()
    print_plan(steps, args.budget)
    if args.list:
        return 0
    from gpu_check_report import render, targets  # noqa: PLC0415  (the report only when something ran)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    summary = execute(args, steps, args.out_dir)
    summary["targets"] = targets(summary)
    (args.out_dir / "gpu_check.json").write_text(json.dumps(summary, indent=2, default=str))
    text = render(summary)
    (args.out_dir / "gpu_check.md").write_text(text)
    print("\n" + text)
    failed = [s["name"] for s in summary["steps"] if s["status"] in ("failed", "timeout")]
    if args.dry_run and (failed or any(v != "ok" for v in summary["probe"].get("help", {}).values())):
        print(f"[gpu_check] dry run FAILED: {failed or 'a --help'}", file=sys.stderr)
        return 1
    return 0


def print_plan(steps: list[Step], budget: float) -> None:
    total = sum(s.estimate_s for s in steps)
    print(f"[gpu_check] planned checks (budget {budget:.0f} s; estimates add up to {total} s; "
          f"skipped from the end when over):")  # fmt: skip
    for s in steps:
        cond = f"  [only if family {s.family} exists]" if s.family else ""
        print(f"  {s.name:<16} ~{s.estimate_s:>3} s (timeout {s.timeout_s:>3} s)  {s.title}{cond}")
        print(f"  {'':<16} $ {s.command()}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
