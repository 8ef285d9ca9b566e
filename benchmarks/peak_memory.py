"""Training memory of the freezing recipes on the demo LLaVA: Full vs LLM vs SAProj vs MLPGateUp.

Each recipe runs in its own process (one AdamW step on one batch). On CPU torch allocations are
invisible to tracemalloc, so we report the bytes of parameters + gradients + optimizer state after
the step (what FSDP would shard) and the process's peak RSS (ru_maxrss, which also counts Python,
libraries and activations). On a GPU, torch.cuda.max_memory_allocated is reported as well.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/peak_memory.py [--batch 8] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RECIPES = ("Full", "LLM", "SAProj", "MLPGateUp")


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def one(recipe: str, batch: int, device: str) -> dict:
    import torch

    import strategies.freeze as freeze
    from mllm_cl.data import Synthetic
    from mllm_cl.data.collate import Encoder
    from mllm_cl.module import MLLMModule

    torch.manual_seed(0)
    module = MLLMModule(family="llava", tiny="demo", recipe=getattr(freeze, recipe)())
    module.configure_model()
    model = module.model.to(device).train()
    enc = Encoder(module.family, module.processor, 2048, "skip")
    table = Synthetic("colour", n=batch, seed=1).load()
    data = enc.collate([enc.encode_train(table[i]) for i in range(batch)])
    data = {k: v.to(device) for k, v in data.items() if isinstance(v, torch.Tensor)}
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model(**data).loss.backward()
    opt.step()
    states = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    out = {
        "recipe": recipe,
        "trainable": sum(p.numel() for p in trainable),
        "params_MB": tensor_bytes(model.parameters()) / 2**20,
        "grads_MB": tensor_bytes(p.grad for p in model.parameters()) / 2**20,
        "optim_MB": tensor_bytes(states) / 2**20,
        "maxrss_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if device == "cuda":
        out["cuda_peak_MB"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.batch, args.device)))
        return
    rows = []
    for recipe in RECIPES:
        cmd = [sys.executable, __file__, "--one", recipe, "--batch", str(args.batch), "--device", args.device]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    cols = ["trainable", "params_MB", "grads_MB", "optim_MB", "maxrss_MB"] + (
        ["cuda_peak_MB"] if args.device == "cuda" else []
    )
    print(f"{'recipe':<10}" + "".join(f"{c:>14}" for c in cols) + f"{'p+g+opt MB':>14}")
    for r in rows:
        total = r["params_MB"] + r["grads_MB"] + r["optim_MB"]
        cells = "".join(f"{r[c]:>14,.2f}" if isinstance(r[c], float) else f"{r[c]:>14,}" for c in cols)
        print(f"{r['recipe']:<10}{cells}{total:>14.2f}")
    print("reproduce: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/peak_memory.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
