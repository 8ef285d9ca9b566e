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

from tests.helpers import ROOT

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
            "steps": trainer.global_step,
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


class WeightsAudit(L.Callback):
    """Rank 0 writes weights.pt: the full (gathered) self-attention weights at the end of training.

    Args:
        out: folder for the file.
    """

    def __init__(self, out: str):
        self.out = out

    def on_train_end(self, trainer, pl_module):
        import torch  # noqa: PLC0415

        full = {}
        for name, p in pl_module.model.named_parameters():
            if "language_model" in name and "self_attn" in name:
                # full_tensor is a collective: every rank gathers, rank 0 writes.
                full[name] = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
        if trainer.global_rank == 0:
            compiled = sum(bool(getattr(m, "_compiled_call_impl", None)) for m in pl_module.model.modules())
            record = {"weights": full, "steps": trainer.global_step, "compiled": compiled}
            torch.save(record, Path(self.out, "weights.pt"))


class Interrupt(L.Callback):
    """Ends every process abruptly (like a preempted job) when task `at_task` starts.

    Args:
        at_task: index of the task at whose start the processes die.
    """

    def __init__(self, at_task: int = 1):
        self.at_task = at_task

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.at_task:
            os._exit(3)


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


def check_run(run: Path, audits: list[dict], eval_samples: int = 24):
    results = json.loads((run / "results.json").read_text())
    assert results["row_labels"] == ["base", "count", "colour"]
    assert len(results["matrix"]) == 3 and all(len(r) == 3 for r in results["matrix"])
    assert all(0.0 <= v <= 1.0 for row in results["matrix"] for v in row)
    for audit in audits:
        assert audit["world"] == 2
        assert audit["steps"] == 10  # 2 tasks x 5 optimizer steps: each rank drew its full share
        # Only trainable parameters (SAProj: q/k/v/o) reach the optimizer, all of them.
        assert audit["in_optimizer"] == audit["in_optimizer_trainable"] == audit["trainable"] > 0
        assert audit["frozen"] > 0
    # Padded eval split: both ranks run as many batches and every sample is scored exactly once.
    assert audits[0]["eval_batches"] == audits[1]["eval_batches"]
    for name in results["columns"]:
        ids = audits[0]["scored"][name] + audits[1]["scored"][name]
        assert len(ids) == len(set(ids)) == eval_samples, name  # data.eval_limit


@pytest.mark.slow  # ~25 s alone, ~70 s when the 2 cores are shared
def test_ddp_two_processes(tmp_path):
    cache = tmp_path / "processed"
    run, audits = run_cli(
        tmp_path,
        "--trainer.strategy",
        "ddp",
        "--data.cache_processed",
        "true",
        "--data.cache_dir",
        str(cache),
        "--data.eval_limit",
        "23",  # odd: rank 1 gets a padding row in its last eval batch, which must not be scored
    )
    check_run(run, audits, eval_samples=23)
    assert all(a["dtensor"] == 0 for a in audits)
    # Rank 0 tokenised each task and eval set once into the cache (the other rank waited), nothing
    # half-written: 2 training tables + 3 eval sets.
    assert sorted(p.name.split("-")[0] for p in cache.iterdir()) == ["processed"] * 5

    # `validate` through Lightning's loop on 2 processes: each rank scores its share, each sample once;
    # the record goes into the scored checkpoint's run directory.
    args = [
        sys.executable, "-m", "mllm_cl", "validate", "--config", str(CONFIG), "--trainer.accelerator", "cpu",
        "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.logger.init_args.save_dir",
        str(tmp_path / "val"), "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), "--data.eval_limit", "23",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # validate writes its record into the run directory of the checkpoint it scores
    record = json.loads((run / "eval_validate.json").read_text())
    assert record["samples"] == {"count": 23, "colour": 23, "shape": 23}
    results = json.loads((run / "results.json").read_text())
    assert record["accuracy"] == dict(zip(results["columns"], results["matrix"][-1], strict=True))


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


@pytest.mark.slow  # ~40 s per case alone
@pytest.mark.parametrize(
    "family, strategy",
    [("llava", "LwF"), ("llava", "LoRA"), ("llava", "WiSEFT"), ("qwen2_5_vl", None), ("qwen2_5_vl", "LwF")],
)
def test_strategies_train_the_same_under_fsdp2_as_under_ddp(tmp_path, family, strategy):
    import torch

    from mllm_cl.families import get_family

    options = ["--model.family", family]
    if strategy:
        options.append(
            "--trainer.callbacks+=WiSEFT" if strategy == "WiSEFT" else f"--model.strategies+={strategy}"
        )
    weights = {}
    for name, extra in [("ddp", ["--trainer.strategy", "ddp"]),
                        ("fsdp2", ["--config", str(ROOT / "configs" / "trainer_fsdp_multigpu.yaml")])]:  # fmt: skip
        out = tmp_path / name
        out.mkdir()
        run_cli(out, *extra, *options, "--trainer.callbacks+=tests.test_multiprocess.WeightsAudit",
                f"--trainer.callbacks.out={out}", "--trainer.callbacks+=mllm_cl.export.ExportHF",
                f"--trainer.callbacks.dirpath={out / 'hf'}", "--trainer.callbacks.last_only=true")  # fmt: skip
        weights[name] = torch.load(out / "weights.pt", weights_only=True)
        # The exported HF checkpoint (gathered from shards under FSDP2, LoRA folded) holds the trained weights.
        exported = dict(get_family(family).model_class.from_pretrained(out / "hf").named_parameters())
        for key, value in weights[name]["weights"].items():
            if ".lora_" not in key:
                # LoRA: adapters are merged into the base after every task (B = 0), so base = trained weight.
                assert torch.allclose(exported[key.replace(".base_layer", "")], value, atol=1e-6), key
    ddp, fsdp2 = weights["ddp"], weights["fsdp2"]
    assert ddp["steps"] == fsdp2["steps"] == 10  # 2 tasks x 5 optimizer steps
    assert ddp["weights"].keys() == fsdp2["weights"].keys() and ddp["weights"]
    for name, value in ddp["weights"].items():
        assert torch.allclose(value, fsdp2["weights"][name], atol=2e-5, rtol=1e-4), name
    start = dict(get_family(family).build_tiny("tiny")[0].named_parameters())
    moved = [n for n, v in ddp["weights"].items() if n.replace(".base_layer", "") in start
             and not torch.equal(v, start[n.replace(".base_layer", "")])]  # fmt: skip
    assert moved  # training (LoRA: the merged adapters) changed the attention weights
    if strategy == "LoRA":  # adapters are merged and reset after every task: B is zero again
        assert all(not v.any() for n, v in fsdp2["weights"].items() if ".lora_B." in n)


@pytest.mark.slow  # ~60 s alone (inductor compiles each block class once per process)
def test_compile_under_fsdp2_trains_like_eager(tmp_path):
    import torch

    weights = {}
    for name, extra in [("eager", []), ("compiled", ["--model.compile", "true"])]:
        out = tmp_path / name
        out.mkdir()
        run_cli(out, "--config", str(ROOT / "configs" / "trainer_fsdp_multigpu.yaml"), *extra,
                "--trainer.callbacks+=tests.test_multiprocess.WeightsAudit", f"--trainer.callbacks.out={out}")  # fmt: skip
        weights[name] = torch.load(out / "weights.pt", weights_only=True)
    eager, compiled = weights["eager"], weights["compiled"]
    assert eager["compiled"] == 0 and compiled["compiled"] > 0  # blocks compiled, then sharded
    assert eager["steps"] == compiled["steps"] == 10
    for key, value in eager["weights"].items():
        assert torch.allclose(value, compiled["weights"][key], atol=1e-5, rtol=1e-4), key


FSDP2 = ["--config", str(ROOT / "configs" / "trainer_fsdp_multigpu.yaml")]
WEIGHTS_AUDIT = "--trainer.callbacks+=tests.test_multiprocess.WeightsAudit"


def fsdp2_whole_and_cut(tmp_path: Path) -> tuple[Path, Path, list[str], dict]:
    """An uninterrupted 2-process FSDP2 run in tmp_path/whole (its weights audited), and the command
    (and env) of the same run in tmp_path/cut, to be stopped and resumed by the test."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    whole.mkdir()
    cut.mkdir()
    run_cli(whole, *FSDP2, WEIGHTS_AUDIT, f"--trainer.callbacks.out={whole}")
    base = [
        sys.executable, "-m", "mllm_cl", "fit", "--config", str(CONFIG), *FSDP2, "--trainer.accelerator", "cpu",
        "--trainer.devices", "2", "--trainer.precision", "32-true", "--trainer.default_root_dir", str(cut),
        "--trainer.logger.init_args.save_dir", str(cut / "runs"),
    ]  # fmt: skip
    return whole, cut, base, env


def resume_equals_whole(whole: Path, cut: Path, base: list[str], env: dict) -> dict:
    """Resume the cut run with --ckpt_path last; its final weights and matrix equal the whole run's.
    Returns the resumed run's audited weights."""
    import torch

    resumed = subprocess.run([*base, WEIGHTS_AUDIT, f"--trainer.callbacks.out={cut}", "--ckpt_path", "last"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    want = torch.load(whole / "weights.pt", weights_only=True)
    got = torch.load(cut / "weights.pt", weights_only=True)
    assert got["steps"] == want["steps"] == 10
    for key, value in want["weights"].items():
        assert torch.allclose(got["weights"][key], value, atol=1e-6), key
    results = [
        json.loads(next((d / "runs").glob("*/version_*/results.json")).read_text()) for d in (whole, cut)
    ]
    assert results[0]["matrix"] == results[1]["matrix"] and len(results[1]["matrix"]) == 3
    return got


@pytest.mark.slow  # ~60 s alone
def test_fsdp2_resume_from_a_distributed_checkpoint_and_export_it(tmp_path):
    """Killed after task 1, resumed from the sharded checkpoint (trainable weights only): same final
    weights and matrix as a run never stopped; `export` turns the checkpoint folder into HF weights."""
    import torch

    from mllm_cl.families import get_family

    whole, cut, base, env = fsdp2_whole_and_cut(tmp_path)
    died = subprocess.run([*base, "--trainer.callbacks+=tests.test_multiprocess.Interrupt"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=400)  # fmt: skip
    assert died.returncode != 0
    (ckpt,) = list((cut / "runs").glob("*/version_*/checkpoints/last.ckpt"))
    assert ckpt.is_dir() and (ckpt / "meta.pt").is_file()  # a distributed checkpoint: one shard per rank
    got = resume_equals_whole(whole, cut, base, env)

    out = tmp_path / "hf"
    export = [sys.executable, "-m", "mllm_cl", "export", "--config", str(CONFIG), "--ckpt_path", str(ckpt),
              "--out", str(out)]  # fmt: skip
    done = subprocess.run(export, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-4000:]
    exported = dict(get_family("llava").model_class.from_pretrained(out).named_parameters())
    for key, value in got["weights"].items():
        assert torch.allclose(exported[key], value, atol=1e-6), key


@pytest.mark.slow  # ~70 s alone
def test_fsdp2_checkpoint_cut_while_written_keeps_the_previous_one(tmp_path):
    """Disk full on every rank while task 2's "trained" checkpoint folder is written (the 3rd write of
    last.ckpt; its shards are complete, not yet swapped in): last.ckpt stays the whole folder of the
    write before, the unfinished one is dropped on resume, and the resumed run ends as one never stopped."""
    import torch

    whole, cut, base, env = fsdp2_whole_and_cut(tmp_path)
    died = subprocess.run(base, cwd=ROOT, env={**env, "MLLM_CL_ENOSPC_AT": "write.last.ckpt:3"},
                          capture_output=True, text=True, timeout=400)  # fmt: skip
    assert died.returncode != 0 and "disk full while writing" in died.stderr, died.stderr[-3000:]
    (checkpoints,) = list((cut / "runs").glob("*/version_*/checkpoints"))
    assert (checkpoints / ".last.ckpt.partial").is_dir()  # the cut write, complete but not in place
    meta = torch.load(checkpoints / "last.ckpt" / "meta.pt", weights_only=True)
    rows = meta["mllm_cl"]["results"]["matrix"]
    assert meta["global_step"] == 5 and len(rows) == 2  # task 1's "done" folder: base and task-1 rows
    resume_equals_whole(whole, cut, base, env)
    assert sorted(os.listdir(checkpoints)) == ["last.ckpt"]


@pytest.mark.slow  # ~30 s per case alone
@pytest.mark.parametrize("point", ["write.last.ckpt:2", "write.results.json:2"])
def test_ddp_a_full_disk_on_rank_0_stops_every_rank(tmp_path, point):
    """Only rank 0 writes the single-file checkpoint and the results: a full disk there stops both
    processes with the same one-line error. Before, rank 1 was left in the save's barrier or its next
    collective: on gloo it died with a "Connection closed by peer" traceback once rank 0 had exited
    (NCCL would wait for its timeout). The files written before stay intact."""
    args = [
        sys.executable, "-m", "mllm_cl", "fit", "--config", str(CONFIG), "--trainer.accelerator", "cpu",
        "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.precision", "32-true",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "MLLM_CL_ENOSPC_AT": point}
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    lines = [x for x in proc.stderr.splitlines() if x.startswith("error: disk full while writing")]
    assert proc.returncode == 2 and len(lines) == 2 and lines[0] == lines[1], proc.stderr[
        -3000:
    ]  # both ranks
    assert "Traceback" not in proc.stderr and point.split(":")[0].removeprefix("write.") in lines[0]
    (run,) = list((tmp_path / "runs").glob("*/version_*"))
    results = json.loads((run / "results.json").read_text())  # the first write, whole
    assert results["row_labels"][0] == "base"
