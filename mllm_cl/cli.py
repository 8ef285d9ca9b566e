"""Command line: LightningCLI (fit / validate / test) plus our own subcommands.

``python -m mllm_cl fit --config configs/llava_saproj.yaml`` trains the whole task stream;
``--print_config`` shows every option; ``--help`` is generated from the classes' docstrings.
Importing `strategies` here is what lets YAML name strategy classes by short name.
"""

from __future__ import annotations

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


def main(args: list[str] | None = None) -> None:
    """Entry point of ``python -m mllm_cl`` and ``mllm-cl``."""
    argv = sys.argv[1:] if args is None else args
    if argv and argv[0] == "report":
        from mllm_cl.report import main as report_main

        sys.exit(report_main(argv[1:]))
    if argv and argv[0] == "plan":
        from mllm_cl.plan import main as plan_main

        sys.exit(plan_main(argv[1:]))
    if argv and argv[0] == "export":
        from mllm_cl.export import main as export_main

        sys.exit(export_main(argv[1:]))
    try:
        if argv and argv[0] == "cache":
            from mllm_cl.data.cache import main as cache_main

            sys.exit(cache_main(argv[1:]))
        MllmCLI(
            MLLMModule,
            TaskStream,
            args=argv,
            save_config_kwargs={"overwrite": True},
        )
    except (MllmClError, ArgumentError) as err:
        print(
            f"error: {one_line(err) if isinstance(err, MllmClError) else argument_line(err)}", file=sys.stderr
        )
        sys.exit(2)


if __name__ == "__main__":
    main()
