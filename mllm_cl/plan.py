"""Plan a run before renting GPUs: trainable parameters per component and memory per GPU.

``python -m mllm_cl plan --family llava --config mllm_cl/model_configs/llava-1.5-7b-hf.json \\
--recipe SAProj --gpus 8 --micro-batch 4 --seq-len 2048``

The real architecture is built from a ``config.json`` on the meta device (no weights, no memory, no
download), the recipe is applied by canonical name exactly as `Recipe.setup` does, and memory is
estimated per GPU. Bundled configs (`bundled_configs()`): each family's `Family.bundled_config`
(``llava-1.5-7b-hf``, ``qwen2.5-vl-7b-instruct``, ``llava-onevision-qwen2-7b-ov-hf``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from importlib import resources
from pathlib import Path

import torch

import strategies
from mllm_cl.errors import ConfigError, MllmClError
from mllm_cl.families import COMPONENTS, FAMILIES, get_family
from strategies.freeze import Patterns, Recipe

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
GIB = 1024**3


def bundled_configs() -> dict[str, Path]:
    """Name (file stem) -> path of the config.json copies shipped in ``mllm_cl/model_configs``."""
    root = resources.files("mllm_cl").joinpath("model_configs")
    return {Path(f.name).stem: Path(str(f)) for f in root.iterdir() if f.name.endswith(".json")}


def resolve_config_path(config_path: str) -> Path:
    """A JSON file, a checkpoint directory holding ``config.json``, or a bundled config's name."""
    path = Path(config_path)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        return path
    bundled = bundled_configs()
    if config_path.removesuffix(".json") in bundled:
        return bundled[config_path.removesuffix(".json")]
    raise ConfigError(
        f"config {config_path!r} not found (a config.json, a folder holding one, or one of {sorted(bundled)})"
    )


def load_config(family, config_path: str):
    """The family's HF config class built from a config.json (transformers 5.x converts legacy rope keys)."""
    path = resolve_config_path(config_path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from err
    config_class = family.model_class.config_class
    if data.get("model_type", config_class.model_type) != config_class.model_type:
        raise ConfigError(
            f"{path} is a {data['model_type']!r} config, family {family.name!r} needs {config_class.model_type!r}"
        )
    return config_class(**data)


def build_meta_model(family, config):
    """The real architecture with parameters on the meta device (shapes only)."""
    with torch.device("meta"):
        return family.model_class(config)


def count_parameters(family, model, recipe: Recipe) -> dict[str, dict[str, int]]:
    """component -> {"trainable", "total"}, plus "all"; trainable = `recipe.selects(canonical name)`."""
    names = family.canonical_names(model)
    recipe.resolve(names.values())  # patterns that depend on the model (LastLayers)
    counts = {c: {"trainable": 0, "total": 0} for c in (*COMPONENTS, "all")}
    for real, param in model.named_parameters():
        canonical = names[real]
        for key in (canonical.split(".", 1)[0], "all"):
            counts[key]["total"] += param.numel()
            if recipe.selects(canonical):
                counts[key]["trainable"] += param.numel()
    if counts["all"]["trainable"] == 0:
        raise ConfigError(
            f"recipe {type(recipe).__name__} (patterns {list(recipe.patterns)}) matches no parameter of {family.name}"
        )
    return counts


def _shard(nbytes: int, num_gpus: int) -> int:
    return math.ceil(nbytes / num_gpus)


def plan(
    family: str,
    config_path: str,
    recipe: Recipe,
    num_gpus: int = 1,
    micro_batch: int = 1,
    seq_len: int = 2048,
    dtype: str = "bfloat16",
    optimizer_bytes_per_param: int = 8,
    master_weights: bool = False,
    gradient_checkpointing: bool = True,
) -> dict:
    """Parameter counts and estimated memory per GPU (bytes) of one training setup.

    Notation: P = all parameters, T = trainable parameters (canonical names selected by `recipe`),
    N = `num_gpus`, d = bytes per element of `dtype` (2 for bf16/fp16), b = `micro_batch` (per GPU),
    s = `seq_len` (text + image tokens), and from the text config L = decoder layers, h = hidden size,
    a = attention heads, V = vocabulary size.

    * weights     = P * d / N. FSDP full shard: every parameter, frozen ones included, is split over N.
    * gradients   = T * d / N. Assumes FSDP2 (`fully_shard`, per-parameter DTensor sharding) or any
      setup where frozen parameters get no gradient buffer; FSDP1 flat parameters mixing frozen and
      trainable tensors pay gradients for the whole flat parameter (litgpt #1538).
    * optimizer   = T * (`optimizer_bytes_per_param` + 4 if `master_weights`) / N. AdamW keeps two fp32
      moments (8 bytes); `master_weights` adds an fp32 copy of the trainable parameters.
    * activations (per GPU, not sharded: every rank runs its own micro-batch). Korthikanti et al. 2022
      ("Reducing Activation Recomputation in Large Transformer Models") give one layer's activations as
      s*b*h*(34 + 5*a*s/h) bytes for 16-bit activations; we scale it by d/2.
        with gradient checkpointing:  L * s*b*h*d  (each layer's saved input)  +  one layer in full;
        without:                       L * s*b*h*(34 + 5*a*s/h) * d/2.
      The 5*a*s/h term is the materialised attention matrix; flash/SDPA kernels do not store it, so the
      estimate is conservative there. It assumes a GPT 4h MLP (SwiGLU MLPs differ by a few s*b*h).
    * logits      = b*s*V*(d + 4): the lm_head output in `dtype` plus the fp32 copy the loss upcasts to.
    * total       = weights + gradients + optimizer + activations + logits.

    Not counted: the vision tower's activations (its tokens are a few hundred per image), FSDP's
    all-gathered unsharded layers (about two layers' weights), the CUDA context and caching-allocator
    fragmentation (budget 2-4 GiB per GPU for them).
    """
    if num_gpus < 1 or micro_batch < 1 or seq_len < 1:
        raise ConfigError("num_gpus, micro_batch and seq_len must be positive")
    if dtype not in DTYPE_BYTES:
        raise ConfigError(f"dtype {dtype!r} unknown; choose one of {sorted(DTYPE_BYTES)}")
    fam = get_family(family)
    config = load_config(fam, config_path)
    model = build_meta_model(fam, config)
    params = count_parameters(fam, model, recipe)

    d = DTYPE_BYTES[dtype]
    text = config.get_text_config()
    layers, hidden, heads, vocab = (
        text.num_hidden_layers,
        text.hidden_size,
        text.num_attention_heads,
        text.vocab_size,
    )
    total, trainable = params["all"]["total"], params["all"]["trainable"]
    sbh = seq_len * micro_batch * hidden
    full_layer = math.ceil(sbh * (34 + 5 * heads * seq_len / hidden) * d / 2)
    if gradient_checkpointing:
        activations = layers * sbh * d + full_layer
    else:
        activations = layers * full_layer
    memory = {
        "weights": _shard(total * d, num_gpus),
        "gradients": _shard(trainable * d, num_gpus),
        "optimizer": _shard(trainable * (optimizer_bytes_per_param + 4 * master_weights), num_gpus),
        "activations": activations,
        "logits": micro_batch * seq_len * vocab * (d + 4),
    }
    memory["total"] = sum(memory.values())
    return {
        "family": fam.name,
        "config": str(resolve_config_path(config_path)),
        "recipe": type(recipe).__name__,
        "patterns": list(recipe.patterns),
        "exclude": list(recipe.exclude),
        "num_gpus": num_gpus,
        "micro_batch": micro_batch,
        "seq_len": seq_len,
        "dtype": dtype,
        "optimizer_bytes_per_param": optimizer_bytes_per_param,
        "master_weights": master_weights,
        "gradient_checkpointing": gradient_checkpointing,
        "text": {"layers": layers, "hidden": hidden, "heads": heads, "vocab": vocab},
        "params": params,
        "memory": memory,
    }


def format_plan(result: dict) -> str:
    """A table of trainable / total parameters per component, then memory per GPU in GiB."""
    r = result
    lines = [
        f"family {r['family']}  config {r['config']}",
        f"recipe {r['recipe']}  patterns {r['patterns']}"
        + (f"  exclude {r['exclude']}" if r["exclude"] else ""),
        "",
        f"{'component':<10} {'trainable':>15} {'total':>15} {'trainable %':>12}",
    ]
    for comp, c in r["params"].items():
        pct = 100 * c["trainable"] / c["total"] if c["total"] else 0.0
        lines.append(f"{comp:<10} {c['trainable']:>15,} {c['total']:>15,} {pct:>11.2f}%")
    n, d = r["num_gpus"], DTYPE_BYTES[r["dtype"]]
    opt = f"{r['optimizer_bytes_per_param']}" + (" + 4 master" if r["master_weights"] else "")
    ckpt = "on" if r["gradient_checkpointing"] else "off"
    notes = {
        "weights": f"all params x {d} B / {n} (FSDP full shard)",
        "gradients": f"trainable x {d} B / {n} (FSDP2: frozen params get none)",
        "optimizer": f"trainable x ({opt}) B / {n}",
        "activations": f"L={r['text']['layers']} decoder layers, checkpointing {ckpt} (Korthikanti et al.)",
        "logits": f"b x s x V={r['text']['vocab']:,} x ({d} + 4 fp32) B",
        "total": "excl. CUDA context, FSDP gather buffers, fragmentation",
    }
    lines += [
        "",
        f"memory per GPU: {n} GPU(s), micro-batch {r['micro_batch']}, seq {r['seq_len']}, {r['dtype']}",
    ]
    for key, nbytes in r["memory"].items():
        lines.append(f"  {key:<12} {nbytes / GIB:>9.2f} GiB   {notes[key]}")
    return "\n".join(lines)


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


def main(argv: list[str] | None = None) -> int:
    """``python -m mllm_cl plan ...``: print the plan; returns 0, or 2 after a one-line error."""
    p = _Parser(prog="mllm_cl plan", description="Trainable parameters and memory per GPU of a setup.")
    p.add_argument("--family", required=True, help=f"one of {', '.join(FAMILIES)}")
    p.add_argument(
        "--config", help="config.json, a checkpoint folder, or a bundled name (default: by family)"
    )
    p.add_argument("--recipe", help=f"recipe class name: {', '.join(recipe_names())}")
    p.add_argument(
        "--patterns", nargs="+", metavar="REGEX", help="canonical-name regexes (a Patterns recipe)"
    )
    p.add_argument("--exclude", nargs="+", metavar="REGEX", help="regexes kept frozen")
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--dtype", default="bfloat16", help="bfloat16, float16 or float32")
    p.add_argument("--optimizer-bytes", type=int, default=8, help="optimizer state bytes per trainable param")
    p.add_argument("--master-weights", action="store_true", help="fp32 master copy of trainable params")
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    try:
        args = p.parse_args(sys.argv[1:] if argv is None else argv)
        result = plan(
            args.family,
            args.config or get_family(args.family).bundled_config,
            make_recipe(args.recipe, args.patterns, args.exclude),
            num_gpus=args.gpus,
            micro_batch=args.micro_batch,
            seq_len=args.seq_len,
            dtype=args.dtype,
            optimizer_bytes_per_param=args.optimizer_bytes,
            master_weights=args.master_weights,
            gradient_checkpointing=not args.no_gradient_checkpointing,
        )
    except (_UsageError, MllmClError, ValueError, TypeError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else format_plan(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
