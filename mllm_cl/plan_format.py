"""The text ``python -m mllm_cl plan`` prints: the setup read, parameters, memory terms, run size."""

from __future__ import annotations

from mllm_cl.plan_memory import GIB


def _gib(nbytes: int) -> str:
    return f"{nbytes / GIB:>9.2f} GiB"


def _count(n: int | None) -> str:
    return "unknown" if n is None else f"{n:,}"


def _seconds(sec: float) -> str:
    return f"{sec / 3600:.1f} h" if sec >= 3600 else f"{sec / 60:.1f} min"


def format_setup(r: dict) -> list[str]:
    s = r["setup"]
    world = s["devices"] * s["nodes"]
    kind = {"single": "one GPU", "ddp": "DDP", "fsdp1": "FSDP1 (flat parameters)", "fsdp2": "FSDP2"}[
        s["strategy"]
    ]
    w, c = r["memory"]["weight_bytes"], r["memory"]["compute_bytes"]
    return [
        f"family {r['family']}  checkpoint config {r['config']}",
        f"recipe {r['recipe']}  patterns {r['patterns']}"
        + (f"  exclude {r['exclude']}" if r["exclude"] else ""),
        f"strategies: {', '.join(r['strategies']) or 'none'}",
        f"weights {s['dtype']} ({w} B), precision {s['precision']} (compute {c} B), "
        f"gradient checkpointing {'on' if s['gradient_checkpointing'] else 'off'}",
        f"global batch {s['micro_batch'] * s['accumulate'] * world} = micro-batch {s['micro_batch']} x "
        f"accumulation {s['accumulate']} x {world} GPU(s) ({s['nodes']} node(s)), {kind}",
        f"sequence {s['seq_len']} tokens ({s.get('seq_from', 'data.max_length, an upper bound; --seq-len to change')})",
    ]


def format_memory(r: dict) -> list[str]:
    lines = ["", f"{'component':<10} {'trainable':>15} {'total':>15} {'trainable %':>12}"]
    for comp, c in r["params"].items():
        pct = 100 * c["trainable"] / c["total"] if c["total"] else 0.0
        lines.append(f"{comp:<10} {c['trainable']:>15,} {c['total']:>15,} {pct:>11.2f}%")
    m, world = r["memory"], r["setup"]["devices"] * r["setup"]["nodes"]
    if not any(t["name"] == "gradients" for t in m["terms"]):
        lines.append(
            "(trainable = what the recipe selects; a method below trains its own parameters instead)"
        )
    lines += ["", f"memory per GPU ({world} GPU(s)):"]
    lines += [f"  {t['name']:<24}{_gib(t['bytes'])}   {t['note']}" for t in m["terms"] if t["where"] == "gpu"]
    lines.append(
        f"  {'total':<24}{_gib(m['gpu_total'])}   + CUDA context and allocator fragmentation (2-4 GiB)"
    )
    host = [t for t in m["terms"] if t["where"] == "host"]
    if host:
        lines.append(f"host memory per node ({r['setup']['devices']} training process(es)):")
        lines += [f"  {t['name']:<24}{_gib(t['bytes'])}   {t['note']}" for t in host]
        lines.append(f"  {'total':<24}{_gib(m['host_total'])}   + each worker's Python process")
    return lines


def format_run(r: dict) -> list[str]:
    run, lines = r["run"], ["", "run size:"]
    width = max(len(t["name"]) for t in r["tasks"] + r["evals"]) + 2
    lines.append(f"  {'task':<{width}}{'train samples':>14}{'steps':>10}   where the size comes from")
    for t in r["tasks"]:
        lines.append(f"  {t['name']:<{width}}{t['rows_text']:>14}{_count(t['steps']):>10}   {t['note']}")
    lines.append(f"  optimizer steps in total: {_count(run['total_steps'])}")
    lines.append(
        f"  evaluation: {run['eval_rows']} passes ({run['eval_rows_why']}) over {len(r['evals'])} sets"
    )
    for e in r["evals"]:
        lines.append(f"  {e['name']:<{width}}{e['rows_text']:>14}   {e['note']}")
    unknown = f" + {len(run['eval_unknown'])} set(s) of unknown size" if run["eval_unknown"] else ""
    lines.append(
        f"  generated answers: {run['eval_rows']} x {run['eval_per_row']:,}{unknown} = {run['generated']:,}{unknown and ' + unknown'}"
    )
    if "train_seconds" in run or "eval_seconds" in run:
        parts = [
            f"training {_seconds(run['train_seconds'])}" if "train_seconds" in run else "training unknown"
        ]
        parts.append(
            f"evaluation {_seconds(run['eval_seconds'])}" if "eval_seconds" in run else "evaluation unknown"
        )
        lines.append(f"  wall time: {', '.join(parts)}")
    else:
        lines.append(
            "  wall time: pass --step-time SECONDS (per optimizer step) and --gen-time SECONDS (per answer, one GPU)"
        )
    return lines + [f"note: {n}" for n in r.get("notes", [])]


def format_plan(result: dict) -> str:
    lines = format_setup(result) + format_memory(result)
    return "\n".join(lines + (format_run(result) if "run" in result else []))
