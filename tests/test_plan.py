"""`mllm_cl.plan`: parameter counts of the real 7B architectures (built on meta) and memory estimates."""

import json
import shutil

import pytest

from mllm_cl.families import get_family
from mllm_cl.plan import (
    DTYPE_BYTES,
    build_meta_model,
    bundled_configs,
    format_plan,
    load_config,
    main,
    plan,
)
from strategies import LLM, Full, MLPGateUp, Patterns, Projector, SAProj, VisionEncoder

LLAVA = "llava-1.5-7b-hf"
QWEN = "qwen2.5-vl-7b-instruct"
OV = "llava-onevision-qwen2-7b-ov-hf"
CASES = [("llava", LLAVA), ("qwen2_5_vl", QWEN), ("llava_onevision", OV)]


def config_path(name):
    return str(bundled_configs()[name])


def text_config(family, name):
    return load_config(get_family(family), config_path(name)).get_text_config()


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
        4096,
        32,
        32,
        11008,
    )
    assert (t.vocab_size, t.max_position_embeddings, llava.image_token_index) == (32064, 4096, 32000)
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.image_size, v.patch_size) == (
        1024,
        24,
        16,
        336,
        14,
    )
    assert (llava.vision_feature_layer, llava.vision_feature_select_strategy) == (-2, "default")

    qwen = load_config(get_family("qwen2_5_vl"), config_path(QWEN))
    t, v = qwen.text_config, qwen.vision_config
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads) == (
        3584,
        28,
        28,
        4,
    )
    assert (t.intermediate_size, t.vocab_size) == (18944, 152064)
    assert t.rope_parameters["rope_theta"] == 1e6
    assert t.rope_parameters["mrope_section"] == [16, 24, 24]
    assert (v.depth, v.hidden_size, v.intermediate_size, v.num_heads, v.out_hidden_size) == (
        32,
        1280,
        3420,
        16,
        3584,
    )
    assert list(v.fullatt_block_indexes) == [7, 15, 23, 31]
    assert qwen.tie_word_embeddings is False


def test_llava_saproj_is_four_square_projections_per_layer():
    t = text_config("llava", LLAVA)
    r = plan("llava", config_path(LLAVA), SAProj())
    assert r["params"]["llm"]["trainable"] == t.num_hidden_layers * 4 * t.hidden_size**2 == 32 * 4 * 4096**2
    assert r["params"]["all"]["trainable"] == r["params"]["llm"]["trainable"]
    assert r["params"]["vision"]["trainable"] == r["params"]["projector"]["trainable"] == 0


def test_qwen_saproj_counts_gqa_shapes_and_biases():
    t = text_config("qwen2_5_vl", QWEN)
    h = t.hidden_size
    kv = t.num_key_value_heads * (h // t.num_attention_heads)  # 4 x 128 = 512
    per_layer = (h * h + h) + 2 * (h * kv + kv) + h * h  # q, k, v with bias; o without
    r = plan("qwen2_5_vl", config_path(QWEN), SAProj())
    assert kv == 512
    assert r["params"]["all"]["trainable"] == t.num_hidden_layers * per_layer


def test_llava_onevision_config_has_the_published_numbers():
    ov = load_config(get_family("llava_onevision"), config_path(OV))
    t, v = ov.text_config, ov.vision_config
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads) == (
        3584,
        28,
        28,
        4,
    )
    assert (t.intermediate_size, t.vocab_size, t.max_position_embeddings) == (18944, 152128, 32768)
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size) == (
        1152,
        26,
        16,
        4304,
    )
    assert (v.image_size, v.patch_size, v.vision_use_head) == (384, 14, False)
    assert (ov.image_token_index, ov.video_token_index, ov.vision_feature_layer) == (151646, 151647, -1)
    assert (ov.vision_feature_select_strategy, ov.vision_aspect_ratio) == ("full", "anyres_max_9")
    assert ov.image_grid_pinpoints == [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]
    assert ov.tie_word_embeddings is False


def test_llava_onevision_saproj_counts_gqa_shapes_and_biases():
    """Qwen2-7B attention: q 3584x3584 + bias, k and v 3584x512 (4 kv heads x 128) + bias, o 3584x3584."""
    h, kv = 3584, 4 * 128
    per_layer = (h * h + h) + 2 * (h * kv + kv) + h * h
    r = plan("llava_onevision", config_path(OV), SAProj())
    assert r["params"]["all"]["trainable"] == r["params"]["llm"]["trainable"] == 28 * per_layer == 822_212_608


def test_llava_onevision_total_by_hand():
    """SigLIP-so400m minus its last layer (no head), a 2-layer MLP projector, Qwen2-7B with llava-hf's
    152,128-row vocabulary (untied lm_head) and the `image_newline` vector (counted with the LLM)."""
    d, i, layers, positions = 1152, 4304, 26, (384 // 14) ** 2
    block = 4 * (d * d + d) + (d * i + i) + (i * d + d) + 2 * 2 * d  # attention, MLP, two LayerNorms
    vision = (3 * 14 * 14 * d + d) + positions * d + layers * block + 2 * d  # patch conv, positions, post-LN
    h, inter, vocab, kv = 3584, 18944, 152128, 512
    projector = (d * h + h) + (h * h + h)
    layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * inter + 2 * h
    llm = 2 * vocab * h + 28 * layer + h + h  # embeddings + lm_head, layers, final norm, image_newline
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
    assert next(model.parameters()).device.type == "meta"
    real = sum(p.numel() for p in model.parameters())
    r = plan(family, config_path(name), Full())
    assert r["params"]["all"]["total"] == r["params"]["all"]["trainable"] == real
    assert sum(r["params"][c]["total"] for c in ("vision", "projector", "llm")) == real
    # Published sizes; OneVision's hub page says 8.03B (the exact figure: `test_llava_onevision_total_by_hand`).
    assert (
        real
        == {"llava": 7_063_427_072, "qwen2_5_vl": 8_292_166_656, "llava_onevision": 8_030_807_584}[family]
    )


@pytest.mark.parametrize("family,name", CASES)
def test_component_recipes_stay_in_their_component(family, name):
    r = plan(family, config_path(name), LLM())
    p = r["params"]
    assert p["vision"]["trainable"] == p["projector"]["trainable"] == 0
    assert p["llm"]["trainable"] == p["llm"]["total"] > 0
    for recipe, comp in ((VisionEncoder(), "vision"), (Projector(), "projector")):
        p = plan(family, config_path(name), recipe)["params"]
        assert p["all"]["trainable"] == p[comp]["trainable"] == p[comp]["total"] > 0


def test_memory_formulas_and_sharding():
    one = plan("llava", config_path(LLAVA), SAProj(), num_gpus=1, micro_batch=4, seq_len=2048)
    eight = plan("llava", config_path(LLAVA), SAProj(), num_gpus=8, micro_batch=4, seq_len=2048)
    total, trainable = one["params"]["all"]["total"], one["params"]["all"]["trainable"]
    m1, m8 = one["memory"], eight["memory"]
    assert m1["weights"] == total * 2
    assert m1["gradients"] == trainable * 2
    assert m1["optimizer"] == trainable * 8
    for key in ("weights", "gradients", "optimizer"):
        assert m8[key] == pytest.approx(m1[key] / 8, abs=1)
    for key in ("activations", "logits"):  # per-rank micro-batch: not sharded
        assert m8[key] == m1[key]
    assert m1["total"] == sum(v for k, v in m1.items() if k != "total")

    s, b, h, a, L = 2048, 4, 4096, 32, 32
    layer = s * b * h * (34 + 5 * a * s / h)
    assert m1["activations"] == pytest.approx(L * s * b * h * 2 + layer, abs=1)
    no_ckpt = plan("llava", config_path(LLAVA), SAProj(), micro_batch=4, gradient_checkpointing=False)
    assert no_ckpt["memory"]["activations"] == pytest.approx(L * layer, abs=L)
    assert m1["logits"] == b * s * 32064 * (2 + 4)

    master = plan("llava", config_path(LLAVA), SAProj(), master_weights=True, dtype="float32")
    assert master["memory"]["optimizer"] == trainable * 12
    assert master["memory"]["weights"] == total * DTYPE_BYTES["float32"]


def test_config_directory_and_patterns(tmp_path):
    shutil.copy(config_path(QWEN), tmp_path / "config.json")
    r = plan("qwen2_5_vl", str(tmp_path), Patterns([r"^llm\.layers\.27\.self_attn\.o_proj\."]))
    assert r["params"]["all"]["trainable"] == 3584 * 3584


def test_format_plan_lists_components_and_memory():
    text = format_plan(plan("llava", config_path(LLAVA), SAProj(), num_gpus=8, micro_batch=4))
    for word in (
        "vision",
        "projector",
        "llm",
        "weights",
        "gradients",
        "optimizer",
        "activations",
        "total",
        "GiB",
    ):
        assert word in text
    assert f"{32 * 4 * 4096**2:,}" in text


def test_cli_prints_the_table(capsys):
    argv = ["--family", "llava", "--config", config_path(LLAVA), "--recipe", "SAProj", "--gpus", "8"]
    assert main([*argv, "--micro-batch", "4", "--seq-len", "2048"]) == 0
    out = capsys.readouterr().out
    assert "SAProj" in out and "memory per GPU: 8 GPU(s), micro-batch 4, seq 2048" in out
    assert main(["--family", "qwen2_5_vl", "--patterns", r"^llm\.lm_head\.", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["params"]["all"]["trainable"] == 152064 * 3584


@pytest.mark.parametrize(
    "argv",
    [
        ["--family", "llava", "--recipe", "NoSuchRecipe"],
        ["--family", "llava", "--recipe", "SAProj", "--config", "/no/such/config.json"],
        ["--family", "nope", "--recipe", "SAProj"],
        ["--family", "llava", "--config", QWEN, "--recipe", "SAProj"],
        ["--family", "llava", "--patterns", "^nothing-matches"],
        ["--family", "llava", "--recipe", "SAProj", "--gpus", "two"],
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
