"""Training throughput and MFU of SA Proj on a LLaVA-1.5-7B-shaped model (random weights, bf16, 1 GPU).

The model is built from mllm_cl/model_configs/llava-1.5-7b-hf.json on the meta device, moved with
`to_empty` to the GPU and initialised there (HF init_weights; no download). Weights are bf16 ("pure" bf16, AdamW state in
bf16 too: a throughput figure, not a training recipe). Each sample is one 336 px image (576 image
tokens after the CLIP tower) plus `--text` random text tokens, answer tokens = the text tokens.

Model FLOPs per step, the ones the recipe needs (2 FLOPs per multiply-add, attention scores ignored):
  forward            2 * N_vision * B * 577  +  2 * N_llm * B * L
  backward, act.     2 * N_llm * B * L  (the LLM only: vision tower and projector are frozen, so no
                     gradient flows into them)
  backward, weights  2 * N_trainable * B * L
with N_llm the LLM's parameters without the input embedding table (a lookup), L = 576 + text.
Recomputation by activation checkpointing is not counted (MFU counts useful FLOPs).
MFU = FLOPs / step time / peak; peak = 989 TFLOP/s (H100 SXM bf16 dense; --peak for others).

    .venv/bin/python benchmarks/gpu_throughput.py [--batch 8 --text 128 --steps 10 --checkpointing]
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

import torch  # noqa: E402
from transformers import LlavaConfig, LlavaForConditionalGeneration  # noqa: E402

from mllm_cl.families import get_family  # noqa: E402
from strategies import freeze  # noqa: E402


def build(config_path: Path, device: str, attn: str) -> LlavaForConditionalGeneration:
    raw = json.loads(config_path.read_text())
    config = LlavaConfig(**{k: v for k, v in raw.items() if k not in ("architectures", "torch_dtype")})
    config._attn_implementation = attn
    with torch.device("meta"):  # shapes only: no host memory, no init work
        model = LlavaForConditionalGeneration(config)
    model = model.to_empty(device=device)  # uninitialised storage on the GPU
    with torch.device(device):  # real init on the GPU, then its non-persistent buffers
        model.init_weights()
        fresh = {n: b for n, b in _buffers(LlavaForConditionalGeneration, config, device).items()}
    for name, buf in model.named_buffers():
        buf.copy_(fresh[name])  # rotary inv_freq, CLIP position ids: to_empty left them empty
    return model.to(torch.bfloat16)


def _buffers(cls, config, device) -> dict:
    """Non-persistent buffers as the constructor computes them (on a model without layers)."""
    small = config.__class__.from_dict(config.to_dict())
    small.text_config.num_hidden_layers = small.vision_config.num_hidden_layers = 1
    small.text_config.vocab_size = small.vocab_size = 8
    small._attn_implementation = config._attn_implementation
    return dict(cls(small).to(device).named_buffers())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--text", type=int, default=128, help="text tokens per sample after the image")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--recipe", default="SAProj")
    parser.add_argument("--checkpointing", action="store_true", help="non-reentrant activation checkpointing")
    parser.add_argument("--attn", default="sdpa")
    parser.add_argument("--peak", type=float, default=989e12, help="peak FLOP/s (H100 bf16 dense)")
    parser.add_argument(
        "--config", type=Path, default=ROOT / "mllm_cl" / "model_configs" / "llava-1.5-7b-hf.json"
    )
    parser.add_argument("--device", default="cuda", help="cpu only to smoke-test this script")
    args = parser.parse_args()
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_throughput.py needs a CUDA GPU (or --device cpu with a small --config to smoke-test)")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch.manual_seed(0)
    model = build(args.config, device, args.attn)
    family = get_family("llava")
    names = family.canonical_names(model)
    shim = types.SimpleNamespace(model=model, family=family, canonical_names=lambda: names)
    getattr(freeze, args.recipe)().setup(shim)
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()

    comp = {}
    for real, p in model.named_parameters():
        comp.setdefault(names[real].split(".", 1)[0], []).append((real, p))
    n_vision = sum(p.numel() for _, p in comp["vision"])
    n_llm = sum(p.numel() for r, p in comp["llm"] if "embed_tokens" not in r)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    upstream_trainable = any(p.requires_grad for c in ("vision", "projector") for _, p in comp[c])

    cfg = model.config
    img = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2  # 576
    B, L = args.batch, img + 1 + args.text
    ids = torch.randint(2, cfg.text_config.vocab_size, (B, L), device=device)
    ids[ids == cfg.image_token_index] = 2  # image tokens only where the image goes
    ids[:, 0] = 1
    ids[:, 1 : 1 + img] = cfg.image_token_index
    labels = ids.clone()
    labels[:, : 1 + img] = -100
    pixels = torch.randn(B, 3, cfg.vision_config.image_size, cfg.vision_config.image_size, device=device)
    batch = dict(
        input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels.bfloat16(), labels=labels
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    times = []
    if device == "cuda":
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
    tokens = B * L
    fwd = 2 * n_vision * B * (img + 1) + 2 * n_llm * tokens
    bwd_act = 2 * n_llm * tokens + (2 * n_vision * B * (img + 1) if upstream_trainable else 0)
    bwd_w = 2 * n_train * tokens
    flops = fwd + bwd_act + bwd_w
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"{gpu}  recipe={args.recipe}  batch={B}  seq={L}  "
          f"checkpointing={args.checkpointing}  attn={args.attn}")  # fmt: skip
    print(
        f"params: vision {n_vision / 1e9:.2f} B, llm (no embed) {n_llm / 1e9:.2f} B, trainable {n_train / 1e9:.2f} B"
    )
    print(f"step {step_s * 1e3:.0f} ms (median of {args.steps}), {tokens / step_s:,.0f} tokens/s")
    print(f"model FLOPs/step {flops / 1e12:.1f} T -> {flops / step_s / 1e12:.0f} TFLOP/s, "
          f"MFU {flops / step_s / args.peak:.1%} of {args.peak / 1e12:.0f}")  # fmt: skip
    if device == "cuda":
        print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    print("reproduce: .venv/bin/python benchmarks/gpu_throughput.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
