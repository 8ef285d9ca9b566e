"""Plan a run before renting GPUs: parameters per component, memory per GPU term by term, run size.

Two forms::

    python -m mllm_cl plan --config configs/llava_saproj.yaml [--config more.yaml] [--trainer.devices 8]
    python -m mllm_cl plan --family llava --recipe SAProj --gpus 8 --micro-batch 4 --seq-len 2048

The first reads a fit YAML (any ``--config`` stack and overrides, parsed by the same CLI as
``fit``): family, checkpoint config, recipe, strategies, dtype, precision, micro-batch,
accumulation, devices / nodes, DDP / FSDP1 / FSDP2, gradient checkpointing and ``max_length``, and
adds the run's size (optimizer steps, generated evaluation answers, and with ``--step-time`` /
``--gen-time`` the wall time). The second describes a setup by flags. Neither loads weights: the
architecture is built on the meta device from a ``config.json`` (`mllm_cl.plan_arch`); the memory
terms and their formulas are in `mllm_cl.plan_memory`, the fit-YAML reading in `mllm_cl.plan_run`.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys

from jsonargparse import ArgumentError

import strategies
from mllm_cl.cli_errors import argument_line, one_line
from mllm_cl.errors import ConfigError, MllmClError
from mllm_cl.families import FAMILIES, get_family
from mllm_cl.plan_arch import (  # noqa: F401  (bundled_configs, count_parameters: re-exported API)
    arch_of,
    build_meta_model,
    bundled_configs,
    checkpoint_config,
    count_parameters,
    load_config,
    resolve_config_path,
)
from mllm_cl.plan_format import format_plan
from mllm_cl.plan_memory import DTYPE_BYTES, GIB, Setup, estimate  # noqa: F401
from mllm_cl.plan_run import (
    build,
    data_table_terms,
    device_count,
    parse_fit_args,
    read_strategy,
    read_tasks,
    run_size,
    table_bytes,
    task_steps,
)
from strategies.freeze import Full, Patterns, Recipe


@functools.lru_cache(maxsize=4)
def _meta_model(family: str, path: str):
    """The meta-device model of a config.json, built once per process (about a second for a 7B)."""
    fam = get_family(family)
    return build_meta_model(fam, load_config(fam, path))


def plan_setup(setup: Setup, config, label: str, model=None, path=None) -> dict:
    """Parameter counts and memory terms of `setup` on the architecture of `config` (or `model`)."""
    setup.check()
    fam = get_family(
        setup.family, {"processor_kwargs": setup.processor_kwargs} if setup.processor_kwargs else None
    )
    if model is None:
        model = _meta_model(fam.name, str(path)) if path is not None else build_meta_model(fam, config)
    arch = arch_of(fam, config, model, setup.recipe, setup.processor_kwargs)
    return {
        "family": fam.name,
        "config": label,
        "config_path": None if path is None else str(path),  # None: a tiny model built in memory
        "recipe": type(setup.recipe).__name__,
        "patterns": list(setup.recipe.patterns),
        "exclude": list(setup.recipe.exclude),
        "strategies": [type(s).__name__ for s in setup.strategies],
        "setup": {
            k: getattr(setup, k)
            for k in ("dtype", "precision", "micro_batch", "accumulate", "devices", "nodes", "strategy")
        }
        | {"seq_len": setup.seq_len, "gradient_checkpointing": setup.gradient_checkpointing},
        "fsdp1": {
            "sharding": setup.fsdp1_sharding,
            "whole_model": setup.fsdp1_whole_model,
            "cpu_offload": setup.cpu_offload,
        },
        "text": {"layers": arch.layers, "hidden": arch.hidden, "heads": arch.heads, "vocab": arch.vocab},
        "params": arch.params,
        "memory": estimate(setup, arch),
    }


def plan(
    family: str,
    config_path: str,
    recipe: Recipe,
    num_gpus: int = 1,
    micro_batch: int = 1,
    seq_len: int = 2048,
    dtype: str = "float32",
    precision: str = "bf16-mixed",
    strategy: str | None = None,
    gradient_checkpointing: bool = True,
    methods: list | None = None,
    accumulate: int = 1,
    nodes: int = 1,
) -> dict:
    """The plan of a setup given by arguments (the flag form); `methods` are Strategy objects.

    `strategy` defaults to "single" on one GPU and "fsdp2" (configs/trainer_fsdp_multigpu.yaml) on more.
    """
    fam = get_family(family)
    setup = Setup(
        family=fam.name, recipe=recipe, strategies=list(methods or []), dtype=dtype, precision=precision,
        micro_batch=micro_batch, accumulate=accumulate, devices=num_gpus, nodes=nodes,
        strategy=strategy or ("single" if num_gpus * nodes == 1 else "fsdp2"),
        gradient_checkpointing=gradient_checkpointing, seq_len=seq_len,
    )  # fmt: skip
    path = resolve_config_path(config_path)
    result = plan_setup(setup, load_config(fam, config_path), str(path), path=path)
    result["setup"]["seq_from"] = "--seq-len"
    return result


def memory(result: dict) -> dict[str, int]:
    """name -> bytes of the GPU terms of a plan, plus "total"."""
    terms = result["memory"]["terms"]
    return {t["name"]: t["bytes"] for t in terms if t["where"] == "gpu"} | {
        "total": result["memory"]["gpu_total"]
    }


# ---- the fit-YAML form ----------------------------------------------------------------------
def _model_config(model, override: str | None):
    """(HF config, a real tiny model or None, label, config.json path or None) of the run's model,
    without loading weights."""
    fam = get_family(model.family, model.family_options)
    if override:
        path = resolve_config_path(override)
        return load_config(fam, override), None, str(path), path
    if model.pretrained is None:
        tiny, _ = fam.build_tiny(model.tiny, model.tiny_seed)
        return tiny.config, tiny, f"tiny {model.tiny!r} model (random init, built in memory)", None
    path = checkpoint_config(model.pretrained)
    if path is None:
        raise ConfigError(
            f"model.pretrained {model.pretrained!r}: no config.json found (not a local folder, not a bundled "
            "or cached hub checkpoint); pass --model-config CONFIG_JSON"
        )
    return load_config(fam, str(path)), None, f"{model.pretrained} -> {path}", path


def plan_fit(fit_args: list[str], model_config=None, seq_len=None, step_time=None, gen_time=None) -> dict:
    """The plan of the run `fit_args` describes (``--config`` stack and overrides)."""
    cfg = parse_fit_args(fit_args)
    model, trainer, data = cfg.model, cfg.trainer, cfg.data
    notes: list[str] = []
    devices, nodes = device_count(trainer.devices, notes), int(trainer.num_nodes or 1)
    callbacks = [c for c in trainer.callbacks or [] if str(c.class_path).endswith(".WiSEFT")]
    methods = build(list(model.strategies or [])) + build(callbacks)
    accumulate = int(trainer.accumulate_grad_batches or 1)
    tasks, evals = read_tasks(data)
    task_steps(tasks, data.batch_size, devices * nodes, accumulate)
    processor_kwargs = dict((model.family_options or {}).get("processor_kwargs") or {})
    setup = Setup(
        family=model.family, recipe=build(model.recipe) if model.recipe else Full(), strategies=methods,
        dtype=model.dtype, precision=trainer.precision or "32-true", micro_batch=data.batch_size,
        accumulate=accumulate, devices=devices, nodes=nodes, gradient_checkpointing=model.gradient_checkpointing,
        seq_len=seq_len or data.max_length, num_workers=data.num_workers, processor_kwargs=processor_kwargs,
        task_samples=[t["samples"] for t in tasks], host_terms=data_table_terms(tasks), table_bytes=table_bytes,
        **read_strategy(trainer.strategy, devices * nodes),
    )  # fmt: skip
    config, tiny, label, path = _model_config(model, model_config)
    result = plan_setup(setup, config, label, tiny, path)
    if seq_len:
        result["setup"]["seq_from"] = f"--seq-len; data.max_length is {data.max_length}"
    result["run"] = run_size(tasks, evals, methods, devices * nodes, step_time, gen_time)
    result["tasks"] = [
        {"name": t["name"], "rows": t["size"].rows, "rows_text": t["size"].text(), "note": t["size"].note,
         "steps": t["n_steps"], "samples": t["samples"]}
        for t in tasks
    ]  # fmt: skip
    result["evals"] = [
        {"name": e["name"], "rows": e["size"].rows, "rows_text": e["size"].text(), "note": e["size"].note}
        for e in evals
    ]
    result["notes"] = notes
    return result


# ---- command line ---------------------------------------------------------------------------
class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + message
        raise _UsageError(message)


def recipe_names() -> list[str]:
    return sorted(
        n for n in strategies.__all__ if n != "Recipe" and issubclass(getattr(strategies, n), Recipe)
    )


def make_recipe(name: str | None, patterns: list[str] | None, exclude: list[str] | None) -> Recipe:
    """A recipe by short class name (``SAProj``), or `Patterns` from regexes."""
    if patterns:
        if name not in (None, "Patterns"):
            raise ConfigError(f"--patterns builds a Patterns recipe; drop --recipe {name}")
        return Patterns(patterns, exclude)
    if name is None or name == "Patterns":
        raise ConfigError("give --recipe NAME or --patterns REGEX ...")
    if name not in recipe_names():
        raise ConfigError(
            f"recipe {name!r} unknown; choose one of {recipe_names()} or use --patterns REGEX ..."
        )
    try:
        return getattr(strategies, name)(exclude=exclude) if exclude else getattr(strategies, name)()
    except TypeError as err:  # a recipe with required arguments (LastLayers(n))
        raise ConfigError(f"recipe {name} needs arguments ({err}); use --patterns REGEX ... instead") from err


def _flag_form(argv: list[str]) -> dict:
    p = _Parser(
        prog="mllm_cl plan", description="Parameters and memory per GPU of a setup.", allow_abbrev=False
    )
    p.add_argument("--family", required=True, help=f"one of {', '.join(FAMILIES)}")
    p.add_argument(
        "--config", help="config.json, a checkpoint folder, or a bundled name (default: by family)"
    )
    p.add_argument("--recipe", help=f"recipe class name: {', '.join(recipe_names())}")
    p.add_argument(
        "--patterns", nargs="+", metavar="REGEX", help="canonical-name regexes (a Patterns recipe)"
    )
    p.add_argument("--exclude", nargs="+", metavar="REGEX", help="regexes kept frozen")
    p.add_argument("--gpus", type=int, default=1, help="GPUs per node")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--accumulate", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument(
        "--dtype", default="float32", help="weights as loaded: float32 (default), bfloat16, float16"
    )
    p.add_argument("--precision", default="bf16-mixed", help="Lightning precision (default bf16-mixed)")
    p.add_argument("--strategy", help="single, ddp, fsdp1 or fsdp2 (default: single on 1 GPU, else fsdp2)")
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)
    if args.config and args.config.endswith((".yaml", ".yml")):
        raise ConfigError(
            f"--config {args.config} is a fit YAML: drop --family and its flags to plan that run"
        )
    result = plan(
        args.family, args.config or get_family(args.family).bundled_config,
        make_recipe(args.recipe, args.patterns, args.exclude), num_gpus=args.gpus, micro_batch=args.micro_batch,
        seq_len=args.seq_len, dtype=args.dtype, precision=args.precision, strategy=args.strategy,
        gradient_checkpointing=not args.no_gradient_checkpointing, accumulate=args.accumulate, nodes=args.nodes,
    )  # fmt: skip
    return result | {"_json": args.json}


def _fit_form(argv: list[str]) -> dict:
    p = _Parser(prog="mllm_cl plan", add_help=False, allow_abbrev=False)
    p.add_argument(
        "--model-config", help="config.json of the checkpoint (default: read from model.pretrained)"
    )
    p.add_argument(
        "--seq-len", type=int, help="tokens per sample for the estimate (default: data.max_length)"
    )
    p.add_argument("--step-time", type=float, help="seconds per optimizer step, for the wall time")
    p.add_argument(
        "--gen-time", type=float, help="seconds per generated answer on one GPU, for the wall time"
    )
    p.add_argument("--json", action="store_true")
    args, fit_args = p.parse_known_args(argv)
    result = plan_fit(fit_args, args.model_config, args.seq_len, args.step_time, args.gen_time)
    return result | {"_json": args.json}


USAGE = """usage: python -m mllm_cl plan --config FIT_YAML [--config ...] [--trainer.devices 8 ...]
                                [--model-config CONFIG_JSON] [--seq-len N] [--step-time S] [--gen-time S] [--json]
       python -m mllm_cl plan --family NAME (--recipe NAME | --patterns REGEX ...) [--gpus N] [--nodes N]
                                [--micro-batch B] [--accumulate A] [--seq-len N] [--dtype D] [--precision P]
                                [--strategy single|ddp|fsdp1|fsdp2] [--no-gradient-checkpointing] [--json]"""


def main(argv: list[str] | None = None) -> int:
    """``python -m mllm_cl plan ...``: print the plan; returns 0, or 2 after a one-line error."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE + "\n\n" + __doc__.split("\n\n")[2])
        return 0 if argv else 2
    try:
        result = _flag_form(argv) if "--family" in argv else _fit_form(argv)
    except ArgumentError as err:
        print(f"error: {argument_line(err)}", file=sys.stderr)
        return 2
    except (_UsageError, MllmClError, ValueError, TypeError, OSError) as err:
        print(f"error: {one_line(err) if isinstance(err, MllmClError) else err}", file=sys.stderr)
        return 2
    as_json = result.pop("_json")
    print(json.dumps(result, indent=2, default=str) if as_json else format_plan(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
