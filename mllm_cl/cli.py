"""Command line: LightningCLI (fit / validate / test) plus our own subcommands.

``python -m mllm_cl fit --config configs/llava_saproj.yaml`` trains the whole task stream;
``--print_config`` shows every option; ``--help`` is generated from the classes' docstrings.
Importing `strategies` here is what lets YAML name strategy classes by short name.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from lightning.pytorch.cli import LightningCLI  # noqa: E402

import strategies  # noqa: E402,F401  (registers strategy classes for class_path resolution)
from mllm_cl.data.stream import TaskStream  # noqa: E402
from mllm_cl.errors import MllmClError  # noqa: E402
from mllm_cl.module import MLLMModule  # noqa: E402


class MllmCLI(LightningCLI):
    """LightningCLI with the toolkit's defaults: TensorBoard logs under runs/, one row per task."""

    def add_arguments_to_parser(self, parser):
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


def main(args: list[str] | None = None) -> None:
    """Entry point of ``python -m mllm_cl`` and ``mllm-cl``."""
    argv = sys.argv[1:] if args is None else args
    if argv and argv[0] == "report":
        from mllm_cl.report import main as report_main

        sys.exit(report_main(argv[1:]))
    if argv and argv[0] == "plan":
        from mllm_cl.plan import main as plan_main

        sys.exit(plan_main(argv[1:]))
    try:
        MllmCLI(
            MLLMModule,
            TaskStream,
            args=argv,
            save_config_kwargs={"overwrite": True},
        )
    except MllmClError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
