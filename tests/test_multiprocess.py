"""Two-process training on CPU (gloo) through the real CLI: DDP and FSDP2 (ModelParallelStrategy).

Each run trains the two-task tiny stream of configs/tiny_llava_test.yaml with `--trainer.devices 2`.
`Audit` (a real callback, loaded by class path in the launched processes) records per rank what
the optimizer holds and which eval samples the rank scored, so the test can check that frozen
parameters never reach the optimizer and that the padded eval split scores every sample once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "tiny_llava_test.yaml"


class Audit(L.Callback):
    """Writes audit_rank{R}.json: optimizer vs trainable parameters, and scored eval ids per column.

    Args:
        out: folder for the per-rank files.
    """

    def __init__(self, out: str):
        self.out = out

    def on_train_end(self, trainer, pl_module):
        opt_params = [p for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]]
        trainable = {id(p) for p in pl_module.model.parameters() if p.requires_grad}
        stream, rank, world = trainer.datamodule, trainer.global_rank, trainer.world_size
        scored = {
            name: [m["id"] for b in stream.eval_loader(c, rank, world) for m in b["meta"] if m["weight"]]
            for c, name in enumerate(stream.eval_names)
        }
        batches = [len(stream.eval_loader(c, rank, world)) for c in range(len(stream.eval_names))]
        record = {
            "in_optimizer": len(opt_params),
            "in_optimizer_trainable": sum(id(p) in trainable for p in opt_params),
            "trainable": len(trainable),
            "frozen": sum(1 for p in pl_module.model.parameters() if not p.requires_grad),
            "dtensor": sum(type(p).__name__ == "DTensor" for p in opt_params),
            "scored": scored,
            "eval_batches": batches,
            "world": world,
        }
        Path(self.out, f"audit_rank{rank}.json").write_text(json.dumps(record))


class LwFAudit(L.Callback):
    """Writes lwf_rank{R}.json: how far LwF's teacher logits are from the student's at the end of training.

    Under FSDP2 a teacher that is silently ignored (its weights replaced by the live shards during the
    forward) gives a gap of exactly 0; after the teacher pass the student must be bit-identical again.

    Args:
        out: folder for the per-rank files.
    """

    def __init__(self, out: str):
        self.out = out

    def on_train_end(self, trainer, pl_module):
        import torch  # noqa: PLC0415

        stream, lwf = trainer.datamodule, pl_module.strategies[0]
        batch = stream.encoder.collate(
            [stream.encoder.encode_train(stream.train_table(0)[i]) for i in range(4)]
        )
        inputs = {k: v for k, v in batch.items() if k != "skipped"}
        with torch.no_grad():
            student = pl_module.model(**inputs).logits
            teacher = lwf.teacher_logits(pl_module, inputs)
            again = pl_module.model(**inputs).logits
        record = {
            "gap": float((teacher - student).abs().max()),
            "restored": bool(torch.equal(student, again)),
        }
        Path(self.out, f"lwf_rank{trainer.global_rank}.json").write_text(json.dumps(record))


def run_cli(tmp_path: Path, *extra: str) -> tuple[Path, list[dict]]:
    args = [
        sys.executable, "-m", "mllm_cl", "fit", "--config", str(CONFIG), *extra,
        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.precision", "32-true",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--trainer.callbacks+=tests.test_multiprocess.Audit", f"--trainer.callbacks.out={tmp_path}",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (run,) = list((tmp_path / "runs").glob("*/version_*"))
    audits = [json.loads((tmp_path / f"audit_rank{r}.json").read_text()) for r in (0, 1)]
    return run, audits


def check_run(run: Path, audits: list[dict]):
    results = json.loads((run / "results.json").read_text())
    assert results["row_labels"] == ["base", "count", "colour"]
    assert len(results["matrix"]) == 3 and all(len(r) == 3 for r in results["matrix"])
    assert all(0.0 <= v <= 1.0 for row in results["matrix"] for v in row)
    for audit in audits:
        assert audit["world"] == 2
        # Only trainable parameters (SAProj: q/k/v/o) reach the optimizer, all of them.
        assert audit["in_optimizer"] == audit["in_optimizer_trainable"] == audit["trainable"] > 0
        assert audit["frozen"] > 0
    # Padded eval split: both ranks run as many batches and every sample is scored exactly once.
    assert audits[0]["eval_batches"] == audits[1]["eval_batches"]
    for name in results["columns"]:
        ids = audits[0]["scored"][name] + audits[1]["scored"][name]
        assert len(ids) == len(set(ids)) == 24, name  # eval_limit 24 in the config


@pytest.mark.slow  # ~12 s alone, ~50 s when the 2 cores are shared
def test_ddp_two_processes(tmp_path):
    run, audits = run_cli(tmp_path, "--trainer.strategy", "ddp")
    check_run(run, audits)
    assert all(a["dtensor"] == 0 for a in audits)


@pytest.mark.slow  # ~15 s alone, ~50 s when the 2 cores are shared
def test_fsdp2_two_processes(tmp_path):
    run, audits = run_cli(
        tmp_path,
        "--config",
        str(ROOT / "configs" / "trainer_fsdp_multigpu.yaml"),  # FSDP2 + checkpointing
    )
    check_run(run, audits)
    # FSDP2 shards each parameter: the optimizer holds DTensor shards of trainable parameters only.
    assert all(a["dtensor"] == a["in_optimizer"] for a in audits)
    assert list((run / "checkpoints").glob("*.ckpt"))


@pytest.mark.slow  # ~20 s alone
def test_lwf_teacher_acts_under_fsdp2(tmp_path):
    run, audits = run_cli(
        tmp_path,
        "--config", str(ROOT / "configs" / "trainer_fsdp_multigpu.yaml"),
        "--model.strategies+=LwF", "--trainer.callbacks+=tests.test_multiprocess.LwFAudit",
        f"--trainer.callbacks.out={tmp_path}",
    )  # fmt: skip
    check_run(run, audits)
    for rank in (0, 1):
        lwf = json.loads((tmp_path / f"lwf_rank{rank}.json").read_text())
        assert lwf["gap"] > 1e-4  # the teacher (start of task 2) is not the trained student
        assert lwf["restored"]  # the student's weights are back, bit for bit, after the teacher pass
