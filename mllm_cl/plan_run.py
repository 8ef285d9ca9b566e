"""A fit YAML read for ``python -m mllm_cl plan --config ...``, and the size of the run it describes.

The config (any ``--config`` stack plus command-line overrides) is parsed by the same `MllmCLI` as
``fit`` but nothing is instantiated that would load a model or a processor: the recipe, the
strategies, a WiSE-FT callback and the data sources are built from their parsed specs (cheap
constructors), the rest is read off the parsed values.

Run size: optimizer steps per task (``steps``, or ⌊samples · epochs / global batch⌋ as
`TaskStream.steps_for`), and the generated evaluation answers: every eval set before the first
task and after each task, (T + 1) · Σ sizes, plus one pass per α of a WiSE-FT grid. Sizes are read
where that is cheap (a Synthetic's ``n``, a JSON list up to 256 MB, a ``save_to_disk`` folder),
taken from `KNOWN_SIZES` for the benchmark presets, and otherwise reported as unknown.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import warnings
from dataclasses import dataclass

import datasets
from jsonargparse import Namespace

from mllm_cl.cli import MllmCLI  # plan is a subcommand: it parses with the CLI's own parser
from mllm_cl.data import Benchmark, HFDataset, LlavaJson, Mix, Synthetic
from mllm_cl.data.stream import TaskStream
from mllm_cl.errors import ConfigError
from mllm_cl.module import MLLMModule
from strategies.base import MemoryTerm

# (preset, split) -> (rows, approximate?, where the number comes from). Checked against the public
# dataset cards / viewers (see also /work/shared/BENCHMARKS.md); a preset not listed is unknown.
KNOWN_SIZES: dict[tuple[str, str], tuple[int, bool, str]] = {
    ("pathvqa", "test"): (6719, False, "flaviagiammarino/path-vqa card: test 6,719"),
    ("pathvqa", "train"): (19654, False, "flaviagiammarino/path-vqa card: train 19,654"),
    ("textvqa", "validation"): (5000, False, "lmms-lab/textvqa viewer: validation 5,000"),
    ("textvqa", "train"): (34602, False, "lmms-lab/textvqa viewer: train 34.6k (34,602)"),
    ("timeclock", "train"): (1440, True, "AvaXiao/clockreading-time: ≈1.44k rows per its HF listing"),
    ("ai2d", "test"): (3088, False, "lmms-lab/ai2d viewer: test 3.09k (AI2D test, 3,088)"),
    ("chartqa", "test"): (2500, False, "ChartQA test: 1,250 human + 1,250 augmented"),
    ("docvqa_val", "validation"): (5349, False, "lmms-lab/DocVQA card: DocVQA validation 5,349"),
    ("infovqa_val", "validation"): (2801, False, "lmms-lab/DocVQA card: InfographicVQA validation 2,801"),
    ("realworldqa", "test"): (765, False, "lmms-lab/RealWorldQA: test 765"),
    ("scienceqa_img", "test"): (2017, False, "ScienceQA test questions with an image: 2,017"),
    ("mmstar", "val"): (1500, False, "MMStar: 1,500 samples"),
    ("ocrbench", "test"): (1000, False, "OCRBench: 1,000 (lmms-eval divides by 1000)"),
    ("seedbench", "test"): (14233, False, "SEED-Bench image dimensions 1-9: 14,233 rows"),
}
UNKNOWN_PRESETS = {
    "cub200": "Jessemel/cub200-test's row count is not documented (BENCHMARKS.md §4)",
    "pixmocount": "Jessemel/pixmocount-test's row count is not documented (BENCHMARKS.md §4)",
}
_PARSE_LIMIT = 256 * 2**20  # JSON lists larger than this are not read just to count them


@dataclass
class Size:
    rows: int | None
    note: str
    approx: bool = False

    def text(self) -> str:
        return "unknown" if self.rows is None else ("≈" if self.approx else "") + f"{self.rows:,}"


class _Parsed(Exception):
    """Raised after parsing, before anything is instantiated, carrying the parsed config."""


class _ParseOnly(MllmCLI):
    def before_instantiate_classes(self):
        raise _Parsed(self.config)


def parse_fit_args(args: list[str]) -> Namespace:
    """The fit config of `args` (``--config`` stack and overrides), parsed exactly as ``fit``."""
    seed_log = logging.getLogger("lightning.fabric.utilities.seed")
    level, seed_log.level = seed_log.level, logging.WARNING  # "Seed set to 0" is fit's business
    try:
        with warnings.catch_warnings():  # plan passes its own argv subset on purpose
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            _ParseOnly(MLLMModule, TaskStream, args=args, run=False)
    except _Parsed as parsed:
        return parsed.args[0]
    finally:
        seed_log.setLevel(level)
    raise RuntimeError("the CLI did not stop after parsing")


def build(spec):
    """Instantiate a parsed ``{class_path, init_args}`` spec (recursively: lists, nested specs)."""
    if isinstance(spec, Namespace):
        spec = spec.as_dict()
    if isinstance(spec, list):
        return [build(s) for s in spec]
    if isinstance(spec, dict) and "class_path" in spec:
        module, _, name = spec["class_path"].rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        return cls(**{k: build(v) for k, v in (spec.get("init_args") or {}).items()})
    return spec


def source_size(source) -> Size:
    """Rows of a source, read only where that is cheap; `Size(None, why)` otherwise."""
    limit = getattr(source, "limit", None)
    if isinstance(source, Synthetic):
        size = Size(source.n, "Synthetic n")
    elif isinstance(source, Benchmark):
        known = KNOWN_SIZES.get((source.name, source.split))
        why = UNKNOWN_PRESETS.get(source.name, f"no public size listed for split {source.split}")
        size = Size(known[0], known[2], known[1]) if known else Size(None, why)
    elif isinstance(source, LlavaJson):
        size = _json_rows(source.path)
    elif isinstance(source, HFDataset) and os.path.isdir(source.path):
        ds = datasets.load_from_disk(source.path)  # memory-mapped: cheap
        ds = ds[source.split] if isinstance(ds, datasets.DatasetDict) else ds
        size = Size(len(ds), f"{source.path} ({source.split})")
    elif isinstance(source, Mix):
        parts = [source_size(s) for s in source.sources]
        known = None if any(p.rows is None for p in parts) else sum(p.rows for p in parts)
        size = Size(known, "sum of the mixed sources", any(p.approx for p in parts))
    else:
        size = Size(None, f"{type(source).__name__}: size not read by plan")
    if limit is not None and (size.rows is None or size.rows > limit):
        return Size(limit if size.rows is not None else None, f"limit {limit}; {size.note}", size.approx)
    return size


def _json_rows(path: str) -> Size:
    if not os.path.isfile(path):
        return Size(None, f"{path} not found")
    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as fh:
            return Size(sum(1 for line in fh if line.strip()), path)
    if os.path.getsize(path) > _PARSE_LIMIT:
        return Size(None, f"{path}: {os.path.getsize(path) / 2**20:.0f} MB, not parsed to count it")
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    return Size(len(data) if isinstance(data, list) else None, path)


def table_bytes(source) -> tuple[int, str]:
    """Host bytes of a source loaded in full: a JSON file's size on disk (a lower bound; the parsed
    records take several times more), 0 for memory-mapped Arrow data, else unknown (0)."""
    path = getattr(source, "path", None)
    if isinstance(source, LlavaJson):
        if os.path.isfile(path):
            return os.path.getsize(path), "≥ the JSON's size on disk (parsed records take several times more)"
        return 0, "unknown: file not found"
    return 0, "memory-mapped Arrow data (datasets): shared pages, not counted"


def data_table_terms(tasks) -> list[MemoryTerm]:
    """Host RAM of the tasks' training tables read into Python (every process loads every task)."""
    terms = []
    for task in tasks:
        nbytes, note = table_bytes(task["train_source"])
        if nbytes:
            terms.append(MemoryTerm(f"train table {task['name']}", nbytes, note, where="host"))
    return terms


def device_count(value, notes: list[str]) -> int:
    """trainer.devices as a number: an int, a list of ids, "0,1"; "auto" counts as 1 (noted)."""
    if isinstance(value, int) and value > 0:
        return value
    if isinstance(value, (list, tuple)):
        return len(value)
    if isinstance(value, str) and value.strip(", ").replace(",", "").isdigit():
        parts = [p for p in value.split(",") if p.strip()]
        return len(parts) if "," in value else int(value)
    notes.append(f"trainer.devices {value!r}: counted as 1 GPU; pass --trainer.devices N for the real count")
    return 1


def read_strategy(spec, world: int) -> dict:
    """trainer.strategy -> the Setup fields plan models (single, ddp, fsdp1, fsdp2)."""
    if spec is None or spec == "auto":
        return {"strategy": "single" if world == 1 else "ddp"}
    if isinstance(spec, str):
        name = spec.lower()
        if name.startswith("ddp"):
            return {"strategy": "ddp"}
        if name == "fsdp":  # Lightning's FSDPStrategy with no wrap policy: one unit for the model
            return {"strategy": "fsdp1", "fsdp1_whole_model": True}
        if name == "single_device":
            return {"strategy": "single"}
        raise ConfigError(
            f"trainer.strategy {spec!r}: plan models auto, ddp, fsdp and mllm_cl.sharding's FSDP2 / LayerWiseFSDP"
        )
    spec = spec.as_dict() if isinstance(spec, Namespace) else dict(spec)
    cls, args = spec.get("class_path", ""), spec.get("init_args") or {}
    short = cls.rsplit(".", 1)[-1]
    if short in ("FSDP2", "ModelParallelStrategy"):
        return {"strategy": "fsdp2"}
    if short in ("LayerWiseFSDP", "FSDPStrategy"):
        whole = short == "FSDPStrategy" and not args.get("auto_wrap_policy")
        sharding = str(args.get("sharding_strategy") or "FULL_SHARD").rsplit(".", 1)[-1].upper()
        return {
            "strategy": "fsdp1",
            "fsdp1_sharding": sharding,
            "fsdp1_whole_model": whole,
            "cpu_offload": bool(args.get("cpu_offload")),
        }
    if short == "DDPStrategy":
        return {"strategy": "ddp"}
    if short == "SingleDeviceStrategy":
        return {"strategy": "single"}
    raise ConfigError(f"trainer.strategy {cls}: plan models DDP, FSDP1 (LayerWiseFSDP) and FSDP2 only")


def read_tasks(data: Namespace) -> tuple[list[dict], list[dict]]:
    """(tasks, eval sets) with their sources built and sizes read."""
    tasks, evals = [], []
    for t in data.tasks:
        train = build(t.train)
        tasks.append(
            {
                "name": t.name,
                "train_source": train,
                "size": source_size(train),
                "steps": t.steps,
                "epochs": t.epochs,
            }
        )
        if t.eval is not None:
            evals.append({"name": t.name, "size": source_size(build(t.eval))})
    for h in data.heldout or []:
        evals.append({"name": h.name, "size": source_size(build(h.data))})
    if data.eval_limit is not None:
        for e in evals:
            rows = e["size"].rows
            if rows is None or rows > data.eval_limit:
                e["size"] = Size(
                    data.eval_limit if rows is not None else None,
                    f"eval_limit {data.eval_limit}; {e['size'].note}",
                )
    return tasks, evals


def task_steps(tasks: list[dict], batch: int, world: int, accumulate: int) -> None:
    """Fill each task's optimizer steps and consumed samples, as `TaskStream.steps_for` does."""
    per_step = batch * world * accumulate
    for t in tasks:
        rows = t["size"].rows
        if t["steps"] is not None:
            t["n_steps"] = t["steps"]
        elif rows is not None:
            t["n_steps"] = max(1, int(rows * t["epochs"]) // per_step)
        else:
            t["n_steps"] = None
        t["samples"] = None if t["n_steps"] is None else t["n_steps"] * per_step


def eval_rows(strategies: list, n_tasks: int) -> tuple[int, str]:
    """How many times every eval set is generated: before task 1 and after each task, plus a WiSE-FT grid."""
    rows, why = n_tasks + 1, f"{n_tasks} tasks + 1 (before the first)"
    for s in strategies:
        grid = len(getattr(s, "alphas", []) or []) if type(s).__name__ == "WiSEFT" else 0
        if grid > 1:
            rows += n_tasks * grid
            why += f" + {n_tasks} x {grid} WiSE-FT α"
    return rows, why


def run_size(tasks, evals, strategies, world: int, step_time=None, gen_time=None) -> dict:
    """Steps, generated answers and (with per-step / per-answer seconds) the wall time."""
    steps = [t["n_steps"] for t in tasks]
    total_steps = None if None in steps else sum(steps)
    rows, why = eval_rows(strategies, len(tasks))
    sizes = [e["size"].rows for e in evals]
    per_row = sum(r for r in sizes if r is not None)
    out = {
        "total_steps": total_steps,
        "eval_rows": rows,
        "eval_rows_why": why,
        "eval_per_row": per_row,
        "eval_unknown": [e["name"] for e in evals if e["size"].rows is None],
        "generated": rows * per_row,
    }
    if step_time is not None and total_steps is not None:
        out["train_seconds"] = total_steps * step_time
    if gen_time is not None:
        out["eval_seconds"] = rows * per_row * gen_time / world  # every GPU generates its share
    return out
