"""Command line: LightningCLI (fit / validate / test) plus our own subcommands.

``python -m mllm_cl fit --config configs/llava_saproj.yaml`` trains the whole task stream;
``--print_config`` shows every option; ``--help`` is generated from the classes' docstrings.
Importing `strategies` here is what lets YAML name strategy classes by short name.
"""

from __future__ import annotations

import importlib
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from jsonargparse import ArgumentError  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402

import strategies  # noqa: E402,F401  (registers strategy classes for class_path resolution)
from mllm_cl.checkpointing import TaskCheckpoint, check_ckpt_file, prepare_fit  # noqa: E402
from mllm_cl.data.stream import TaskStream  # noqa: E402
from mllm_cl.errors import MllmClError  # noqa: E402
from mllm_cl.guards import argument_line, one_line  # noqa: E402
from mllm_cl.module import MLLMModule  # noqa: E402


class MllmCLI(LightningCLI):
    """LightningCLI with the toolkit's defaults: TensorBoard logs under runs/, one row per task."""

    def add_arguments_to_parser(self, parser):
        # `checkpoint.*`: last.ckpt at every task end (and every_n_train_steps) for `--ckpt_path last`.
        parser.add_lightning_class_args(TaskCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 0})
        parser.set_defaults(
            {
                "trainer.logger": {
                    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                    "init_args": {"save_dir": "runs", "name": "mllm_cl"},
                },
                "trainer.num_sanity_val_steps": 0,
                "trainer.log_every_n_steps": 10,
            }
        )

    def init_parser(self, **kwargs):
        # Raise instead of printing usage + a multi-line message; `main` prints it as one line.
        parser = super().init_parser(**kwargs)
        parser.exit_on_error = False
        return parser

    def _parse_ckpt_path(self):
        # Lightning reads hyperparameters from --ckpt_path while parsing: refuse a bad file in one line first.
        check_ckpt_file(self.config.get(self.config.get("subcommand") or "", {}).get("ckpt_path"))
        super()._parse_ckpt_path()

    def before_fit(self):
        # Safe loading, run-dir policy on resume, one-line checks before training (mllm_cl.checkpointing).
        prepare_fit(self.trainer, self.config_init["fit"])


# One registry: every subcommand, where it lives and its one-line help. Lightning's subcommands run
# through `MllmCLI`; the others are imported by name only when called, so `report` and `plan` start
# without loading models, and no library module needs to import this one.
COMMANDS: dict[str, tuple[str | None, str]] = {
    "fit": (None, "train the whole task stream; writes the accuracy matrix, checkpoints, TensorBoard logs"),
    "validate": (None, "score a checkpoint (or the config's model) on every eval set"),
    "test": (None, "same as validate, through Lightning's test loop"),
    "plan": ("mllm_cl.plan:main", "trainable parameters and memory per GPU of a setup, before you launch"),
    "report": ("mllm_cl.report:main", "compare runs: tables, continual-learning measures, plots, report.md"),
    "export": ("mllm_cl.commands:export_main", "write a trained run as a Hugging Face checkpoint"),
    "cache": ("mllm_cl.commands:cache_main", "pre-build the processed-data caches of a fit config"),
    "probe": ("mllm_cl.probe_command:main", "counting-bias probe (number-token mass) over saved checkpoints"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return (
        "usage: python -m mllm_cl <command> [options]\n\ncommands:\n"
        + "\n".join(lines)
        + "\n\n`python -m mllm_cl <command> --help` lists a command's options."
    )


def _command(target: str):
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)


def main(args: list[str] | None = None) -> None:
    """Entry point of ``python -m mllm_cl`` and ``mllm-cl``: one error policy for every subcommand.

    A `MllmClError` or a config-parsing error prints one ``error: ...`` line and exits 2.
    """
    argv = sys.argv[1:] if args is None else list(args)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        sys.exit(0 if argv else 2)
    target = COMMANDS.get(argv[0], (None, ""))[0]
    try:
        if target is not None:
            sys.exit(_command(target)(argv[1:]))
        MllmCLI(MLLMModule, TaskStream, args=argv, save_config_kwargs={"overwrite": True})
    except (MllmClError, ArgumentError) as err:
        print(
            f"error: {one_line(err) if isinstance(err, MllmClError) else argument_line(err)}", file=sys.stderr
        )
        sys.exit(2)


if __name__ == "__main__":
    main()
