"""Data: sources, the task stream datamodule and collation."""

from mllm_cl.data.benchmarks import Benchmark
from mllm_cl.data.sources import HFDataset, LlavaJson, Mix, Source, Synthetic
from mllm_cl.data.stream import EvalSet, Task, TaskStream

__all__ = [
    "Source",
    "LlavaJson",
    "HFDataset",
    "Synthetic",
    "Mix",
    "Benchmark",
    "Task",
    "EvalSet",
    "TaskStream",
]
