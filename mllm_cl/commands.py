"""Subcommands that read a run's fit YAML: `export` and `cache`.

They parse the config with the same `MllmCLI` as `fit`, so every option, `--config` stack and
command-line override means what it means for training. `mllm_cl.cli` dispatches to them by name.
"""

from __future__ import annotations

import argparse
import os
import time

from mllm_cl import checkpointing
from mllm_cl.cli import MllmCLI
from mllm_cl.context import TaskData
from mllm_cl.data.cache import Tokenized, cache_root
from mllm_cl.data.stream import TaskStream
from mllm_cl.errors import ConfigError
from mllm_cl.export import export_hf
from mllm_cl.module import MLLMModule


def parse_run(args: list[str]):
    """(module, stream) of a fit config, parsed exactly as `fit` would, without running anything."""
    cli = parse_cli(args)
    return cli.model, cli.datamodule


def parse_cli(args: list[str]) -> MllmCLI:
    """The CLI of a fit config with its model, stream and trainer built (nothing run)."""
    return MllmCLI(MLLMModule, TaskStream, args=args, run=False)


def load_trained(config: str, ckpt_path: str | None):
    """The `MLLMModule` of `config` with the trained weights and strategy state of `ckpt_path`."""
    module, _ = parse_run(["--config", config])
    module.configure_model()
    if ckpt_path:
        checkpointing.check_ckpt_file(ckpt_path)
        checkpoint = checkpointing.load_any(ckpt_path)  # a .ckpt file or an FSDP2 checkpoint folder
        module.on_load_checkpoint(checkpoint)  # refuses another family / recipe; restores strategies
        module.load_state_dict(checkpoint["state_dict"], strict=False)  # frozen weights come from config
    return module


def export_main(argv: list[str]) -> int:
    """``python -m mllm_cl export --config CONFIG --ckpt_path CKPT --out DIR``."""
    parser = argparse.ArgumentParser(
        prog="python -m mllm_cl export", description="Write a trained run as a Hugging Face checkpoint."
    )
    parser.add_argument("--config", required=True, help="the YAML the run was trained with")
    parser.add_argument("--ckpt_path", help="a .ckpt written by fit (e.g. .../checkpoints/last.ckpt)")
    parser.add_argument("--out", required=True, help="output directory (Hugging Face layout)")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.config):
        raise ConfigError(f"--config {args.config}: file not found")
    module = load_trained(args.config, args.ckpt_path)
    export_hf(module.model, module.processor, args.out, module.family)
    print(f"[mllm_cl] exported {module.family.name} to {args.out}")
    return 0


def cache_main(argv: list[str]) -> int:
    """``python -m mllm_cl cache --config CONFIG [...]``: build the processed-data caches of a run.

    Takes the same options as `fit` and tokenises every training table, eval set and DataHybrid
    source into `data.cache_dir` in this one process (with `data.num_workers` workers), so that a
    multi-GPU `fit` starts at once instead of keeping every GPU waiting while rank 0 tokenises.
    """
    if not argv or argv[0] in ("-h", "--help"):
        print(cache_main.__doc__)
        return 0 if argv else 2
    start = time.perf_counter()
    cli = parse_cli(argv)
    module, stream = cli.model, cli.datamodule
    stream.cache_processed = True
    stream.prepare_tables(module, "fit")
    # The fit's trainer (devices × nodes, gradient accumulation) sets how many samples each task
    # consumes, hence what a DataHybrid draws: the same draws as the multi-GPU fit will make.
    stream.trainer = cli.trainer
    extra = [t for s in module.all_strategies for t in s.cached_tables(TaskData(stream))]
    tables = [*stream._train, *(column.table for column in stream.columns), *extra]
    cached = sum(isinstance(t, Tokenized) for t in tables)
    root = stream.cache_dir or cache_root()
    print(
        f"[mllm_cl] {cached} of {len(tables)} tables cached under {root} in {time.perf_counter() - start:.1f} s"
    )
    return 0
