"""Memory per GPU of one training setup, term by term (the arithmetic of ``python -m mllm_cl plan``).

Notation: P = all parameters, T = trainable parameters (the recipe's canonical names), n = the ways
parameter state is sharded (FSDP: GPUs; DDP / one GPU: 1), w = bytes per element of the weights as
loaded (`model.dtype`; a 16-bit ``*-true`` precision casts the model to 16 bits), c = bytes per
element of the computation (2 under ``bf16-mixed`` / ``16-mixed``, else w), b = micro-batch,
s = sequence length (``data.max_length``: the cap, so an upper bound), and from the text config
L = decoder layers, h = hidden size, a = attention heads, V = vocabulary.

* weights       P·w / n.
* compute copies (mixed precision with c < w, no FSDP1): autocast (Lightning disables its cache)
  casts each Linear weight to c bytes per use and autograd keeps the cast for the backward. With
  gradient checkpointing one decoder layer's Linear weights at a time + lm_head's; without, every
  LLM Linear weight. (FSDP1 gathers its units in c bytes instead: see the gather buffers.)
* gradients     T·w / n; FSDP1 (flat parameters) pays every parameter of a unit that holds a
  trainable one (litgpt #1538).
* optimizer     T·2w / n: torch AdamW keeps exp_avg and exp_avg_sq in the parameters' dtype (fp32
  weights: 8 B per parameter; bf16 weights: 4 B and no master copy).
* strategies    each method's `memory(plan)` (`strategies.base.MemoryTerm`): LwF's teacher, the L2
  anchor, LoRA's adapters (which *replace* the gradients and optimizer terms), WiSE-FT's start copy...
* activations   Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
  Models"): one layer keeps s·b·h·(34 + 5·a·s/h) bytes at 16 bits, here in c bytes; the 5·a·s/h
  term is the attention matrix that SDPA / flash kernels do not store (conservative there). The
  residual stream stays in w bytes: the embeddings come out in the weights' dtype and fp32 + bf16
  branch outputs add up in fp32 (checked under CPU autocast on the tiny LLaVA and Qwen2.5-VL), so
  each layer's input, and its two norms' inputs, take w bytes (FSDP1 computes with c-byte copies
  of the parameters: c). With checkpointing: L·s·b·h·w (the saved layer inputs) + one layer in
  full; without: L layers in full.
* logits        b·s·V·(c + 4): lm_head's output plus the fp32 copy the loss upcasts to.
* FSDP buffers  FSDP2: the unsharded unit being run and the prefetched one (2 × the largest unit's
  P·w) + one unit's unsharded fp32 gradients before the reduce-scatter. FSDP1 (param_dtype c):
  2 × the largest unit in c bytes + one unit's gradients in c bytes. DDP: a second copy of the
  gradients in its buckets (gradient_as_bucket_view is off).
* host RAM per node: the methods' host terms, the data tables read into Python, and each loader
  worker's prefetched batches (2 per worker), times the GPUs of the node.

Not counted: the vision tower's activations (frozen towers keep none), the CUDA context and the
caching allocator's fragmentation (budget 2-4 GiB per GPU).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from mllm_cl.errors import ConfigError
from mllm_cl.plan_arch import Arch
from strategies.base import MemoryTerm, Strategy

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
GIB = 1024**3
PRECISIONS = {"32-true": None, "bf16-mixed": 2, "16-mixed": 2, "bf16-true": 2, "16-true": 2}
_PRECISION_ALIASES = {"32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed"}
STRATEGIES = ("single", "ddp", "fsdp1", "fsdp2")
PREFETCH = 2  # torch DataLoader's default prefetch_factor


def precision_name(value) -> str:
    """Lightning's precision setting, normalised (32 -> "32-true", "bf16" -> "bf16-mixed")."""
    name = _PRECISION_ALIASES.get(str(value), str(value))
    if name not in PRECISIONS:
        raise ConfigError(f"trainer.precision {value!r}: plan models {', '.join(PRECISIONS)}")
    return name


@dataclass
class Setup:
    """One training setup: what `plan` reads from a fit YAML or from its flags."""

    family: str
    recipe: object
    strategies: list = field(default_factory=list)  # Strategy objects and a WiSEFT callback
    dtype: str = "float32"
    precision: str = "bf16-mixed"
    micro_batch: int = 1
    accumulate: int = 1
    devices: int = 1
    nodes: int = 1
    strategy: str = "single"  # single, ddp, fsdp1 or fsdp2
    fsdp1_sharding: str = "FULL_SHARD"
    fsdp1_whole_model: bool = False  # Lightning's plain "fsdp": one flat parameter for the model
    cpu_offload: bool = False
    gradient_checkpointing: bool = True
    seq_len: int = 2048
    num_workers: int = 0
    processor_kwargs: dict = field(default_factory=dict)
    task_samples: list = field(default_factory=list)  # samples each task consumes (None: unknown)
    host_terms: list = field(default_factory=list)  # MemoryTerms of the data tables
    table_bytes: object = None  # Source -> (bytes, note), for the strategies' host terms

    @property
    def world(self) -> int:
        return self.devices * self.nodes

    def check(self) -> None:
        if min(self.micro_batch, self.accumulate, self.devices, self.nodes, self.seq_len) < 1:
            raise ConfigError("micro-batch, accumulation, devices, nodes and seq-len must be positive")
        if self.dtype not in DTYPE_BYTES:
            raise ConfigError(f"dtype {self.dtype!r} unknown; choose one of {sorted(DTYPE_BYTES)}")
        self.precision = precision_name(self.precision)
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy {self.strategy!r}: plan models {', '.join(STRATEGIES)}")


@dataclass
class PlanView:
    """What a strategy's `memory(plan)` hook reads (see `strategies.base.Strategy.memory`)."""

    trainable: int  # parameters the recipe trains
    weight_bytes: int  # bytes per element of the weights as loaded
    compute_bytes: int  # bytes per element of activations and logits
    shards: int  # parameter state is split this many ways (FSDP), else 1
    micro_batch: int
    seq_len: int
    vocab: int
    layers: int
    gradient_checkpointing: bool
    recipe_patterns: tuple
    linears: dict
    task_samples: list
    _table_bytes: object = None

    def sharded(self, nbytes: int) -> int:
        return math.ceil(nbytes / self.shards)

    def linear_shapes(self, patterns) -> list[tuple[int, int]]:
        """(out, in) of every Linear whose canonical weight name matches one of `patterns`."""
        return [s for n, s in self.linears.items() if any(re.search(p, n) for p in patterns)]

    def table_bytes(self, source) -> tuple[int, str]:
        """Host bytes of a source loaded in full, with how the number was found."""
        return self._table_bytes(source) if self._table_bytes else (0, "unknown")


def element_sizes(setup: Setup) -> tuple[int, int]:
    """(w, c): bytes per weight element and per computed element."""
    w = DTYPE_BYTES[setup.dtype]
    p = setup.precision
    if p.endswith("-true") and PRECISIONS[p]:
        w = PRECISIONS[p]  # Lightning casts the whole model to 16 bits
    return w, (PRECISIONS[p] if p.endswith("-mixed") else w)


def state_shards(setup: Setup) -> tuple[int, int]:
    """(ways weights are sharded, ways gradients and optimizer state are sharded)."""
    if setup.strategy == "fsdp2":
        return setup.world, setup.world
    if setup.strategy == "fsdp1":
        return {
            "FULL_SHARD": (setup.world, setup.world),
            "HYBRID_SHARD": (setup.devices, setup.devices),
            "SHARD_GRAD_OP": (1, setup.world),  # parameters stay gathered from forward to backward
            "NO_SHARD": (1, 1),
        }.get(setup.fsdp1_sharding, (setup.world, setup.world))
    return 1, 1


def strategy_terms(setup: Setup, view: PlanView) -> list[MemoryTerm]:
    terms = []
    for method in setup.strategies:
        own = getattr(type(method), "memory", None)
        if type(method).__name__ == "WiSEFT" and own in (None, Strategy.memory):
            terms += wise_ft_memory(method, view)  # a callback, or a Strategy without its own hook yet
        elif own is not None:
            terms += method.memory(view)
    return terms


def wise_ft_memory(method, view: PlanView) -> list[MemoryTerm]:
    """WiSE-FT's start copy, for its forms without a `memory` hook of their own (the Lightning
    callback in strategies/wise_ft.py, in trainer.callbacks; a Strategy in model.strategies)."""
    grid = len(getattr(method, "alphas", [0]))
    note = "trainable weights at task start; at task end one more copy (θ_end) while merging"
    if grid > 1:
        note += f", {grid} evaluations of the α grid"
    return [MemoryTerm("WiSE-FT start copy", view.sharded(view.trainable * view.weight_bytes), note)]


def _term(name, nbytes, note, where="gpu") -> dict:
    return {"name": name, "bytes": int(nbytes), "note": note, "where": where}


def estimate(setup: Setup, arch: Arch) -> dict:
    """Memory terms of `setup` on `arch`: a list of {name, bytes, note, where} and the totals."""
    s, a = setup, arch
    w, c = element_sizes(s)
    terms = state_terms(s, a, w, c)
    view = PlanView(
        a.params["all"]["trainable"], w, c, state_shards(s)[1], s.micro_batch, s.seq_len, a.vocab,
        a.layers, s.gradient_checkpointing, tuple(s.recipe.patterns), a.linears, s.task_samples,
        s.table_bytes,
    )  # fmt: skip
    for extra in strategy_terms(s, view):
        if extra.replaces:
            terms = [t for t in terms if t["name"] != extra.replaces]
        per_node = s.devices if extra.where == "host" else 1  # host terms are per training process
        terms.append(_term(extra.name, extra.nbytes * per_node, extra.note, extra.where))
    terms += activation_terms(s, a, w, c)
    terms += sharding_terms(s, a, w, c, a.params["all"]["trainable"])
    terms += host_terms(s, a, terms)
    return {
        "terms": terms,
        "gpu_total": sum(t["bytes"] for t in terms if t["where"] == "gpu"),
        "host_total": sum(t["bytes"] for t in terms if t["where"] == "host"),
        "weight_bytes": w,
        "compute_bytes": c,
    }


def state_terms(s: Setup, a: Arch, w: int, c: int) -> list[dict]:
    """Weights, autocast's kept casts, gradients and AdamW state."""
    n_weights, n_state = state_shards(s)
    total, trainable = a.params["all"]["total"], a.params["all"]["trainable"]
    fsdp1 = s.strategy == "fsdp1"
    terms = [
        _term("weights", math.ceil(total * w / n_weights), f"all {total:,} params x {w} B / {n_weights}")
    ]
    if s.precision.endswith("-mixed") and c < w and not fsdp1:
        kept = a.layer_linears if s.gradient_checkpointing else a.llm_linears - a.head_linears
        scope = "one decoder layer (checkpointing)" if s.gradient_checkpointing else "every LLM Linear"
        note = f"autocast's {c}-byte casts kept for backward: {scope} + lm_head"
        terms.append(_term("compute copies", (kept + a.head_linears) * c, note))
    units = [(total, trainable)] if s.fsdp1_whole_model else a.units_fsdp1
    grads = sum(p for p, t in units if t) if fsdp1 else trainable
    why = "every param of a unit holding a trainable one (FSDP1)" if fsdp1 else "trainable"
    terms.append(_term("gradients", math.ceil(grads * w / n_state), f"{why} x {w} B / {n_state}"))
    opt_note = f"AdamW: 2 moments x {w} B (the params' dtype) / {n_state}"
    return terms + [_term("optimizer", math.ceil(trainable * 2 * w / n_state), opt_note)]


def activation_terms(s: Setup, a: Arch, w: int, c: int) -> list[dict]:
    """Decoder activations (Korthikanti et al., residual stream in r bytes) and the logits."""
    b_s = s.micro_batch * s.seq_len
    fsdp1_mixed = s.strategy == "fsdp1" and s.precision.endswith("-mixed")
    sbh, r = b_s * a.hidden, c if fsdp1_mixed else w  # r: bytes of the residual stream
    full_layer = math.ceil(sbh * (34 + 5 * a.heads * s.seq_len / a.hidden) * c / 2) + 2 * sbh * (r - c)
    acts = a.layers * sbh * r + full_layer if s.gradient_checkpointing else a.layers * full_layer
    ckpt = "on: L saved inputs + one layer" if s.gradient_checkpointing else "off: L layers"
    return [
        _term("activations", acts, f"{c} B, residual {r} B; checkpointing {ckpt} (Korthikanti)"),
        _term("logits", b_s * a.vocab * (c + 4), f"b x s x V={a.vocab:,} x ({c} + 4 fp32) B"),
    ]


def sharding_terms(s: Setup, a: Arch, w: int, c: int, trainable: int) -> list[dict]:
    if s.strategy == "ddp":
        return [_term("DDP gradient buckets", trainable * w, "a second copy of the gradients")]
    if s.strategy == "fsdp2":
        big, big_trainable = max(p for p, _ in a.units_fsdp2), max(t for _, t in a.units_fsdp2)
        note = f"2 x the largest unit ({big:,} params) x {w} B + one unit's fp32 gradients"
        return [_term("FSDP gather buffers", 2 * big * w + big_trainable * 4, note)]
    if s.strategy == "fsdp1":
        units = [(sum(p for p, _ in a.units_fsdp1), trainable)] if s.fsdp1_whole_model else a.units_fsdp1
        g = c if s.precision.endswith("-mixed") else w
        big, big_trainable = max(p for p, _ in units), max((p for p, t in units if t), default=0)
        note = f"2 x the largest unit ({big:,} params) x {g} B + one unit's gradients x {g} B"
        return [_term("FSDP gather buffers", (2 * big + big_trainable) * g, note)]
    return []


def host_terms(s: Setup, a: Arch, terms: list[dict]) -> list[dict]:
    """Host RAM per node: the methods' and tables' terms per process x the node's GPUs, the loaders."""
    out = []
    if s.cpu_offload:  # FSDP1 cpu_offload keeps the sharded parameters and gradients in CPU memory
        for t in terms:
            if t["name"] in ("weights", "gradients", "optimizer"):
                t["where"] = "host"
                t["bytes"] *= s.devices
    for extra in s.host_terms:
        out.append(_term(extra.name, extra.nbytes * s.devices, extra.note, "host"))
    if s.num_workers:
        tokens = s.seq_len * 3 * 8  # input_ids, labels, attention_mask as int64
        image = a.image_bytes or 0
        batch = s.micro_batch * (tokens + image)
        what = "" if a.image_bytes else " (tokens only: pixel size unknown, set max_pixels)"
        note = f"{s.num_workers} workers x {PREFETCH} prefetched batches x {s.devices} GPU(s){what}"
        out.append(_term("data loader batches", s.num_workers * PREFETCH * batch * s.devices, note, "host"))
    return out
