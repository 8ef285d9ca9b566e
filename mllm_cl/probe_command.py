"""``python -m mllm_cl probe``: the counting-bias probe (`mllm_cl.probe`) over saved checkpoints.

    python -m mllm_cl probe --config RUN/config.yaml --base \\
        --ckpt_path RUN/checkpoints/step-100.ckpt RUN/checkpoints/last.ckpt --sets count shape

Probes the named eval sets of the config's stream (tasks' eval sets and held-out sets; default: all)
with each checkpoint's trained weights (frozen ones come from the config, as in `export`), and with
the config's untrained model first when ``--base`` is given. Each probed model is one JSON line of
``--out`` (default: ``probe_checkpoints.jsonl`` next to the config): ``{"checkpoint", "sets":
{set: {number_mass, max_number_prob, max_number_logit, their _std, n}}}``; a table is printed.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from mllm_cl.commands import load_trained, parse_run
from mllm_cl.errors import ConfigError
from mllm_cl.probe import DEFAULT_MAX_NEW_TOKENS, probe


def probe_samples(config: str, names: list[str] | None, limit: int) -> dict[str, list[dict]]:
    """{set name: its first `limit` samples} for the named eval sets of `config`'s stream."""
    _, stream = parse_run(["--config", config])
    specs = {name: source for name, source, _, _ in stream.eval_specs()}
    if unknown := [n for n in names or [] if n not in specs]:
        raise ConfigError(f"probe --sets {unknown}: {config} has eval sets {sorted(specs)}")
    out = {}
    for name in names or list(specs):
        table = specs[name].load()
        out[name] = [table[i] for i in range(min(limit, len(table)))]
    return out


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mllm_cl probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the YAML the run was trained with")
    parser.add_argument("--ckpt_path", nargs="*", default=[], help="checkpoints written by fit")
    parser.add_argument("--base", action="store_true", help="also probe the config's model, untrained")
    parser.add_argument("--sets", nargs="+", help="eval set names of the stream (default: all)")
    parser.add_argument("--limit", type=int, default=64, help="samples per set (default 64)")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_new_tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, help="LMM_CL: 256")
    parser.add_argument("--ordinals", action="store_true", help="count word ordinals as number tokens")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help="JSON-lines output (default: probe_checkpoints.jsonl next to --config)")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if not os.path.isfile(args.config):
        raise ConfigError(f"--config {args.config}: file not found")
    targets = ([None] if args.base else []) + list(args.ckpt_path)
    if not targets:
        raise ConfigError("probe: give --ckpt_path CKPT [CKPT ...] and/or --base")
    samples = probe_samples(args.config, args.sets, args.limit)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.config)), "probe_checkpoints.jsonl")
    lines = []
    for ckpt in targets:
        module = load_trained(args.config, ckpt).to(args.device)
        stats = {
            name: probe(module, table, args.batch_size, args.max_new_tokens, args.ordinals)
            for name, table in samples.items()
        }
        lines.append(json.dumps({"checkpoint": ckpt or "base", "sets": stats}) + "\n")
        cells = ", ".join(f"{name} {s['number_mass']:.4f}" for name, s in stats.items())
        print(f"[mllm_cl] {ckpt or 'base'}: number mass {cells}")
        del module
    with open(out, "a", encoding="utf-8") as fh:
        fh.writelines(lines)
    print(f"[mllm_cl] wrote {out}")
    return 0
