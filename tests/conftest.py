"""Shared fixtures: tiny real models (LLaVA, Qwen2.5-VL) and a per-session synthetic-data cache.

Tests build the genuine HF classes from small configs (`Family.build_tiny`), offline. Recipes
mutate `requires_grad`, so tests that apply a recipe build their own model (an `MLLMModule`); the
shared models below are handed out through `tiny`, which restores `requires_grad` afterwards.
"""

from __future__ import annotations

import os

import pytest
import torch

from mllm_cl.families import get_family

FAMILY_NAMES = ("llava", "qwen2_5_vl")

# One intra-op thread: the tiny models gain nothing from two, and with two threads on a 2-core
# machine that has any other load, OpenMP barriers make each small matmul 10-30x slower.
torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def synthetic_cache(tmp_path_factory):
    """Point $MLLM_CL_CACHE at a session temp dir so synthetic data never goes to $HOME."""
    patch = pytest.MonkeyPatch()
    folder = tmp_path_factory.mktemp("mllm_cl_cache")
    patch.setenv("MLLM_CL_CACHE", str(folder))
    yield folder
    patch.undo()


@pytest.fixture(scope="session")
def tiny_llava():
    """(model, processor) of a randomly initialised tiny LLaVA-1.5."""
    return get_family("llava").build_tiny("tiny")


@pytest.fixture(scope="session")
def tiny_qwen():
    """(model, processor) of a randomly initialised tiny Qwen2.5-VL."""
    return get_family("qwen2_5_vl").build_tiny("tiny")


@pytest.fixture(params=FAMILY_NAMES)
def tiny(request):
    """(family, model, processor) for each family; requires_grad is restored after the test."""
    model, processor = request.getfixturevalue("tiny_llava" if request.param == "llava" else "tiny_qwen")
    yield get_family(request.param), model, processor
    for param in model.parameters():
        param.requires_grad_(True)
