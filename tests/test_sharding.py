"""Throughput switches and sharding helpers on tiny real models: checkpointing, accumulation,
attention checks, workers, torch.compile, and the FSDP1 / bf16 path on a GPU."""

from __future__ import annotations

import time

import lightning as L
import pytest
import torch

from mllm_cl.data import Synthetic, Task, TaskStream
from mllm_cl.errors import ConfigError
from mllm_cl.module import MLLMModule
from mllm_cl.sharding import LayerWiseFSDP, block_modules, check_attn_implementation, shard_units
from strategies.freeze import SAProj
from tests.helpers import quiet_trainer


def tiny_stream(steps: int, **kwargs) -> TaskStream:
    data = Synthetic("colour", n=16, seed=3, image_size=32)
    return TaskStream(tasks=[Task("colour", train=data, eval=data, steps=steps)], eval_limit=4, **kwargs)


def test_gradient_checkpointing_with_saproj_reaches_every_trainable_param():
    # Frozen embeddings feed checkpointed layers: with reentrant checkpointing q/k/v/o got no grad.
    module = MLLMModule(family="llava", recipe=SAProj(), gradient_checkpointing=True)
    module.configure_model()
    assert module.model.is_gradient_checkpointing
    stream = tiny_stream(1, batch_size=4)
    stream._train = [Synthetic("colour", n=4, seed=3, image_size=32).load()]
    from mllm_cl.data.collate import Encoder

    enc = Encoder(module.family, module.processor, 512, "skip")
    batch = enc.collate([enc.encode_train(s) for s in stream._train[0]])
    module.model.train()
    module(batch).loss.backward()
    trainable = {n: p for n, p in module.model.named_parameters() if p.requires_grad}
    assert trainable and all(".self_attn." in n for n in trainable)
    missing = [n for n, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


class CountBatches(L.Callback):
    def __init__(self):
        self.micro = 0

    def on_train_batch_end(self, trainer, *args):
        self.micro += 1


def test_accumulation_runs_steps_times_accumulate_micro_batches(tmp_path):
    counter = CountBatches()
    module = MLLMModule(family="llava", recipe=SAProj(), lr=1e-3)
    stream = tiny_stream(3, batch_size=2, eval_batch_size=4)
    t = quiet_trainer(tmp_path, accumulate_grad_batches=2, callbacks=[counter])
    t.fit(module, datamodule=stream)
    assert t.global_step == 3  # optimizer steps = task steps
    assert counter.micro == 6  # 2 micro-batches per step


def test_flash_attention_without_the_package_is_one_line_config_error():
    pytest.importorskip("transformers")
    try:
        import flash_attn  # noqa: F401

        pytest.skip("flash-attn is installed here")
    except ImportError:
        pass
    with pytest.raises(ConfigError, match="flash-attn"):
        MLLMModule(family="llava", attn_implementation="flash_attention_2")
    with pytest.raises(ConfigError, match="attn_implementation"):
        check_attn_implementation("fast")
    check_attn_implementation("sdpa")


def test_fit_with_two_workers(tmp_path):
    module = MLLMModule(family="llava", recipe=SAProj(), lr=1e-3)
    stream = tiny_stream(2, batch_size=4, eval_batch_size=4, num_workers=2)
    t = quiet_trainer(tmp_path)
    t.fit(module, datamodule=stream)
    assert t.global_step == 2 and len(module.results.rows) == 2


def test_shard_units_cover_blocks_and_roots_children_first():
    for family in ("llava", "qwen2_5_vl"):
        module = MLLMModule(family=family, recipe=SAProj())
        module.configure_model()
        units = shard_units(module)
        blocks = block_modules(module)
        assert blocks and units[: len(blocks)] == blocks
        names = {id(m): n for n, m in module.model.named_modules()}
        later = [names[id(u)] for u in units[len(blocks) :]]
        # A parent is sharded after its children (fully_shard requires it).
        for i, name in enumerate(later):
            assert not any(other.startswith(name + ".") for other in later[i + 1 :]), later
        assert module.model.get_input_embeddings() in units


@pytest.mark.slow
def test_compile_fit(tmp_path):
    module = MLLMModule(family="llava", recipe=SAProj(), lr=1e-3, compile=True)
    t0 = time.perf_counter()
    t = quiet_trainer(tmp_path)
    t.fit(module, datamodule=tiny_stream(2, batch_size=4, eval_batch_size=4))
    assert t.global_step == 2 and len(module.results.rows) == 2
    assert all(hasattr(b, "_compiled_call_impl") and b._compiled_call_impl for b in block_modules(module))
    print(f"compile fit: {time.perf_counter() - t0:.1f}s")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fsdp1_bf16_on_gpu(tmp_path):
    module = MLLMModule(family="llava", recipe=SAProj(), lr=1e-3, gradient_checkpointing=True)
    t = L.Trainer(
        accelerator="gpu", devices=1, strategy=LayerWiseFSDP(), precision="bf16-mixed", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, default_root_dir=str(tmp_path),
    )  # fmt: skip
    t.fit(module, datamodule=tiny_stream(2, batch_size=4, eval_batch_size=4))
    assert t.global_step == 2 and len(module.results.rows) == 2
    opt_params = [p for g in t.optimizers[0].param_groups for p in g["params"]]
    assert opt_params and all(p.requires_grad for p in opt_params)
