"""Training throughput and MFU of a freezing recipe on a 7B-shaped model (random weights, bf16, 1 GPU).

The model is the real architecture built from a bundled config (mllm_cl/model_configs: LLaVA-1.5-7B,
Qwen2.5-VL-7B, and LLaVA-OneVision-7B where that family exists) on the meta device, moved with
`to_empty` to the GPU and initialised there (HF init_weights; no download). Every floating tensor is
poisoned with NaN before the init and checked finite after it, so a weight the init skipped fails
loudly instead of timing garbage. Weights are bf16 ("pure" bf16, AdamW state in bf16 too: a
throughput figure, not a training recipe; benchmarks/gpu_fit_throughput.py times the recipe itself
through Lightning's `fit`, on the same samples, with the model built by `build` below).

Samples (`fixed_samples`): one random-noise image at the shape's resolution (LLaVA-1.5: 336 px, 576
image tokens; Qwen2.5-VL: `--image-size` 672 px, 2304 patches merged 2x2 into 576 tokens;
LLaVA-OneVision: 384 px, base image plus one tile) and exactly `--text` other tokens (chat template,
question, answer), encoded by the family's processor and mllm_cl's `Encoder` as training data is.
The processor is the family's offline tiny processor set to the shape's image geometry, and the
config's special-token ids are set to that tokenizer's (`shape_setup`).

Model FLOPs per step, the ones the recipe needs (2 FLOPs per multiply-add; attention scores, norms
and activation functions ignored):
  forward            2 N_vision T_vision + 2 N_proj T_image + 2 N_llm T
  backward, act.     2 N_llm T, plus 2 N_proj T_image + 2 N_vision T_vision only when the vision
                     tower trains (a frozen tower and projector need no input gradient)
  backward, weights  2 (n_llm T + n_proj T_image + n_vision T_vision), n_x = trainable parameters
with N_x a component's parameters (N_llm without the input embedding table: a lookup), T the tokens
of the batch (B x L), T_image the image tokens among them, and T_vision the tokens the vision
tower's blocks see, counted by a hook on its first block (CLIP: 577 per image, the CLS included;
Qwen2.5-VL: patches before the merge; OneVision: tiles x 729). Recomputation by activation
checkpointing is not counted: MFU counts useful FLOPs.
MFU = FLOPs / step time / peak; peak = 989 TFLOP/s (H100 / H200 SXM bf16 dense, datasheet; --peak).

    python benchmarks/gpu_throughput.py [--family llava] [--batch 8 --text 128 --steps 10 --checkpointing]
    python benchmarks/gpu_throughput.py --device cpu --smoke --steps 1 --warmup 1   # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from mllm_cl.data.collate import Encoder  # noqa: E402
from mllm_cl.data.sources import Source  # noqa: E402
from mllm_cl.families import get_family  # noqa: E402
from mllm_cl.plan import load_config  # noqa: E402
from strategies import freeze  # noqa: E402

# Bundled config per family (file stem in mllm_cl/model_configs), unless the family names its own.
SHAPES = {
    "llava": "llava-1.5-7b-hf",
    "qwen2_5_vl": "qwen2.5-vl-7b-instruct",
    "llava_onevision": "llava-onevision-qwen2-7b-ov-hf",
}
DEFAULT_IMAGE_SIZE = {"qwen2_5_vl": 672}  # others: the vision tower's own resolution
H100_BF16_PEAK = 989e12


# ---- the model ------------------------------------------------------------------------------
def _set_depth(sub, n: int) -> None:
    """`n` blocks in a text or vision sub-config, and per-layer lists cut to match."""
    for key in ("num_hidden_layers", "depth"):
        if hasattr(sub, key):
            setattr(sub, key, n)
    if getattr(sub, "layer_types", None):
        sub.layer_types = sub.layer_types[:n]
    if getattr(sub, "fullatt_block_indexes", None):
        sub.fullatt_block_indexes = [i for i in sub.fullatt_block_indexes if i < n] or [n - 1]


def shrink(config) -> None:
    """One block per tower and narrow widths, same image geometry and token layout: the real code
    path at a size a CPU runs in seconds (`--smoke`; `shape_setup` also cuts the vocabulary)."""
    text, vision = config.get_text_config(), config.vision_config
    for sub, width in ((text, 64), (vision, 32)):
        _set_depth(sub, 1)
        sub.hidden_size, sub.intermediate_size = width, 2 * width
        for key in ("num_attention_heads", "num_heads", "num_key_value_heads"):
            if hasattr(sub, key):
                setattr(sub, key, 2)
        if getattr(sub, "head_dim", None):
            sub.head_dim = width // 2
    if hasattr(vision, "out_hidden_size"):
        vision.out_hidden_size = text.hidden_size  # Qwen2.5-VL's merger writes the LLM width
    rope = getattr(text, "rope_parameters", None) or {}
    if "mrope_section" in rope:  # (t, h, w) sections must add up to head_dim / 2
        old, half = rope["mrope_section"], (text.hidden_size // 2) // 2
        new = [s * half // sum(old) for s in old]
        new[-1] += half - sum(new)
        rope["mrope_section"] = new


def shape_name(family, config_path: str | None = None) -> str:
    """`config_path`, else the family's bundled 7B config (a name `plan --config` takes too)."""
    stem = config_path or getattr(family, "bundled_config", None) or SHAPES.get(family.name)
    if stem is None:
        raise SystemExit(f"no 7B shape for family {family.name!r}: pass --config CONFIG.json")
    return stem


def shape_setup(family_name: str, config_path: str | None = None, image_size: int | None = None, smoke=False):
    """(family, HF config, processor, image size) of a 7B shape.

    The processor is the family's offline tiny processor set to the config's image geometry, and
    the config's special-token ids (image, video, vision start/end) are set to that tokenizer's,
    copied from the family's own tiny config, so text, image tokens and positions line up."""
    family = get_family(family_name)
    config = load_config(family, shape_name(family, config_path))
    tiny_model, processor = family.build_tiny("demo")
    tiny = tiny_model.config
    for ours, theirs in ((config, tiny), (config.get_text_config(), tiny.get_text_config())):
        for key, value in theirs.to_dict().items():
            if key.endswith(("_token_id", "_token_index")) and hasattr(ours, key):
                setattr(ours, key, value)
    if smoke:
        shrink(config)
        config.get_text_config().vocab_size = tiny.get_text_config().vocab_size  # logits: the CPU's cost
    size = image_size or DEFAULT_IMAGE_SIZE.get(family.name) or config.vision_config.image_size
    tune = PROCESSORS.get(family.name)
    if tune is None:
        raise SystemExit(f"benchmarks/gpu_throughput.py: no 7B-shape processor for {family.name!r}; add one")
    tune(processor, config, size)
    return family, config, processor, size


def _llava(processor, config, size):
    vision = config.vision_config
    processor.image_processor.size = {"shortest_edge": size}
    processor.image_processor.crop_size = {"height": size, "width": size}
    processor.patch_size = vision.patch_size


def _qwen(processor, config, size):
    vision, ip = config.vision_config, processor.image_processor
    ip.patch_size, ip.merge_size = vision.patch_size, vision.spatial_merge_size
    ip.temporal_patch_size = vision.temporal_patch_size
    ip.size = {"shortest_edge": size * size, "longest_edge": size * size}  # pixels: exactly this image


def _onevision(processor, config, size):
    vision, ip = config.vision_config, processor.image_processor
    ip.size = {"height": size, "width": size}
    ip.image_grid_pinpoints = config.image_grid_pinpoints
    processor.num_image_tokens = (vision.image_size // vision.patch_size) ** 2
    processor.vision_feature_select_strategy = config.vision_feature_select_strategy


PROCESSORS = {"llava": _llava, "qwen2_5_vl": _qwen, "llava_onevision": _onevision}


def _buffers(cls, config, device) -> dict:
    """Non-persistent buffers as the constructor computes them (on a model with one block per tower)."""
    small = config.__class__.from_dict(config.to_dict())
    for sub in (small.get_text_config(), small.vision_config):
        _set_depth(sub, 1)
    small._attn_implementation = config._attn_implementation
    return dict(cls(small).to(device).named_buffers())


def build(family, config, device: str, attn: str = "sdpa", dtype=torch.bfloat16):
    """The real architecture of `config` with freshly initialised random weights on `device`."""
    cls = family.model_class
    config._attn_implementation = attn
    with torch.device("meta"):  # shapes only: no host memory, no init work
        model = cls(config)
    model = model.to_empty(device=device)  # uninitialised storage on the device
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point():
            t.data.fill_(float("nan"))  # poison: whatever the init misses stays NaN
    with torch.device(device):  # real init on the device, then its non-persistent buffers
        model.init_weights()
        fresh = _buffers(cls, config, device)
    for name, buf in model.named_buffers():
        buf.copy_(fresh[name])  # rotary inv_freq, CLIP position ids: to_empty left them empty
    bad = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if not torch.isfinite(t).all()]
    if bad:
        raise RuntimeError(f"init_weights left {len(bad)} tensors uninitialised, e.g. {bad[:3]}")
    return model.to(dtype)


# ---- the samples ----------------------------------------------------------------------------
_WORDS = "one two three four five six seven eight nine ten".split()


def _noise(size: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def fixed_samples(encoder: Encoder, n: int, text: int, image_size: int, seed: int = 0) -> list[dict]:
    """`n` samples of one image each and exactly `text` non-image tokens (the answer fills up)."""
    image_id = encoder.family.image_token_id(encoder.processor)

    def sample(i: int, words: int) -> dict:
        answer = " ".join(_WORDS[k % len(_WORDS)] for k in range(max(words, 1)))
        messages = [
            {"role": "user", "content": "what is in the image ?"},
            {"role": "assistant", "content": answer},
        ]
        return {
            "id": f"bench{i}",
            "images": [_noise(image_size, seed + i)],
            "messages": messages,
            "answers": [answer],
        }

    words = text
    for _ in range(4):  # the word-level tokenizer makes each answer word one token: converges at once
        ids = encoder.encode_train(sample(0, words))["input_ids"][0]
        have = int((ids != image_id).sum())
        if have == text:
            return [sample(i, words) for i in range(n)]
        words += text - have
    raise SystemExit(f"cannot make samples of exactly {text} text tokens (got {have}); raise --text")


class Samples(Source):
    """A fixed list of samples as a data source (the fit benchmark's task)."""

    def __init__(self, samples: list[dict]):
        self.samples = samples

    def load(self):
        return self.samples


def to_device(batch: dict, device: str, dtype) -> dict:
    out = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor) and k != "skipped"}
    out["pixel_values"] = out["pixel_values"].to(dtype)
    return out


# ---- the FLOP count -------------------------------------------------------------------------
def component_counts(family, model) -> dict[str, dict[str, int]]:
    """component -> {"total", "trainable"} parameters; the LLM's input embedding table left out."""
    names = family.canonical_names(model)
    counts = {c: {"total": 0, "trainable": 0} for c in ("vision", "projector", "llm")}
    for real, p in model.named_parameters():
        if "embed_tokens" in real:
            continue  # a lookup, no FLOPs
        c = counts[names[real].split(".", 1)[0]]
        c["total"] += p.numel()
        c["trainable"] += p.numel() if p.requires_grad else 0
    return counts


class VisionTokens:
    """Counts the tokens the vision tower's first block sees, once (a forward pre-hook)."""

    def __init__(self, family, model):
        classes = tuple(family.decoder_layer_classes(model))
        roots = [root for _, root in family.component_roots(model)["vision"]]
        first = next(m for root in roots for m in root.modules() if isinstance(m, classes))
        self.tokens = None
        self.handle = first.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        self.tokens = x.numel() // x.shape[-1]
        self.handle.remove()


def step_flops(counts: dict, tokens: int, image_tokens: int, vision_tokens: int) -> dict[str, float]:
    """Model FLOPs of one optimizer step (the formula in this file's docstring)."""
    v, p, m = counts["vision"], counts["projector"], counts["llm"]
    seen = {"vision": vision_tokens, "projector": image_tokens, "llm": tokens}
    fwd = sum(2 * counts[c]["total"] * seen[c] for c in seen)
    bwd_act = 2 * m["total"] * tokens
    if v["trainable"]:
        bwd_act += 2 * p["total"] * image_tokens + 2 * v["total"] * vision_tokens
    bwd_w = sum(2 * counts[c]["trainable"] * seen[c] for c in seen)
    return {
        "forward": fwd,
        "backward_act": bwd_act,
        "backward_weights": bwd_w,
        "total": fwd + bwd_act + bwd_w,
    }


def figures(counts, batch, image_id, vision_tokens, step_s, peak) -> dict:
    """tokens/s, FLOPs and MFU of one measured step time."""
    ids = batch["input_ids"]
    flops = step_flops(counts, ids.numel(), int((ids == image_id).sum()), vision_tokens)
    return {
        "batch": ids.shape[0],
        "seq": ids.shape[1],
        "vision_tokens": vision_tokens,
        "step_s": step_s,
        "tokens_per_s": ids.numel() / step_s,
        "flops_per_step": flops["total"],
        "flops": flops,
        "tflops_per_s": flops["total"] / step_s / 1e12,
        "mfu": flops["total"] / step_s / peak,
        "peak_flops": peak,
        "params": counts,
    }


def print_figures(r: dict) -> None:
    c = r["params"]
    print(
        f"params: vision {c['vision']['total'] / 1e9:.2f} B, projector {c['projector']['total'] / 1e9:.3f} B, "
        f"llm (no embed) {c['llm']['total'] / 1e9:.2f} B, trainable "
        f"{sum(x['trainable'] for x in c.values()) / 1e9:.2f} B"
    )
    print(f"batch {r['batch']} x seq {r['seq']} (vision tower tokens {r['vision_tokens']})")
    print(f"step {r['step_s'] * 1e3:.0f} ms (median), {r['tokens_per_s']:,.0f} tokens/s")
    print(
        f"model FLOPs/step {r['flops_per_step'] / 1e12:.1f} T -> {r['tflops_per_s']:.0f} TFLOP/s, "
        f"MFU {r['mfu']:.1%} of {r['peak_flops'] / 1e12:.0f}"
    )


def apply_recipe(family, model, recipe: str) -> None:
    names = family.canonical_names(model)
    shim = types.SimpleNamespace(model=model, family=family, canonical_names=lambda: names)
    getattr(freeze, recipe)().setup(shim)


def parser(description: str) -> argparse.ArgumentParser:
    """The options both throughput benchmarks share."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--family", default="llava", help="llava, qwen2_5_vl or llava_onevision")
    p.add_argument("--config", help="the shape's config.json or a bundled name (default: the family's 7B)")
    p.add_argument("--image-size", type=int, help="image side in px (default: 336 / 672 / 384 by family)")
    p.add_argument("--text", type=int, default=128, help="non-image tokens per sample")
    p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--attn", default="sdpa")
    p.add_argument("--peak", type=float, default=H100_BF16_PEAK, help="peak FLOP/s (H100/H200 bf16 dense)")
    p.add_argument("--device", default="cuda", help="cpu only to smoke-test (with --smoke)")
    p.add_argument("--smoke", action="store_true", help="1 block per tower, narrow: a CPU smoke test")
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    return p


def check_device(device: str, script: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit(f"{script} needs a CUDA GPU (or --device cpu --smoke to smoke-test)")


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--recipe", default="SAProj")
    p.add_argument("--checkpointing", action="store_true", help="non-reentrant activation checkpointing")
    args = p.parse_args()
    check_device(args.device, "gpu_throughput.py")
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch.manual_seed(0)
    family, config, processor, size = shape_setup(args.family, args.config, args.image_size, args.smoke)
    encoder = Encoder(family, processor, max_length=10**9)
    samples = fixed_samples(encoder, args.batch, args.text, size)
    batch = to_device(
        encoder.collate([encoder.encode_train(s) for s in samples]), args.device, torch.bfloat16
    )
    model = build(family, config, args.device, args.attn)
    apply_recipe(family, model, args.recipe)
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    counts, vision = component_counts(family, model), VisionTokens(family, model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    times = []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for step in range(args.warmup + args.steps):
        sync()
        t0 = time.perf_counter()
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    step_s = sorted(times)[len(times) // 2]
    image_id = family.image_token_id(processor)
    r = figures(counts, batch, image_id, vision.tokens, step_s, args.peak)
    gpu = torch.cuda.get_device_name() if cuda else "cpu"
    r.update(path="plain", family=family.name, recipe=args.recipe, checkpointing=args.checkpointing,
             attn=args.attn, device=gpu, precision="bf16 (pure)", smoke=args.smoke)  # fmt: skip
    print(f"{gpu}  {family.name}  recipe={args.recipe}  checkpointing={args.checkpointing}  attn={args.attn}")
    print_figures(r)
    if cuda:
        r["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
        print(f"peak memory {r['peak_memory_bytes'] / 2**30:.1f} GiB")
    r["command"] = "python benchmarks/gpu_throughput.py " + " ".join(sys.argv[1:])
    print("reproduce: " + r["command"])
    if args.json:
        args.json.write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
