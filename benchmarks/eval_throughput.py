"""Evaluation throughput: greedy generation one prompt at a time vs. left-padded batches.

    OMP_NUM_THREADS=1 python benchmarks/eval_throughput.py                 # demo-size tiny LLaVA, CPU
    python benchmarks/eval_throughput.py --model llava7b --device cuda      # LLaVA-1.5-7B shape, bf16

Prints samples/s for batch 1 and for `--batch-size`, their ratio, and checks that the generated token
ids are identical (the property `tests/test_generation.py` asserts). Both runs use the same prompts
(Synthetic counting questions mixed with multi-turn follow-ups, so prompt lengths differ) and the
same code path as evaluation (`mllm_cl.generation.generate_ids`). Every prompt is decoded for exactly
`--max-new-tokens` steps (no early end-of-turn) so the two runs do the same work.

`--model llava7b` builds LLaVA-1.5-7B's shapes with random weights (CLIP ViT-L/14 at 336 px: 24 layers,
1024 wide, 576 image tokens; 2-layer MLP projector; Llama-2-7B: 32 layers, 4096 wide, 11008 MLP,
vocab 32064) in bf16 on the chosen device. It needs ~14 GB of accelerator memory; on bf16 a near-tie
can flip an argmax between batch shapes, so there the id check reports the fraction that matches.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from transformers import LogitsProcessorList, MinNewTokensLengthLogitsProcessor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mllm_cl.data.collate import Encoder  # noqa: E402
from mllm_cl.data.sources import Synthetic  # noqa: E402
from mllm_cl.families import get_family  # noqa: E402
from mllm_cl.generation import generate_ids  # noqa: E402


def build_llava7b(dtype: torch.dtype, device: str):
    """LLaVA-1.5-7B-shaped model with random weights and a processor that yields 576 image tokens."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    family = get_family("llava")
    processor = family.tiny_processor("demo")
    processor.image_processor.size = {"shortest_edge": 336}
    processor.image_processor.crop_size = {"height": 336, "width": 336}
    processor.patch_size = 14
    tok = processor.tokenizer
    vision = dict(
        model_type="clip_vision_model",
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
    )
    text = dict(
        model_type="llama",
        vocab_size=32064,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=576,
        vision_feature_layer=-2,
    )
    with torch.device(device):
        model = LlavaForConditionalGeneration(config).to(dtype)
    return family, model, processor


def prompts(n: int, image_size: int) -> list[dict]:
    samples = [dict(s) for s in Synthetic("count", n=n, seed=3, image_size=image_size).load()]
    for i, s in enumerate(samples):
        if i % 3 == 1:  # a multi-turn conversation: much longer prompt in the same batch
            s["messages"] = [
                {"role": "user", "content": "What colour is the square?"},
                {"role": "assistant", "content": "red"},
                {"role": "user", "content": "What shape is in the image?"},
                {"role": "assistant", "content": "circle"},
                *s["messages"],
            ]
    return samples


def run(model, tokenizer, eos, encoder, samples, batch_size, max_new_tokens, device) -> tuple[float, list]:
    """(seconds, generated ids per sample) for all samples in batches of `batch_size`."""
    outputs = []
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(0, len(samples), batch_size):
        items = [encoder.encode_prompt(s) for s in samples[i : i + batch_size]]
        batch = encoder.collate(items, padding_side="left")
        batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
        # No early end of turn: the end-of-turn token is masked until max_new_tokens (generation's
        # GREEDY settings reset min_new_tokens, so a logits processor does it).
        prompt_len = batch["input_ids"].shape[1]
        eos_id = tokenizer.convert_tokens_to_ids(eos)
        no_eos = MinNewTokensLengthLogitsProcessor(prompt_len, max_new_tokens, eos_id, device=device)
        with torch.no_grad():
            out = generate_ids(
                model, tokenizer, eos, batch, max_new_tokens, logits_processor=LogitsProcessorList([no_eos])
            )
        outputs += out[:, batch["input_ids"].shape[1] :].tolist()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start, outputs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["demo", "tiny", "llava7b"], default="demo")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.model == "llava7b":
        family, model, processor = build_llava7b(torch.bfloat16, args.device)
    else:
        family = get_family("llava")
        model, processor = family.build_tiny(args.model)
        model.to(args.device)
    model.eval()
    encoder = Encoder(family, processor, max_length=10**9)
    samples = prompts(args.samples, 64)
    tok, eos = processor.tokenizer, family.end_of_turn
    run(model, tok, eos, encoder, samples[: args.batch_size], args.batch_size, 2, args.device)  # warm-up
    t1, ids1 = run(model, tok, eos, encoder, samples, 1, args.max_new_tokens, args.device)
    tb, idsb = run(model, tok, eos, encoder, samples, args.batch_size, args.max_new_tokens, args.device)
    same = sum(a == b for a, b in zip(ids1, idsb, strict=True))
    params = sum(p.numel() for p in model.parameters())
    print(
        f"model={args.model} ({params / 1e6:.1f}M params, {next(model.parameters()).dtype}) device={args.device} "
        f"threads={torch.get_num_threads()} samples={len(samples)} max_new_tokens={args.max_new_tokens}"
    )
    print(f"batch 1:  {len(samples) / t1:8.2f} samples/s  ({t1:.2f} s)")
    print(f"batch {args.batch_size}: {len(samples) / tb:8.2f} samples/s  ({tb:.2f} s)")
    print(f"speed-up: {t1 / tb:.2f}x   identical answers: {same}/{len(samples)}")
    if args.json:
        figures = {
            "model": args.model,
            "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
            "dtype": str(next(model.parameters()).dtype),
            "samples": len(samples),
            "batch_size": args.batch_size,
            "max_new_tokens": args.max_new_tokens,
            "seconds_batch_1": t1,
            "seconds_batched": tb,
            "speedup": t1 / tb,
            "identical": same,
            "command": "python benchmarks/eval_throughput.py " + " ".join(sys.argv[1:]),
        }
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    return 0 if same == len(samples) or args.model == "llava7b" else 1


if __name__ == "__main__":
    sys.exit(main())
