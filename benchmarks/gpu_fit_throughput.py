"""Training throughput of a recipe through the real `fit` path: MLLMModule + Lightning Trainer.

Same 7B-shaped model builder, samples and FLOP count as benchmarks/gpu_throughput.py (imported from
it; the FLOP formula is in its docstring), but every step is Lightning's. The recipe's YAML (default
configs/llava_saproj.yaml) is parsed by the real `MllmCLI` (run=False): it gives the model options
(weight dtype: float32 masters under bf16-mixed; recipe; strategies; lr), the trainer's precision and
gradient clipping, and the data's batch size and loader workers. `ShapeModule` is `MLLMModule` with
`build_model` returning the random 7B-shaped model; the one task is `--warmup + --steps (+ --profile)`
batches of the fixed-length samples. Own Trainer, not the config's: no logger, no checkpoint (a
SA Proj checkpoint of a 7B model is ~25 GB to write) and no gradient accumulation (one batch, one
optimizer step, as in the plain loop).

Timed: the wall time between consecutive `on_train_batch_end` calls, after a CUDA sync, so data
loading, the Lightning loop, autocast, clipping and the optimizer are all in it; the median of
`--steps` after `--warmup`. Peak memory: `torch.cuda.max_memory_allocated` over the timed steps,
next to `python -m mllm_cl plan` for the same setup (its command is printed). `plan` has no mixed
precision mode: for float32 weights it is given --dtype float32, which counts weights, gradients and
optimizer state right and the (bf16) activations twice.

`--profile N`: N more steps under `torch.profiler`: the top kernels by GPU time, and GPU time per
kind (matmul, attention, optimizer, copies and casts, other) against the steps' wall time (the rest
is the GPU waiting on the host): what limits MFU.

    python benchmarks/gpu_fit_throughput.py [--config configs/llava_saproj.yaml] [--checkpointing both]
    python benchmarks/gpu_fit_throughput.py --device cpu --smoke --steps 1 --warmup 1 --batch 2   # smoke
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import io
import json
import re
import sys
import tempfile
import time
import weakref
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_throughput as gt  # noqa: E402  (puts the repository root on sys.path)
import lightning as L  # noqa: E402
import torch  # noqa: E402
from torch.autograd import DeviceType  # noqa: E402

from mllm_cl import plan  # noqa: E402
from mllm_cl.cli import MllmCLI  # noqa: E402
from mllm_cl.data.collate import Encoder  # noqa: E402
from mllm_cl.data.stream import Task, TaskStream  # noqa: E402
from mllm_cl.module import _DTYPES, MLLMModule  # noqa: E402

KINDS = {  # kernel name -> kind, first match wins
    "attention": r"flash|fmha|attention|sdpa|mem_eff",
    "matmul": r"gemm|matmul|cutlass|xmma|nvjet|cublas|wgmma|hgmma|sm90_|aten::(mm|addmm|bmm)$",
    "optimizer": r"adam|multi_tensor|foreach",
    "copy/cast": r"copy|cast|memcpy|memset|convert",
}


class ShapeModule(MLLMModule):
    """`MLLMModule` whose model is a 7B shape with random weights (`gpu_throughput.build`)."""

    shape = None  # (config, device), set by `setup_run`

    def build_model(self):
        config, device = self.shape
        attn = self.hparams.attn_implementation or "sdpa"
        return gt.build(self.family, config, device, attn, _DTYPES[self.hparams.dtype])


def parse_recipe(configs: list[str], family: str | None, device: str, checkpointing: bool):
    """(module, datamodule, trainer options) of the recipe YAMLs, through `MllmCLI(run=False)`."""
    args = [a for c in configs for a in ("--config", c)]
    args += ["--model.pretrained=null", f"--model.gradient_checkpointing={str(checkpointing).lower()}"]
    args += [f"--model.family={family}"] if family else []  # (the CLI's trainer and logger are never used)
    if device == "cpu":
        args += ["--trainer.accelerator=cpu"]
    argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when it also sees our own options
    try:
        cli = MllmCLI(MLLMModule, TaskStream, args=args, run=False)
    finally:
        sys.argv = argv
    return cli.model, cli.datamodule, cli.config["trainer"]


def init_args(module: MLLMModule) -> dict:
    """The options `module` was built with, as `MLLMModule` keyword arguments."""
    names = inspect.signature(MLLMModule.__init__).parameters
    args = {k: v for k, v in module.hparams.items() if k in names}
    return {**args, "recipe": module.recipe, "strategies": module.strategies}


class Measure(L.Callback):
    """Step times, peak memory, the batch's shape and (optionally) a profile of the last steps."""

    def __init__(self, warmup: int, steps: int, profile: int, cuda: bool):
        self.warmup, self.steps, self.profile, self.cuda = warmup, steps, profile, cuda
        self.ends, self.shape, self.prof, self.prof_wall = [], None, None, None

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def on_train_start(self, trainer, module):
        self.counts = gt.component_counts(module.family, module.model)
        self.vision = gt.VisionTokens(module.family, module.model)

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if self.shape is None:
            self.shape = {k: batch[k].detach().cpu() for k in ("input_ids",)}
        if self.profile and batch_idx == self.warmup + self.steps:
            self._sync()
            activities = [torch.profiler.ProfilerActivity.CPU]
            activities += [torch.profiler.ProfilerActivity.CUDA] if self.cuda else []
            self.prof = torch.profiler.profile(activities=activities)
            self.prof.__enter__()
            self.prof_start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self._sync()
        self.ends.append(time.perf_counter())
        if batch_idx == self.warmup - 1 and self.cuda:  # optimizer state exists from here on
            torch.cuda.reset_peak_memory_stats()
        if batch_idx == self.warmup + self.steps - 1 and self.cuda:
            self.peak = (torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved())
        if self.prof is not None and batch_idx == self.warmup + self.steps + self.profile - 1:
            self.prof_wall = time.perf_counter() - self.prof_start
            self.prof.__exit__(None, None, None)

    def step_s(self) -> float:
        gaps = [b - a for a, b in zip(self.ends[self.warmup - 1 :], self.ends[self.warmup :], strict=False)]
        gaps = gaps[: self.steps]
        return sorted(gaps)[len(gaps) // 2]


def kernel_summary(prof, wall_s: float, cuda: bool, top: int = 15) -> dict:
    """Top kernels (CPU ops on a CPU run) by self time, and time per kind against the wall time."""
    events = prof.key_averages()
    if cuda:  # kernels only: a CPU op's self device time is its kernels' time again
        rows = [(e.key, e.self_device_time_total, e.count) for e in events if e.device_type != DeviceType.CPU]
    else:
        rows = [(e.key, e.self_cpu_time_total, e.count) for e in events]
    rows.sort(key=lambda r: -r[1])
    busy = sum(r[1] for r in rows) / 1e6
    kinds: dict[str, float] = {}
    for name, us, _ in rows:
        kind = next((k for k, rx in KINDS.items() if re.search(rx, name, re.I)), "other")
        kinds[kind] = kinds.get(kind, 0.0) + us / 1e6
    try:  # torch's own table, as a reader would print it
        table = events.table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=top)
    except Exception as err:  # noqa: BLE001  (a profiler API change must not lose the run's figures)
        table = f"(key_averages().table failed: {err})"
    return {
        "wall_s": wall_s,
        "busy_s": busy,
        "busy_fraction": busy / wall_s if wall_s else None,
        "seconds_by_kind": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
        "top": [{"name": n[:120], "seconds": us / 1e6, "calls": c} for n, us, c in rows[:top]],
        "table": table,
    }


def plan_for(module, config_arg: str, batch: int, seq: int, checkpointing: bool, precision: str) -> dict:
    """`python -m mllm_cl plan` (its `main`, in process) for this setup: argv and the JSON it prints.
    The weights' dtype and the trainer's precision give plan the optimizer state's element size."""
    argv = ["--family", module.family.name, "--config", config_arg, "--recipe", type(module.recipe).__name__,
            "--gpus", "1", "--micro-batch", str(batch), "--seq-len", str(seq),
            "--dtype", module.hparams.dtype, "--precision", precision]  # fmt: skip
    if not checkpointing:
        argv.append("--no-gradient-checkpointing")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = plan.main([*argv, "--json"])
    result = json.loads(out.getvalue()) if rc == 0 else None
    return {
        "command": "python -m mllm_cl plan " + " ".join(argv),
        "rc": rc,
        "memory": result and result["memory"],
    }


def one_run(args, checkpointing: bool) -> dict:
    cuda = args.device.startswith("cuda")
    before = torch.cuda.memory_allocated() if cuda else 0  # left over from an earlier run: should be ~0
    parsed, data, trainer_opts = parse_recipe(args.recipe_config, args.family, args.device, checkpointing)
    kwargs = init_args(parsed) | ({"dtype": args.dtype} if args.dtype else {})
    family, config, processor, size = gt.shape_setup(
        parsed.family.name, args.config, args.image_size, args.smoke
    )
    module = ShapeModule(**kwargs)
    module.processor, module.shape = processor, (config, args.device)
    batch = args.batch or data.batch_size
    samples = gt.fixed_samples(Encoder(module.family, processor, 10**9), batch, args.text, size)
    total = args.warmup + args.steps + args.profile
    stream = TaskStream(
        tasks=[Task("bench", train=gt.Samples(samples), steps=total)],
        batch_size=batch,
        num_workers=data.num_workers if args.workers is None else args.workers,
        max_length=10**6,
        overlength="error",
    )
    precision = args.precision or trainer_opts["precision"]
    measure = Measure(args.warmup, args.steps, args.profile, cuda)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = L.Trainer(
            accelerator="gpu" if cuda else "cpu", devices=1, precision=precision, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            gradient_clip_val=trainer_opts.get("gradient_clip_val"), accumulate_grad_batches=1,
            num_sanity_val_steps=0, callbacks=[measure], default_root_dir=tmp,
        )  # fmt: skip
        trainer.fit(module, datamodule=stream)
    ids = measure.shape["input_ids"]
    r = gt.figures(measure.counts, measure.shape, family.image_token_id(processor), measure.vision.tokens,
                   measure.step_s(), args.peak)  # fmt: skip
    r.update(path="fit", family=family.name, recipe=type(module.recipe).__name__, checkpointing=checkpointing,
             precision=str(precision), weights=module.hparams.dtype, attn=module.hparams.attn_implementation,
             device=torch.cuda.get_device_name() if cuda else "cpu", smoke=args.smoke,
             workers=stream.num_workers, gradient_clip_val=trainer_opts.get("gradient_clip_val"))  # fmt: skip
    r["plan"] = plan_for(
        module, gt.shape_name(family, args.config), ids.shape[0], ids.shape[1], checkpointing, str(precision)
    )
    if cuda:
        r["peak_memory_bytes"], r["peak_reserved_bytes"] = measure.peak
        planned = r["plan"]["memory"] and r["plan"]["memory"]["gpu_total"]
        r["plan_over_measured"] = planned / r["peak_memory_bytes"] if planned else None
    if measure.prof is not None:
        r["profile"] = kernel_summary(measure.prof, measure.prof_wall, cuda)
    model = weakref.ref(module.model)
    del trainer, module, measure, stream  # the datamodule holds the trainer too
    gc.collect()
    r["model_freed"] = model() is None  # else the next run's peak memory counts this one's model too
    if cuda:
        torch.cuda.empty_cache()
        r["allocated_before_bytes"] = before
    return r


def report(r: dict) -> None:
    print(f"\n{r['device']}  {r['family']}  fit  recipe={r['recipe']}  precision={r['precision']}  "
          f"weights={r['weights']}  checkpointing={r['checkpointing']}  workers={r['workers']}")  # fmt: skip
    gt.print_figures(r)
    if "peak_memory_bytes" in r:
        planned = r["plan_over_measured"]
        print(f"peak memory {r['peak_memory_bytes'] / 2**30:.1f} GiB (reserved {r['peak_reserved_bytes'] / 2**30:.1f});"
              f" plan {f'{planned:.2f}x of it' if planned else 'n/a'}")  # fmt: skip
    print(f"plan: {r['plan']['command']}")
    if "profile" in r:
        p = r["profile"]
        kinds = ", ".join(f"{k} {v:.2f}s" for k, v in p["seconds_by_kind"].items())
        print(f"profile: {p['busy_s']:.2f} s busy of {p['wall_s']:.2f} s wall; {kinds}")
        print(p["table"])


def main():
    p = gt.parser(__doc__.splitlines()[0])
    p.add_argument(
        "--recipe-config", action="append", help="recipe YAML(s) (default configs/llava_saproj.yaml)"
    )
    p.add_argument("--batch", type=int, help="micro-batch (default: the config's data.batch_size)")
    p.add_argument("--checkpointing", choices=["on", "off", "both"], default="both")
    p.add_argument("--precision", help="override trainer.precision (e.g. bf16-true, with --dtype bfloat16)")
    p.add_argument("--dtype", help="override model.dtype (float32, bfloat16)")
    p.add_argument("--workers", type=int, help="override data.num_workers")
    p.add_argument("--profile", type=int, default=0, help="profile this many steps after the timed ones")
    p.set_defaults(family=None, steps=10)
    args = p.parse_args()
    args.recipe_config = args.recipe_config or [str(gt.ROOT / "configs" / "llava_saproj.yaml")]
    gt.check_device(args.device, "gpu_fit_throughput.py")
    if args.warmup < 1 or args.steps < 1:
        sys.exit("--warmup and --steps must be at least 1 (a step time is the gap between two step ends)")
    runs = {"on": [True], "off": [False], "both": [False, True]}[args.checkpointing]
    results = []
    for checkpointing in runs:
        torch.manual_seed(0)
        results.append(one_run(args, checkpointing))
        report(results[-1])
    command = "python benchmarks/gpu_fit_throughput.py " + " ".join(sys.argv[1:])
    for r in results:
        r["command"] = command
    print("reproduce: " + command)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
