"""`mllm_cl plan`: parameter counts of the real 7B architectures (built on meta), memory term by term
against hand computations from the published shapes, the fit-YAML form and the run size."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from mllm_cl.data import Synthetic
from mllm_cl.families import get_family
from mllm_cl.plan import (
    GIB,
    build_meta_model,
    bundled_configs,
    format_plan,
    load_config,
    main,
    memory,
    plan,
)
from strategies import (
    LLM,
    MLP,
    DataHybrid,
    Full,
    L2Anchor,
    LoRA,
    LwF,
    MLPGateUp,
    Patterns,
    Projector,
    Replay,
    SAProj,
    VisionEncoder,
    WiSEFT,
)

ROOT = Path(__file__).resolve().parent.parent
LLAVA = "llava-1.5-7b-hf"
QWEN = "qwen2.5-vl-7b-instruct"
OV = "llava-onevision-qwen2-7b-ov-hf"
CASES = [("llava", LLAVA), ("qwen2_5_vl", QWEN), ("llava_onevision", OV)]

# LLaVA-1.5-7B by hand (config.json of llava-hf/llava-1.5-7b-hf): Llama-2-7B text model.
P = 7_063_427_072  # all parameters (test_full_total_is_the_real_parameter_count)
L, H, A, V, INTER = 32, 4096, 32, 32064, 11008
SAPROJ_T = L * 4 * H * H  # q, k, v, o: 2,147,483,648
MLP_T = L * 3 * H * INTER
LAYER_LINEARS = 4 * H * H + 3 * H * INTER  # Linear weights of one decoder layer
LAYER = LAYER_LINEARS + 2 * H  # + two RMSNorms
HEAD = V * H


def config_path(name):
    return str(bundled_configs()[name])


def text_config(family, name):
    return load_config(get_family(family), config_path(name)).get_text_config()


def activations(b, s, c=2, w=4, ckpt=True):
    """Korthikanti et al.: one layer s·b·h·(34 + 5·a·s/h) bytes at 16 bits, scaled by c/2; the residual
    stream (each layer's input and its two norms' inputs) in the weights' dtype w."""
    full = s * b * H * (34 + 5 * A * s / H) * c / 2 + 2 * s * b * H * (w - c)
    return L * s * b * H * w + full if ckpt else L * full


def run_plan(argv, capsys) -> dict:
    assert main([*argv, "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def gpu_terms(result) -> dict:
    return memory(result)


# ---- parameter counts ----------------------------------------------------------------------
def test_bundled_configs_found_next_to_the_module():
    configs = bundled_configs()
    assert {LLAVA, QWEN, OV} <= set(configs)
    for path in configs.values():
        assert path.is_file() and path.parent.name == "model_configs"
        json.loads(path.read_text())


def test_configs_load_with_the_published_numbers():
    llava = load_config(get_family("llava"), config_path(LLAVA))
    t, v = llava.text_config, llava.vision_config
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.intermediate_size) == (
        H,
        L,
        A,
        INTER,
    )
    assert (t.vocab_size, t.max_position_embeddings, llava.image_token_index) == (V, 4096, 32000)
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.image_size, v.patch_size) == (
        1024,
        24,
        16,
        336,
        14,
    )
    qwen = load_config(get_family("qwen2_5_vl"), config_path(QWEN))
    t, v = qwen.text_config, qwen.vision_config
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads) == (
        3584,
        28,
        28,
        4,
    )
    assert (t.intermediate_size, t.vocab_size) == (18944, 152064)
    assert t.rope_parameters["mrope_section"] == [16, 24, 24]
    assert (v.depth, v.hidden_size, v.intermediate_size, v.num_heads, v.out_hidden_size) == (
        32,
        1280,
        3420,
        16,
        3584,
    )
    assert qwen.tie_word_embeddings is False


def test_llava_saproj_is_four_square_projections_per_layer():
    r = plan("llava", config_path(LLAVA), SAProj())
    assert r["params"]["llm"]["trainable"] == r["params"]["all"]["trainable"] == SAPROJ_T
    assert r["params"]["vision"]["trainable"] == r["params"]["projector"]["trainable"] == 0


def test_qwen_saproj_counts_gqa_shapes_and_biases():
    h, kv = 3584, 4 * 128
    per_layer = (h * h + h) + 2 * (h * kv + kv) + h * h  # q, k, v with bias; o without
    assert plan("qwen2_5_vl", config_path(QWEN), SAProj())["params"]["all"]["trainable"] == 28 * per_layer


def test_llava_onevision_total_by_hand():
    """SigLIP-so400m minus its last layer, a 2-layer MLP projector, Qwen2-7B with a 152,128-row
    vocabulary (untied lm_head) and the `image_newline` vector (counted with the LLM)."""
    d, i, layers, positions = 1152, 4304, 26, (384 // 14) ** 2
    block = 4 * (d * d + d) + (d * i + i) + (i * d + d) + 2 * 2 * d
    vision = (3 * 14 * 14 * d + d) + positions * d + layers * block + 2 * d
    h, inter, vocab, kv = 3584, 18944, 152128, 512
    projector = (d * h + h) + (h * h + h)
    layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * inter + 2 * h
    llm = 2 * vocab * h + 28 * layer + h + h
    p = plan("llava_onevision", config_path(OV), Full())["params"]
    assert (p["vision"]["total"], p["projector"]["total"], p["llm"]["total"]) == (vision, projector, llm)


@pytest.mark.parametrize("family,name", CASES)
def test_mlp_gate_up(family, name):
    t = text_config(family, name)
    r = plan(family, config_path(name), MLPGateUp())
    assert r["params"]["all"]["trainable"] == t.num_hidden_layers * 2 * t.hidden_size * t.intermediate_size


@pytest.mark.parametrize("family,name", CASES)
def test_full_total_is_the_real_parameter_count(family, name):
    fam = get_family(family)
    model = build_meta_model(fam, load_config(fam, config_path(name)))
    real = sum(p.numel() for p in model.parameters())
    r = plan(family, config_path(name), Full())
    assert r["params"]["all"]["total"] == r["params"]["all"]["trainable"] == real
    assert sum(r["params"][c]["total"] for c in ("vision", "projector", "llm")) == real
    assert real == {"llava": P, "qwen2_5_vl": 8_292_166_656, "llava_onevision": 8_030_807_584}[family]


@pytest.mark.parametrize("family,name", CASES)
def test_component_recipes_stay_in_their_component(family, name):
    p = plan(family, config_path(name), LLM())["params"]
    assert p["vision"]["trainable"] == p["projector"]["trainable"] == 0
    assert p["llm"]["trainable"] == p["llm"]["total"] > 0
    for recipe, comp in ((VisionEncoder(), "vision"), (Projector(), "projector")):
        p = plan(family, config_path(name), recipe)["params"]
        assert p["all"]["trainable"] == p[comp]["trainable"] == p[comp]["total"] > 0


def test_config_directory_and_patterns(tmp_path):
    shutil.copy(config_path(QWEN), tmp_path / "config.json")
    r = plan("qwen2_5_vl", str(tmp_path), Patterns([r"^llm\.layers\.27\.self_attn\.o_proj\."]))
    assert r["params"]["all"]["trainable"] == 3584 * 3584


# ---- memory, term by term -------------------------------------------------------------------
def test_bf16_weights_one_gpu():
    """bf16 weights under bf16-mixed: no cast copies, gradients and AdamW moments in bf16 (no master)."""
    m = gpu_terms(plan("llava", config_path(LLAVA), SAProj(), micro_batch=8, dtype="bfloat16"))
    assert m["weights"] == P * 2
    assert "compute copies" not in m
    assert m["gradients"] == SAPROJ_T * 2
    assert m["optimizer"] == SAPROJ_T * 2 * 2
    assert m["activations"] == pytest.approx(activations(8, 2048, c=2, w=2), abs=1)
    assert m["logits"] == 8 * 2048 * V * (2 + 4)
    assert m["total"] == sum(v for k, v in m.items() if k != "total")


def test_fp32_weights_bf16_mixed_as_llava_saproj_ships(capsys):
    """configs/llava_saproj.yaml: fp32 weights 26.3 GiB + fp32 gradients 8 + Adam 16 + logits ~3, as
    issue 17 counts them, + the bf16 casts autocast keeps; activations ~15.4 GiB rather than the
    issue's ~11, because the residual stream (the 32 checkpointed layer inputs) stays fp32."""
    r = run_plan(["--config", str(ROOT / "configs" / "llava_saproj.yaml")], capsys)
    m = gpu_terms(r)
    assert m["weights"] == P * 4
    assert m["compute copies"] == (LAYER_LINEARS + HEAD) * 2  # one layer (checkpointing) + lm_head
    assert m["gradients"] == SAPROJ_T * 4 == 8 * GIB
    assert m["optimizer"] == SAPROJ_T * 8 == 16 * GIB
    assert m["activations"] == pytest.approx(activations(8, 2048, c=2, w=4), abs=1)
    assert 15 * GIB < m["activations"] < 16 * GIB
    assert m["logits"] == 8 * 2048 * V * (2 + 4)
    assert set(m) == {"weights", "compute copies", "gradients", "optimizer", "activations", "logits", "total"}
    assert 69 * GIB < m["total"] == sum(v for k, v in m.items() if k != "total") < 70 * GIB
    assert r["setup"]["precision"] == "bf16-mixed" and r["setup"]["dtype"] == "float32"


def test_residual_stream_stays_in_the_weights_dtype_under_autocast():
    """What the activation estimate assumes: fp32 embeddings + bf16 branch outputs add up in fp32."""
    for family in ("llava", "qwen2_5_vl"):
        model, _ = get_family(family).build_tiny("tiny")
        ids = torch.randint(3, 40, (2, 12))
        with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
            out = model.model.language_model(input_ids=ids, output_hidden_states=True)
            logits = model.lm_head(out.last_hidden_state)
        assert {h.dtype for h in out.hidden_states} == {torch.float32}, family
        assert logits.dtype == torch.bfloat16  # lm_head's output in the compute dtype (the logits term)


def test_fsdp1_mixed_precision_keeps_a_bf16_residual():
    m = gpu_terms(plan("llava", config_path(LLAVA), SAProj(), micro_batch=8, num_gpus=8, strategy="fsdp1"))
    assert m["activations"] == pytest.approx(activations(8, 2048, c=2, w=2), abs=1)


def test_no_checkpointing_keeps_every_layer_and_every_cast():
    m = gpu_terms(plan("llava", config_path(LLAVA), SAProj(), micro_batch=4, gradient_checkpointing=False))
    assert m["activations"] == pytest.approx(activations(4, 2048, ckpt=False), abs=L)  # fp32 weights
    assert m["compute copies"] == (L * LAYER_LINEARS + HEAD) * 2


def test_saproj_with_lwf():
    """LwF: a copy of the trainable weights (fp32 here) + the teacher's b x s x V logits in bf16."""
    for gpus in (1, 8):
        r = plan("llava", config_path(LLAVA), SAProj(), num_gpus=gpus, micro_batch=8, methods=[LwF()])
        m = gpu_terms(r)
        assert m["LwF teacher snapshot"] == pytest.approx(SAPROJ_T * 4 / gpus, abs=1)
        assert m["LwF teacher logits"] == 8 * 2048 * V * 2
        plain = gpu_terms(plan("llava", config_path(LLAVA), SAProj(), num_gpus=gpus, micro_batch=8))
        extra = m["LwF teacher snapshot"] + m["LwF teacher logits"]
        assert m["total"] == plain["total"] + extra


def test_full_with_wise_ft_callback_and_alpha_grid():
    m = gpu_terms(plan("llava", config_path(LLAVA), Full(), methods=[WiSEFT(alpha=0.9)]))
    assert m["WiSE-FT start copy"] == P * 4  # every parameter trains: a copy of all of them
    assert m["gradients"] == P * 4 and m["optimizer"] == P * 8
    eight = gpu_terms(plan("llava", config_path(LLAVA), Full(), num_gpus=8, methods=[WiSEFT()]))
    assert eight["WiSE-FT start copy"] == pytest.approx(P * 4 / 8, abs=1)


def test_wise_ft_in_trainer_callbacks_is_read_from_the_yaml(capsys):
    r = run_plan(["--config", str(ROOT / "configs" / "llava_wiseft.yaml")], capsys)
    assert r["recipe"] == "MLP" and r["strategies"] == ["WiSEFT"]
    assert gpu_terms(r)["WiSE-FT start copy"] == MLP_T * 4


def test_lora_on_mlp_replaces_gradients_and_optimizer():
    """LMM_CL's LoRA: r 256 on gate/up/down of every layer, dropout 0.05; only adapters train."""
    r = plan("llava", config_path(LLAVA), MLP(), micro_batch=8, methods=[LoRA(r=256, alpha=32, dropout=0.05)])
    m = gpu_terms(r)
    n = L * 256 * ((H + INTER) + (H + INTER) + (INTER + H))  # A: r x in, B: out x r for gate, up and down
    assert n == 371_195_904
    assert m["LoRA adapters"] == n * 4
    assert m["LoRA gradients"] == n * 4 and "gradients" not in m  # the MLP weights stay frozen
    assert m["LoRA AdamW state"] == n * 8 and "optimizer" not in m
    assert m["LoRA dropout inputs"] == 8 * 2048 * (H + H + INTER) * 2  # one layer's target inputs
    assert m["weights"] == P * 4


def test_l2_anchor_keeps_a_copy_and_the_differences():
    m = gpu_terms(plan("llava", config_path(LLAVA), SAProj(), methods=[L2Anchor()]))
    assert m["L2 anchor"] == m["L2 anchor differences"] == SAPROJ_T * 4


def test_replay_and_hybrid_are_host_memory():
    hybrid = DataHybrid(sources=[Synthetic("shape", n=10)], ratios=[0.5])
    r = plan("llava", config_path(LLAVA), SAProj(), num_gpus=2, methods=[Replay(size=2000), hybrid])
    host = {t["name"]: t for t in r["memory"]["terms"] if t["where"] == "host"}
    assert host["replay buffer"]["bytes"] == 2000 * 120 * 2  # references, per process, 2 processes
    assert all(t["where"] == "host" for n, t in host.items() if "hybrid" in n or "replay" in n)
    assert (
        r["memory"]["gpu_total"]
        == plan("llava", config_path(LLAVA), SAProj(), num_gpus=2)["memory"]["gpu_total"]
    )


def test_fsdp2_shards_state_and_adds_gather_buffers():
    one = gpu_terms(plan("llava", config_path(LLAVA), SAProj(), micro_batch=4))
    eight = gpu_terms(
        plan("llava", config_path(LLAVA), SAProj(), num_gpus=8, micro_batch=4, strategy="fsdp2")
    )
    for key in ("weights", "gradients", "optimizer"):
        assert eight[key] == pytest.approx(one[key] / 8, abs=1)
    for key in ("activations", "logits", "compute copies"):  # per-rank micro-batch: not sharded
        assert eight[key] == one[key]
    # The largest FSDP2 unit of LLaVA-1.5 is a decoder layer (bigger than embed_tokens / lm_head).
    assert eight["FSDP gather buffers"] == 2 * LAYER * 4 + 4 * H * H * 4


def test_fsdp1_pays_gradients_for_every_param_of_a_trainable_unit():
    r = plan("llava", config_path(LLAVA), SAProj(), num_gpus=8, strategy="fsdp1")
    m = gpu_terms(r)
    assert m["gradients"] == L * LAYER * 4 / 8  # whole decoder layers, not just q/k/v/o
    assert m["optimizer"] == SAPROJ_T * 8 / 8
    assert "compute copies" not in m  # FSDP1 gathers in bf16 instead
    # Units: 32 decoder layers, 24 CLIP blocks and the root (embeddings, lm_head, projector, the
    # vision embeddings and norms), the largest; a decoder layer is the largest trainable one.
    d = 1024
    clip_block = 4 * (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d) + 2 * 2 * d
    root = P - L * LAYER - 24 * clip_block
    assert root > LAYER
    assert m["FSDP gather buffers"] == (2 * root + LAYER) * 2


def test_ddp_keeps_a_second_copy_of_the_gradients_in_its_buckets():
    m = gpu_terms(plan("llava", config_path(LLAVA), SAProj(), num_gpus=2, strategy="ddp"))
    assert m["weights"] == P * 4 and m["DDP gradient buckets"] == SAPROJ_T * 4


def test_format_plan_lists_components_and_memory():
    text = format_plan(plan("llava", config_path(LLAVA), SAProj(), num_gpus=8, micro_batch=4))
    for word in ("vision", "projector", "llm", "weights", "gradients", "optimizer", "activations", "GiB"):
        assert word in text
    assert f"{SAPROJ_T:,}" in text and "FSDP2" in text


# ---- the flag form --------------------------------------------------------------------------
def test_cli_prints_the_table(capsys):
    argv = ["--family", "llava", "--config", config_path(LLAVA), "--recipe", "SAProj", "--gpus", "8"]
    assert main([*argv, "--micro-batch", "4", "--seq-len", "2048"]) == 0
    out = capsys.readouterr().out
    assert "SAProj" in out and "memory per GPU (8 GPU(s))" in out and "micro-batch 4" in out
    r = run_plan(["--family", "qwen2_5_vl", "--patterns", r"^llm\.lm_head\."], capsys)
    assert r["params"]["all"]["trainable"] == 152064 * 3584


@pytest.mark.parametrize(
    "argv",
    [
        ["--family", "llava", "--recipe", "NoSuchRecipe"],
        ["--family", "llava", "--recipe", "SAProj", "--config", "/no/such/config.json"],
        ["--family", "nope", "--recipe", "SAProj"],
        ["--family", "llava", "--config", QWEN, "--recipe", "SAProj"],
        ["--family", "llava", "--patterns", "^nothing-matches"],
        ["--family", "llava", "--recipe", "SAProj", "--gpus", "two"],
        ["--family", "llava", "--recipe", "SAProj", "--precision", "transformer-engine"],
        ["--family", "llava", "--recipe", "SAProj", "--config", "configs/llava_saproj.yaml"],
        ["--config", "/no/such/fit.yaml"],
        ["--config", "configs/tiny_llava_test.yaml", "--model.recipe", "NoSuchRecipe"],
    ],
)
def test_cli_errors_are_one_line_and_exit_2(argv, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1


def test_python_m_mllm_cl_plan_dispatch(capsys):
    from mllm_cl.cli import main as cli_main

    with pytest.raises(SystemExit) as exit_info:
        cli_main(["plan", "--family", "llava", "--recipe", "MLPGateUp"])
    assert exit_info.value.code == 0
    assert "MLPGateUp" in capsys.readouterr().out


# ---- the fit-YAML form ----------------------------------------------------------------------
def test_fit_form_reads_the_run_and_overrides(capsys):
    stack = ["--config", str(ROOT / "configs" / "qwen25vl_saproj.yaml")]
    eight = ["--config", str(ROOT / "configs" / "trainer_fsdp_multigpu.yaml"), "--trainer.devices", "8"]
    r = run_plan([*stack, *eight, "--trainer.accumulate_grad_batches", "1", "--data.batch_size", "4"], capsys)
    s = r["setup"]
    assert (s["devices"], s["strategy"], s["micro_batch"], s["accumulate"], s["seq_len"]) == (
        8,
        "fsdp2",
        4,
        1,
        2048,
    )
    assert r["family"] == "qwen2_5_vl" and r["recipe"] == "SAProj"
    t = r["params"]["all"]["trainable"]
    assert gpu_terms(r)["gradients"] == pytest.approx(t * 4 / 8, abs=1)
    # Data loader: pixel values of one capped image = max_pixels x 3 channels x 2 frames x 4 B.
    host = {x["name"]: x["bytes"] for x in r["memory"]["terms"] if x["where"] == "host"}
    assert host["data loader batches"] == 8 * 2 * 4 * (2048 * 3 * 8 + 1003520 * 3 * 2 * 4) * 8


def test_run_size_of_the_lmm_cl_stream(capsys):
    """(T + 1) x Σ eval sizes with the presets' public sizes; CUB / PixMo-Count test sizes unknown."""
    r = run_plan(["--config", str(ROOT / "configs" / "llava_saproj.yaml")], capsys)
    public = {"pathvqa": 6719, "textvqa": 5000, "timeclock": 1440, "ai2d": 3088, "chartqa": 2500,
              "docvqa_val": 5349, "infovqa_val": 2801, "realworldqa": 765, "scienceqa_img": 2017,
              "mmstar": 1500, "ocrbench": 1000, "seedbench": 14233}  # fmt: skip
    run = r["run"]
    assert run["eval_rows"] == 5 + 1
    assert run["eval_per_row"] == sum(public.values())
    assert run["generated"] == 6 * sum(public.values())
    assert sorted(run["eval_unknown"]) == ["cub200", "pixmocount"]
    assert run["total_steps"] is None  # the training files are placeholders
    assert [t["steps"] for t in r["tasks"]] == [None] * 5


def write_run(tmp_path, edit) -> str:
    config = yaml.safe_load((ROOT / "configs" / "tiny_llava_test.yaml").read_text())
    edit(config)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_steps_from_epochs_data_size_batch_and_accumulation(tmp_path, capsys):
    records = [{"id": 0, "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}]
    (tmp_path / "train.json").write_text(json.dumps(records * 100))
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in records * 45) + "\n")

    def edit(c):
        c["data"]["tasks"][0] = {"name": "json", "epochs": 2, "train": {"class_path": "LlavaJson", "init_args": {"path": str(tmp_path / "train.json")}}}  # fmt: skip
        c["data"]["tasks"][1] = {"name": "jsonl", "train": {"class_path": "LlavaJson", "init_args": {"path": str(tmp_path / "train.jsonl")}}}  # fmt: skip
        c["trainer"]["accumulate_grad_batches"] = 2

    r = run_plan(["--config", write_run(tmp_path, edit), "--step-time", "3", "--gen-time", "0.5"], capsys)
    per_step = 8 * 2  # batch 8 x accumulation 2 x 1 GPU
    assert [t["rows"] for t in r["tasks"]] == [100, 45]
    assert [t["steps"] for t in r["tasks"]] == [200 // per_step, 45 // per_step]
    run = r["run"]
    assert run["total_steps"] == 12 + 2 and run["train_seconds"] == 14 * 3
    # The two tasks have no eval set now: only the held-out set (24 samples) is generated, 3 times.
    assert run["generated"] == 3 * 24 and run["eval_seconds"] == 3 * 24 * 0.5


def test_wise_ft_alpha_grid_adds_evaluations(tmp_path, capsys):
    def edit(c):
        c["trainer"]["callbacks"] = [{"class_path": "WiSEFT", "init_args": {"alphas": [0.5, 0.9, 1.0]}}]

    r = run_plan(["--config", write_run(tmp_path, edit)], capsys)
    assert r["run"]["eval_rows"] == 2 + 1 + 2 * 3  # before, after each task, and each α of the grid
    assert r["run"]["generated"] == 9 * (24 + 24 + 24)


def shipped_fit_configs() -> list[Path]:
    configs = ROOT / "configs"
    return sorted(p for p in configs.glob("*.yaml")) + sorted((configs / "paper").glob("*.yaml"))


@pytest.fixture(scope="module")
def demo_config(tmp_path_factory) -> str:
    """config.json of the demo-size model that configs/demo_base.yaml exports (runs/demo/base_model)."""
    model, _ = get_family("llava").build_tiny("demo")
    folder = tmp_path_factory.mktemp("demo_model")
    model.config.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("path", shipped_fit_configs(), ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_plan_config_of_every_shipped_fit_yaml_counts_as_the_flag_form(path, demo_config, tmp_path, capsys):
    raw = yaml.safe_load(path.read_text())
    argv = ["--config", str(path)]
    if "data" not in raw and "config" not in raw:  # trainer-only: combined with a model/data config
        argv = ["--config", str(ROOT / "configs" / "tiny_llava_test.yaml"), *argv]
    pretrained = (raw.get("model") or {}).get("pretrained", "")
    if pretrained.startswith("runs/"):  # the demo's exported model: its config.json, built here
        argv += ["--model-config", demo_config]
    r = run_plan(argv, capsys)
    config_json = r["config_path"]
    if config_json is None:  # a tiny model built in memory: save its config for the flag form
        model, _ = get_family(r["family"]).build_tiny((raw.get("model") or {}).get("tiny", "tiny"))
        model.config.save_pretrained(tmp_path)
        config_json = str(tmp_path)
    flags = ["--family", r["family"], "--config", config_json]
    flags += ["--patterns", *r["patterns"]] if r["recipe"] == "Patterns" else ["--recipe", r["recipe"]]
    flags += ["--exclude", *r["exclude"]] if r["exclude"] else []
    assert run_plan(flags, capsys)["params"] == r["params"]
