"""Deliberate-bug check: do the tests catch the bugs that matter?

Each mutation below is a one-line bug in a behaviour the toolkit promises (freezing recipes, LwF,
WiSE-FT, metrics, eval padding, resume, optimizer reset, LR schedule, step counts, per-set generation
options, stop strings, the counting-bias probe, LoRA, the NaN policy, replay). For each, in a
temporary copy of the repository (the files git tracks, plus untracked files it does not ignore), the
script replaces one exact substring, runs the listed tests with this interpreter and PYTHONPATH set
to the copy, then puts the file back. A mutation is

* CAUGHT when some test fails (pytest exit code 1) or the mutated code cannot be collected (2);
* SURVIVED when every listed test passes;
* STALE when its old substring is not in the file any more (the code moved: update the list);
* ERROR when pytest found no tests or could not run (a wrong test path: update the list).

With --baseline (default on) each distinct test selection first runs unmutated and must pass, so a
CAUGHT row means the bug was caught, not that the test was already red.

    python benchmarks/mutation_check.py                 # every mutation
    python benchmarks/mutation_check.py --only lwf-     # names starting with "lwf-"
    python benchmarks/mutation_check.py --list          # the table of mutations, run nothing

Not part of CI: it runs the relevant tests once per mutation (tens of minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    name: str  # short id, "<behaviour>-<what>"
    file: str  # path relative to the repository root
    old: str  # exact substring, present once
    new: str  # what replaces it
    tests: tuple[str, ...]  # test files or node ids, relative to the repository root


M = Mutation
T = "tests/"
MUTATIONS: list[Mutation] = [
    # ---- recipes ----
    M("recipes-saproj-drops-o_proj", "strategies/freeze.py", r"self_attn\.(q|k|v|o)_proj\.",
      r"self_attn\.(q|k|v)_proj\.", (T + "test_recipes.py",)),
    M("recipes-gateup-trains-down_proj", "strategies/freeze.py", r'r"mlp\.(gate|up)_proj\.",)',
      r'r"mlp\.(gate|up|down)_proj\.",)', (T + "test_recipes.py",)),
    # ---- LwF ----
    M("lwf-no-T-squared", "strategies/lwf.py", "return temperature**2 * kl.mean()",
      "return temperature * kl.mean()", (T + "test_lwf.py",)),
    M("lwf-mask-unshifted", "strategies/lwf.py", "mask = labels[:, 1:] != -100", "mask = labels[:, :-1] != -100",
      (T + "test_lwf.py",)),
    M("lwf-teacher-never-refreshed", "strategies/lwf.py", "self.teacher = trainable_snapshot(ctx.model)",
      "self.teacher = self.teacher or trainable_snapshot(ctx.model)", (T + "test_lwf.py",)),
    # ---- WiSE-FT ----
    M("wiseft-alpha-swapped", "strategies/wise_ft.py", "p.copy_((1 - alpha) * ref[name] + alpha * end[name])",
      "p.copy_(alpha * ref[name] + (1 - alpha) * end[name])", (T + "test_wise_ft.py",)),
    M("wiseft-start-never-refreshed", "strategies/wise_ft.py",
      'if self.reference == "task_start" or not self.ref:', "if not self.ref:", (T + "test_wise_ft.py",)),
    # ---- metrics ----
    M("metrics-vqa-no-cap-under-10-refs", "mllm_cl/benchmark_metrics.py", "return min(1.0, sum(hits) / 3)",
      "return sum(hits) / 3", (T + "test_metrics.py", T + "test_benchmark_metrics.py")),
    M("metrics-vqa-no-cap-10-refs", "mllm_cl/benchmark_metrics.py",
      "sum(min(1.0, (matches - h) / 3) for h in hits)", "sum((matches - h) / 3 for h in hits)",
      (T + "test_metrics.py", T + "test_benchmark_metrics.py")),
    M("metrics-keeps-article-the", "mllm_cl/metrics.py", '_ARTICLES = {"a", "an", "the"}', '_ARTICLES = {"a", "an"}',
      (T + "test_metrics.py",)),
    M("metrics-time-no-wrap", "mllm_cl/metrics.py", "return min(diff, period - diff)", "return diff",
      (T + "test_metrics.py",)),
    # ---- eval padding ----
    M("padding-pad-rows-scored", "mllm_cl/data/stream.py", 'item["meta"] = eval_meta(sample, scored=i > 0)',
      'item["meta"] = eval_meta(sample, scored=True)', (T + "test_eval_columns.py",)),
    M("padding-scorer-ignores-weight", "mllm_cl/evaluation.py",
      'kept = [(p, m) for p, m in zip(preds, batch["meta"], strict=True) if m["weight"]]',
      'kept = list(zip(preds, batch["meta"], strict=True))', (T + "test_eval_columns.py",)),
    M("padding-eval-batches-right-padded", "mllm_cl/data/stream.py",
      'batch = self.encoder.collate(items, padding_side="left")',
      'batch = self.encoder.collate(items, padding_side="right")', (T + "test_eval_columns.py",)),
    # ---- resume ----
    M("resume-no-mid-task-offset", "mllm_cl/data/stream.py", "start=resume_offset(self.trainer) * self.batch_size,",
      "start=0,", (T + "test_resume_fast.py",)),
    M("resume-forgets-the-matrix", "mllm_cl/module.py",
      'self.results = StreamResults.from_dict(state["results"])', "self.results = None",
      (T + "test_resume_fast.py",)),
    # Not listed: "the task-start hooks run again on a mid-task resume" (dropping the `task_started`
    # guard in MLLMModule.on_train_epoch_start) is an equivalent mutant under Lightning 2.6, whose
    # fit loop does not call on_train_epoch_start when it restarts mid-epoch or at an epoch end.
    # ---- optimizer / schedule / step counts ----
    M("optimizer-state-kept-across-tasks", "mllm_cl/optim.py", "    optimizer.state.clear()", "    pass",
      (T + "test_schedule.py",)),
    M("schedule-half-cosine", "mllm_cl/optim.py", "(1 + math.cos(math.pi * progress))",
      "(1 + math.cos(math.pi * progress / 2))", (T + "test_schedule.py",)),
    M("schedule-not-restarted-per-task", "mllm_cl/module.py",
      "config.scheduler.start_task(self.stream.steps_for(task))",
      "config.scheduler.start_task(self.stream.steps_for(0))", (T + "test_schedule.py",)),
    M("schedule-ignores-min-lr", "mllm_cl/optim.py",
      "return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5", "return 0.5", (T + "test_schedule.py",)),
    M("steps-ignore-epochs", "mllm_cl/data/stream.py",
      "return max(1, int(len(self._train[task_index]) * task.epochs) // self._samples_per_step())",
      "return max(1, len(self._train[task_index]) // self._samples_per_step())", (T + "test_schedule.py",)),
    M("steps-ignore-accumulation", "mllm_cl/data/stream.py",
      "return self.batch_size * world * self._accumulate()", "return self.batch_size * world",
      (T + "test_schedule.py", T + "test_context.py")),
    # ---- per-set generation options and stop strings ----
    M("eval-set-max-new-tokens-ignored", "mllm_cl/evaluation.py",
      "preds = module.generate(batch, self.column.max_new_tokens, self.column.stop)",
      "preds = module.generate(batch, None, self.column.stop)", (T + "test_eval_columns.py",)),
    M("eval-set-stop-ignored", "mllm_cl/evaluation.py",
      "stop=list(owner.stop) if owner.stop else None,", "stop=None,",
      (T + "test_eval_columns.py",)),
    M("stop-strings-do-not-end-generation", "mllm_cl/generation.py",
      "criteria = StoppingCriteriaList([StopOnStrings(tokenizer, stop, prompt_len)] if stop else [])",
      "criteria = StoppingCriteriaList([])", (T + "test_generation.py",)),
    # ---- counting-bias probe ----
    M("probe-averages-past-end-token", "mllm_cl/probe.py", "valid = (~done_before).float()",
      "valid = torch.ones_like(done_before).float()", (T + "test_probe.py",)),
    M("probe-right-padding", "mllm_cl/evaluation.py",
      'batch = encoder.collate([encoder.encode_prompt(s) for s in chunk], padding_side="left")',
      'batch = encoder.collate([encoder.encode_prompt(s) for s in chunk], padding_side="right")',
      (T + "test_probe.py",)),
    # ---- LoRA ----
    M("lora-scaling-alpha-is-r", "strategies/lora.py", "lora_alpha=self.alpha", "lora_alpha=self.r",
      (T + "test_lora.py",)),
    M("lora-adapter-not-reset-after-merge", "strategies/lora.py", 'layer.lora_B["default"].weight.zero_()',
      'layer.lora_B["default"].weight.mul_(1.0)', (T + "test_lora.py",)),
    # ---- NaN policy ----
    M("nan-skip-still-steps", "mllm_cl/guards.py",
      "module.counters.note_nonfinite(module)\n    return None",
      "module.counters.note_nonfinite(module)\n    return loss.nan_to_num(0.0)",
      (T + "test_bad_input.py",)),
    M("nan-skip-count-not-cumulative", "mllm_cl/guards.py",
      "self.nonfinite += 1", "self.nonfinite = 1",
      (T + "test_bad_input.py",)),
    # ---- replay ----
    M("replay-half-ratio", "strategies/replay.py", "[table, memory], [self.ratio],",
      "[table, memory], [self.ratio / 2],", (T + "test_hybrid.py",)),
    M("replay-reservoir-overflows", "strategies/replay.py", "if len(self.buffer) < self.size:",
      "if len(self.buffer) <= self.size:", (T + "test_hybrid.py",)),
    # ---- the strategy context, α selection, LoRA export, length counters ----
    M("task-samples-are-one-rank-one-micro-batch", "mllm_cl/data/stream.py",
      "return self.steps_for(task_index) * self._samples_per_step()",
      "return self.steps_for(task_index) * self.batch_size", (T + "test_context.py",)),
    M("selection-allows-reported-sets", "mllm_cl/selection.py",
      "if (chosen_on := [k for k in keys if k in reported]) and not self.allow_reported:",
      "if (chosen_on := [k for k in keys if k in reported]) and False:", (T + "test_wise_ft.py",)),
    M("export-leaves-lora-unmerged", "mllm_cl/export.py",
      'linear.weight.copy_(merged_weight(linear.weight, a, b, layer.scaling["default"]))', "pass",
      (T + "test_export.py::test_export_merges_lora_into_plain_weights",)),
    M("length-counts-not-checkpointed", "mllm_cl/module.py",
      '"counters": self.counters.state_dict(),', '"counters": {},',
      (T + "test_bad_input.py::test_overlength_is_counted_never_silent",)),
    M("curve-not-trimmed-on-resume", "mllm_cl/curve.py", "trim(pl_module, trainer.global_step)", "pass",
      (T + "test_curve.py",)),
    M("ckpt-last-looked-up-under-the-default-name", "mllm_cl/cli.py",
      "self._name_run(section)  # before", "pass  # before",
      (T + "test_cli.py::test_ckpt_path_last_finds_a_run_named_by_its_method",)),
    M("folder-swap-cut-not-finished", "mllm_cl/results.py",
      "if not os.path.lexists(path) and os.path.isdir(partial) and os.path.lexists(aside):",
      "if False:", (T + "test_checkpoint_folders.py",)),
]  # fmt: skip


def repo_files(root: Path) -> list[str]:
    """Tracked files plus untracked files git does not ignore (a branch's new tests before commit)."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return sorted({f for f in out.split("\0") if f and (root / f).is_file()})


def copy_repo(root: Path, dest: Path) -> None:
    for rel in repo_files(root):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, target)


def run_tests(copy: Path, tests: tuple[str, ...], timeout: int) -> tuple[int, float, str]:
    env = {**os.environ, "PYTHONPATH": str(copy), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "not slow and not gpu"]
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            [*cmd, *tests], cwd=copy, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return -1, time.perf_counter() - start, "timeout"
    lines = [x for x in proc.stdout.splitlines() if x.strip()]
    return proc.returncode, time.perf_counter() - start, lines[-1] if lines else proc.stderr[-200:]


def verdict(code: int) -> str:
    return {0: "SURVIVED", 1: "CAUGHT", 2: "CAUGHT", -1: "TIMEOUT"}.get(code, "ERROR")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="run only mutations whose name starts with this")
    parser.add_argument("--list", action="store_true", help="print the mutations and exit")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated runs")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per pytest run")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if m.name.startswith(args.only)]
    if args.list:
        for m in chosen:
            print(f"{m.name:<38} {m.file:<26} {' '.join(m.tests)}")
        return 0

    rows: list[tuple[str, str, str, float, str]] = []
    with tempfile.TemporaryDirectory(prefix="mllm_cl_mutants_") as tmp:
        copy = Path(tmp)
        copy_repo(ROOT, copy)
        if not args.no_baseline:
            for tests in sorted({m.tests for m in chosen}):
                code, seconds, last = run_tests(copy, tests, args.timeout)
                print(f"baseline {' '.join(tests)}: exit {code} in {seconds:.0f}s ({last})", flush=True)
                if code != 0:
                    print("baseline is not green: fix the tests first", file=sys.stderr)
                    return 2
        for m in chosen:
            path = copy / m.file
            original = path.read_text()
            found = original.count(m.old)
            if found != 1:
                result = "STALE" if found == 0 else f"STALE ({found} matches)"
                rows.append((m.name, m.file, result, 0.0, "old substring not found once"))
                print(f"{m.name}: {result}", flush=True)
                continue
            try:
                path.write_text(original.replace(m.old, m.new))
                code, seconds, last = run_tests(copy, m.tests, args.timeout)
            finally:
                path.write_text(original)
            rows.append((m.name, m.file, verdict(code), seconds, last))
            print(f"{m.name}: {verdict(code)} in {seconds:.0f}s ({last})", flush=True)

    width = max(len(r[0]) for r in rows) if rows else 10
    print(f"\n{'mutation':<{width}}  {'file':<24}  {'result':<9}  {'time':>6}")
    for name, file, result, seconds, _ in rows:
        print(f"{name:<{width}}  {file:<24}  {result:<9}  {seconds:>5.0f}s")
    counts = {
        k: sum(r[2].startswith(k) for r in rows) for k in ("CAUGHT", "SURVIVED", "STALE", "ERROR", "TIMEOUT")
    }
    print("\n" + ", ".join(f"{v} {k.lower()}" for k, v in counts.items()) + f" of {len(rows)}")
    return 0 if counts["SURVIVED"] == counts["ERROR"] == counts["TIMEOUT"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
