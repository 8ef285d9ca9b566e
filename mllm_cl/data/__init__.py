"""Data: sources, the task stream datamodule and collation.

The names below are loaded on first use (PEP 562), so importing a low-level module such as
`mllm_cl.data.collate` does not pull in the stream (and, through it, evaluation and checkpointing).
"""

import importlib

_EXPORTS = {
    "Benchmark": "benchmarks",
    "Source": "sources",
    "LlavaJson": "sources",
    "HFDataset": "sources",
    "Synthetic": "sources",
    "Mix": "sources",
    "Task": "stream",
    "EvalSet": "stream",
    "TaskStream": "stream",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mllm_cl.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"mllm_cl.data.{_EXPORTS[name]}"), name)


def __dir__():
    return sorted(__all__)
