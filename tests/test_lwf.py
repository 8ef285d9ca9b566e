"""LwF (strategies/lwf.py): answer-token mask, the KL value by hand, gradients, λ = 0, checkpoints."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from mllm_cl.data import Synthetic, Task, TaskStream
from mllm_cl.data.collate import Encoder
from mllm_cl.module import MLLMModule
from strategies.freeze import SAProj
from strategies.lwf import LwF, answer_logits, distillation
from tests.helpers import WeightSnapshots, quiet_trainer

FAMILIES = ["llava", "qwen2_5_vl"]


def built(family: str, strategies=None) -> MLLMModule:
    module = MLLMModule(
        family=family, recipe=SAProj(), strategies=strategies or [], lr=1e-2, warmup_ratio=0.0
    )
    module.configure_model()
    return module


def real_batch(module: MLLMModule, n: int = 4) -> dict:
    encoder = Encoder(module.family, module.processor, 512, "skip")
    samples = Synthetic("count", n=n, seed=1, image_size=32).load()
    return encoder.collate([encoder.encode_train(samples[i]) for i in range(n)])


def nudge(module: MLLMModule, scale: float = 0.05) -> None:
    """Move the trainable weights away from the teacher (a seeded stand-in for a few steps)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("family", FAMILIES)
def test_mask_selects_exactly_the_answer_tokens(family):
    module = built(family)
    batch = real_batch(module)
    labels = batch["labels"]
    b, s = labels.shape
    # Position-coded logits: row (i, t) holds t, so the selected rows tell which positions were kept.
    logits = torch.arange(s, dtype=torch.float32).view(1, s, 1).expand(b, s, 3)
    rows = answer_logits(logits, labels)[:, 0].long()
    want = [t for i in range(b) for t in range(s - 1) if labels[i, t + 1] != -100]
    assert rows.tolist() == want and len(want) > 0
    tok = module.processor.tokenizer
    for i in range(b):
        answer = tok.decode(labels[i][labels[i] != -100])
        prompt_part = tok.decode(batch["input_ids"][i][labels[i] == -100])
        assert answer.strip().startswith(("0", "1", "2", "3", "4", "5", "6", "7", "8", "9")), answer
        assert "how many" in prompt_part.lower() and "how many" not in answer.lower()


@pytest.mark.parametrize("family", FAMILIES)
def test_kl_is_zero_at_task_start_and_matches_a_hand_computation(family):
    module = built(family)
    lwf = LwF(lam=0.7, temperature=2.0)
    lwf.on_task_start(module.context, 0)
    batch = real_batch(module)
    module.model.eval()
    term = lwf.loss(module.context, batch, module(batch))
    assert term.requires_grad and abs(term.item()) < 1e-6

    teacher_model = copy.deepcopy(module.model)  # the test may keep a second model; LwF does not
    nudge(module)
    student = module(batch).logits
    term = lwf.loss(module.context, batch, module(batch))
    with torch.no_grad():
        teacher = teacher_model(**{k: v for k, v in batch.items()}).logits
    labels, total, count = batch["labels"], 0.0, 0
    for i in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            if labels[i, t + 1] == -100:
                continue
            p = F.softmax(teacher[i, t].double() / 2.0, -1)
            q = F.softmax(student[i, t].double() / 2.0, -1)
            total, count = total + float((p * (p.log() - q.log())).sum()), count + 1
    assert term.item() > 1e-4
    assert term.item() == pytest.approx(0.7 * 4.0 * total / count, rel=1e-4)


def test_gradients_reach_only_trainable_parameters():
    module = built("llava")
    lwf = LwF()
    lwf.on_task_start(module.context, 0)
    nudge(module)
    batch = real_batch(module)
    lwf.loss(module.context, batch, module(batch)).backward()
    for name, p in module.model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    assert all(not t.requires_grad and t.grad is None for t in lwf.teacher.values())
    trainable = sum(p.numel() for p in module.model.parameters() if p.requires_grad)
    assert sum(t.numel() for t in lwf.teacher.values()) == trainable  # only trainable weights are copied


def test_the_in_place_teacher_pass_leaves_the_student_gradient_exact():
    """The teacher pass exchanges weights between the student's forward and backward; the gradient of
    CE + LwF must equal the one computed with a separate teacher model."""
    module = built("llava")
    lwf = LwF(lam=1.0)
    lwf.on_task_start(module.context, 0)
    teacher_model = copy.deepcopy(module.model)
    nudge(module)
    batch = real_batch(module)
    module.model.eval()  # no dropout: both passes see the same function

    outputs = module(batch)
    (outputs.loss + lwf.loss(module.context, batch, outputs)).backward()
    ours = {n: p.grad.clone() for n, p in module.model.named_parameters() if p.requires_grad}
    module.model.zero_grad(set_to_none=True)

    outputs = module(batch)
    with torch.no_grad():
        teacher = teacher_model(**{k: v for k, v in batch.items() if k != "skipped"}).logits
    labels = batch["labels"]
    reference = distillation(answer_logits(outputs.logits, labels), answer_logits(teacher, labels), 2.0)
    (outputs.loss + reference).backward()
    for name, p in module.model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(ours[name], p.grad, rtol=1e-5, atol=1e-7), name
    assert all(torch.equal(v, teacher_model.get_parameter(n)) for n, v in lwf.teacher.items())


def fit(strategies, tmp_path, steps: int = 3) -> tuple[MLLMModule, L.Trainer]:
    L.seed_everything(0)
    module = MLLMModule(family="llava", recipe=SAProj(), strategies=strategies, lr=1e-2, warmup_ratio=0.0)

    def src(seed):
        return Synthetic("count", n=16, seed=seed, image_size=32)

    stream = TaskStream(
        tasks=[Task("a", train=src(1), eval=src(2), steps=steps), Task("b", train=src(3), steps=steps)],
        batch_size=4,
        eval_batch_size=16,
        eval_limit=4,
    )
    trainer = quiet_trainer(tmp_path, callbacks=[WeightSnapshots()])
    trainer.fit(module, datamodule=stream)
    return module, trainer


def trainable_state(module):
    return {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}


def test_lambda_zero_trains_exactly_like_plain_and_teacher_restores(tmp_path):
    plain = trainable_state(fit([], tmp_path / "plain")[0])
    zero_module, trainer = fit([LwF(lam=0.0)], tmp_path / "zero")
    zero = trainable_state(zero_module)
    one = trainable_state(fit([LwF(lam=1.0)], tmp_path / "one")[0])
    assert all(torch.equal(plain[n], zero[n]) for n in plain)  # step for step the same
    assert any(not torch.equal(plain[n], one[n]) for n in plain)  # the term does act when λ > 0

    # The teacher of the last task (its start weights) survives a checkpoint round trip.
    path = tmp_path / "lwf.ckpt"
    trainer.save_checkpoint(path)
    fresh = MLLMModule(family="llava", recipe=SAProj(), strategies=[LwF(lam=0.0)])
    fresh.configure_model()
    fresh.on_load_checkpoint(torch.load(path, map_location="cpu", weights_only=True))
    saved, loaded = zero_module.strategies[0].teacher, fresh.strategies[0].teacher
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[n], loaded[n]) for n in saved)
    assert any(not torch.equal(saved[n], zero[n]) for n in saved)  # teacher = start of task b, not the end
    # ... exactly the weights task b started from (refreshed at each task start), not task a's.
    (snap,) = [c for c in trainer.callbacks if isinstance(c, WeightSnapshots)]
    start_a, start_b = snap.start
    assert all(torch.equal(saved[n], start_b[n]) for n in saved)
    assert any(not torch.equal(start_a[n], start_b[n]) for n in saved)


def separate_teacher_term(module, teacher_model, batch, outputs, temperature: float = 2.0) -> torch.Tensor:
    """The LwF term computed with a second model holding the teacher weights (no in-place exchange)."""
    with torch.no_grad():
        teacher = teacher_model(**{k: v for k, v in batch.items() if k != "skipped"}).logits
    labels = batch["labels"]
    return distillation(answer_logits(outputs.logits, labels), answer_logits(teacher, labels), temperature)


def test_lwf_term_under_bf16_autocast_equals_a_separate_teacher():
    """Autocast caches each weight's bf16 copy by tensor identity; the in-place teacher exchange keeps the
    identity, so without the fix the teacher pass reused the student's casts and the term was exactly 0."""
    module = built("llava")
    lwf = LwF(lam=1.0, temperature=2.0)
    lwf.on_task_start(module.context, 0)
    teacher_model = copy.deepcopy(module.model)
    nudge(module)
    batch = real_batch(module)
    module.model.eval()
    fp32 = lwf.loss(module.context, batch, module(batch)).item()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the default: cache_enabled=True
        outputs = module(batch)
        assert outputs.logits.dtype == torch.bfloat16  # autocast really is on
        ours = lwf.loss(module.context, batch, outputs)
        reference = separate_teacher_term(module, teacher_model, batch, outputs)
    assert reference.item() > 1e-3
    assert ours.item() == pytest.approx(reference.item(), rel=1e-3)
    assert ours.item() == pytest.approx(fp32, rel=0.05)  # bf16 rounding only
    # The student's weights are back after the teacher pass, bit for bit.
    assert any(not torch.equal(v, module.model.get_parameter(n)) for n, v in lwf.teacher.items())
    assert all(torch.equal(v, teacher_model.get_parameter(n)) for n, v in lwf.teacher.items())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_lwf_term_under_layerwise_fsdp_precision_on_gpu(tmp_path):
    """LayerWiseFSDP's bf16-mixed precision plugin autocasts with the weight cache on (unlike AMP's)."""
    from mllm_cl.sharding import LayerWiseFSDP

    trainer = L.Trainer(
        accelerator="gpu", devices=1, strategy=LayerWiseFSDP(), precision="bf16-mixed", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, default_root_dir=str(tmp_path),
    )  # fmt: skip
    module = built("llava").cuda()
    lwf = LwF(lam=1.0, temperature=2.0)
    lwf.on_task_start(module.context, 0)
    teacher_model = copy.deepcopy(module.model)
    nudge(module)
    batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in real_batch(module).items()}
    module.model.eval()
    with trainer.precision_plugin.forward_context():
        assert torch.is_autocast_enabled("cuda") and torch.is_autocast_cache_enabled()
        outputs = module(batch)
        ours = lwf.loss(module.context, batch, outputs)
        reference = separate_teacher_term(module, teacher_model, batch, outputs)
    assert reference.item() > 1e-3
    assert ours.item() == pytest.approx(reference.item(), rel=1e-3)

    # And through a real LayerWiseFSDP bf16 fit: the logged term is not 0 once the weights moved.
    L.seed_everything(0)
    fitted = MLLMModule(family="llava", recipe=SAProj(), strategies=[LwF()], lr=1e-2, warmup_ratio=0.0)
    data = Synthetic("count", n=16, seed=1, image_size=32)
    stream = TaskStream(tasks=[Task("a", train=data, eval=data, steps=3)], batch_size=4, eval_limit=4)
    run = L.Trainer(
        accelerator="gpu", devices=1, strategy=LayerWiseFSDP(), precision="bf16-mixed", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, default_root_dir=str(tmp_path / "fit"),
    )  # fmt: skip
    run.fit(fitted, datamodule=stream)
    assert float(run.callback_metrics["train/LwF"]) > 1e-4
