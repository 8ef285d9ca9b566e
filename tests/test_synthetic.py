"""Tests for the synthetic VQA generator: every answer is checked against the drawn pixels."""

import json
import re
from collections import Counter, deque
from pathlib import Path

import datasets
import numpy as np
import pytest

from mllm_cl.data import synthetic
from mllm_cl.data.synthetic import (
    COLOURS,
    SHAPES,
    SKILLS,
    STYLES,
    make_samples,
    synthetic_dataset,
    vocabulary,
)

TOKEN_RE = re.compile(r"\w+|[^\w\s]")
SIZE = 64


def pixels(sample) -> np.ndarray:
    return np.asarray(sample["image"], dtype=np.int16)


def foreground(arr: np.ndarray, style: str) -> np.ndarray:
    """Mask of non-background pixels, using a background test specific to each style."""
    if style == "plain":
        return ~(arr == 255).all(-1)
    if style == "dark":
        return ~(arr == 40).all(-1)
    # Noisy: the speckle is light grey (r == g == b), shape colours are saturated.
    grey = (arr[..., 0] == arr[..., 1]) & (arr[..., 1] == arr[..., 2]) & (arr[..., 0] >= 150)
    return ~grey


def components(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """8-connected components of a boolean mask, found by breadth-first flood fill."""
    seen = np.zeros_like(mask)
    found = []
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue, comp = deque([(y0, x0)]), []
        while queue:
            y, x = queue.popleft()
            comp.append((y, x))
            for ny in (y - 1, y, y + 1):
                for nx in (x - 1, x, x + 1):
                    if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
        found.append(comp)
    return found


def colour_counts(arr: np.ndarray, style: str) -> Counter:
    return Counter(map(tuple, arr[foreground(arr, style)].tolist()))


def colour_name(rgb: tuple[int, ...]) -> str:
    return next(name for name, value in COLOURS.items() if value == tuple(rgb))


def fill_shape(arr: np.ndarray, style: str) -> str:
    """Guess the single object's shape from how much of its pixel bbox it fills."""
    ys, xs = np.nonzero(foreground(arr, style))
    ratio = len(ys) / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    # square 1.0, circle ~0.785, triangle ~0.5 (small drawings fill a bit more).
    return "square" if ratio > 0.92 else "circle" if ratio > 0.68 else "triangle"


def yes_ratio(samples) -> float:
    return sum(s["answer"] == "yes" for s in samples) / len(samples)


@pytest.mark.parametrize("skill", SKILLS)
def test_same_arguments_give_identical_samples(skill):
    a = make_samples(skill, 20, seed=7, style="noisy")
    b = make_samples(skill, 20, seed=7, style="noisy")
    other = make_samples(skill, 20, seed=8, style="noisy")
    key = ("id", "question", "answer", "skill", "meta")
    assert [[s[k] for k in key] for s in a] == [[s[k] for k in key] for s in b]
    assert [s["image"].tobytes() for s in a] == [s["image"].tobytes() for s in b]
    assert [s["image"].tobytes() for s in a] != [s["image"].tobytes() for s in other]
    assert [s["meta"] for s in a] != [s["meta"] for s in other]
    assert [s["meta"] for s in make_samples(skill, 5, seed=7)] == [s["meta"] for s in a[:5]]


def test_sample_format_and_styles_share_scenes():
    by_style = {style: make_samples("spatial", 10, seed=1, image_size=48, style=style) for style in STYLES}
    for style, samples in by_style.items():
        assert len({s["id"] for s in samples}) == 10
        for s in samples:
            assert set(s) == {"id", "image", "question", "answer", "skill", "meta"}
            assert s["image"].mode == "RGB" and s["image"].size == (48, 48)
            assert s["skill"] == "spatial" and style in s["id"]
    texts = {style: [(s["question"], s["answer"], s["meta"]) for s in v] for style, v in by_style.items()}
    assert texts["plain"] == texts["noisy"] == texts["dark"]
    assert by_style["plain"][0]["image"].tobytes() != by_style["dark"][0]["image"].tobytes()
    assert pixels(by_style["dark"][0])[foreground(pixels(by_style["dark"][0]), "dark")].size > 0


@pytest.mark.parametrize("image_size", [32, 64, 96])
@pytest.mark.parametrize("skill", ["count", "spatial", "shape"])
def test_objects_inside_canvas_sized_and_exact_colour(skill, image_size):
    for s in make_samples(skill, 30, seed=2, image_size=image_size, style="noisy"):
        arr, covered = pixels(s), np.zeros((image_size, image_size), dtype=bool)
        for obj in json.loads(s["meta"]):
            x0, y0, x1, y1 = obj["bbox"]
            assert 0 <= x0 <= x1 < image_size and 0 <= y0 <= y1 < image_size
            assert image_size // 8 <= x1 - x0 + 1 <= image_size // 4 and x1 - x0 == y1 - y0
            assert obj["shape"] in SHAPES and obj["colour"] in COLOURS
            covered[y0 : y1 + 1, x0 : x1 + 1] = True
        fg = foreground(arr, "noisy")
        assert not (fg & ~covered).any(), "a drawn pixel lies outside every bbox"
        assert set(colour_counts(arr, "noisy")) <= set(COLOURS.values()), "not an exact colour"


@pytest.mark.parametrize("style", STYLES)
def test_count_answer_equals_connected_components(style):
    samples = make_samples("count", 50, seed=3, style=style)
    assert {s["answer"] for s in samples} == {"1", "2", "3", "4", "5"}
    for s in samples:
        shape = json.loads(s["meta"])[0]["shape"]
        assert s["question"] == f"How many {shape}s are in the image?"
        assert len(components(foreground(pixels(s), style))) == int(s["answer"])


def test_count_ood_text_answer_matches_components():
    samples = make_samples("count_ood_text", 60, seed=4, style="noisy")
    for s in samples:
        k = int(re.fullmatch(r"Are there more than (\d) objects in the image\?", s["question"]).group(1))
        n = len(components(foreground(pixels(s), "noisy")))
        assert s["answer"] == ("yes" if n > k else "no")
    assert 0.3 <= yes_ratio(samples) <= 0.7


@pytest.mark.parametrize("style", STYLES)
def test_colour_answer_is_dominant_colour(style):
    for s in make_samples("colour", 50, seed=5, style=style):
        counts = colour_counts(pixels(s), style)
        assert counts.most_common(1)[0][0] == COLOURS[s["answer"]]
        assert len(counts) == 1


def test_colour_ood_text_answer_matches_pixels():
    samples = make_samples("colour_ood_text", 80, seed=6, style="dark")
    for s in samples:
        shape, asked = re.fullmatch(r"Is the (\w+) (\w+)\?", s["question"]).groups()
        drawn = colour_name(colour_counts(pixels(s), "dark").most_common(1)[0][0])
        assert s["answer"] == ("yes" if drawn == asked else "no")
        assert shape == fill_shape(pixels(s), "dark")
    assert 0.35 <= yes_ratio(samples) <= 0.65


@pytest.mark.parametrize("style", STYLES)
def test_spatial_answer_matches_blob_centroids(style):
    samples = make_samples("spatial", 100, seed=7, style=style)
    for s in samples:
        c1, _, c2, _ = re.fullmatch(r"Is the (\w+) (\w+) left of the (\w+) (\w+)\?", s["question"]).groups()
        arr = pixels(s)
        xs1 = np.nonzero((arr == COLOURS[c1]).all(-1))[1]
        xs2 = np.nonzero((arr == COLOURS[c2]).all(-1))[1]
        assert c1 != c2 and xs1.size and xs2.size
        assert xs1.max() < xs2.min() or xs2.max() < xs1.min(), "objects overlap horizontally"
        assert s["answer"] == ("yes" if xs1.mean() < xs2.mean() else "no")
    assert 0.35 <= yes_ratio(samples) <= 0.65


@pytest.mark.parametrize("style", STYLES)
def test_shape_answer_matches_fill_ratio(style):
    samples = make_samples("shape", 50, seed=8, style=style)
    assert {s["answer"] for s in samples} == set(SHAPES)
    for s in samples:
        assert s["question"] == "What shape is in the image?"
        assert fill_shape(pixels(s), style) == s["answer"]


def test_classify_lists_every_label_in_shuffled_order():
    samples = make_samples("classify", 40, seed=9, style="plain")
    orders = set()
    for s in samples:
        prefix = "Which shape is this? Choose one of: "
        assert s["question"].startswith(prefix) and s["question"].endswith(".")
        labels = s["question"][len(prefix) : -1].split(", ")
        assert sorted(labels) == sorted(SHAPES)
        assert s["answer"] in labels and s["answer"] == fill_shape(pixels(s), "plain")
        orders.add(tuple(labels))
    assert len(orders) > 1


def test_vocabulary_covers_every_question_and_answer():
    vocab = vocabulary()
    assert vocab == sorted(set(vocab)) and all(w == w.lower() for w in vocab)
    for skill in SKILLS:
        for style in STYLES:
            for s in make_samples(skill, 40, seed=10, image_size=32, style=style):
                words = TOKEN_RE.findall(f"{s['question']} {s['answer']}".lower())
                assert set(words) <= set(vocab), (skill, set(words) - set(vocab))


def test_the_tiny_tokenizer_lists_the_generator_words():
    """`mllm_cl.tiny` writes the generator's words out (so it need not import the data package)."""
    from mllm_cl.tiny import SYNTHETIC_WORDS

    assert SYNTHETIC_WORDS == vocabulary()


def test_synthetic_dataset_matches_samples_and_uses_cache(tmp_path):
    args = ("spatial", 12, 3, 48, "noisy")
    ds = synthetic_dataset(*args, cache_dir=str(tmp_path))
    assert isinstance(ds, datasets.Dataset) and len(ds) == 12
    assert ds.column_names == ["id", "image", "question", "answer", "skill", "meta"]
    assert isinstance(ds.features["image"], datasets.Image)
    for row, s in zip(ds, make_samples(*args), strict=True):
        assert [row[k] for k in ("id", "question", "answer", "skill", "meta")] == [
            s[k] for k in ("id", "question", "answer", "skill", "meta")
        ]
        assert np.array_equal(np.asarray(row["image"].convert("RGB")), np.asarray(s["image"]))

    (folder,) = tmp_path.iterdir()  # one finished folder, no temp leftovers
    assert folder.is_dir() and not folder.name.startswith(".")
    (folder / "marker").write_text("kept")
    again = synthetic_dataset(*args, cache_dir=str(tmp_path))
    assert (folder / "marker").read_text() == "kept", "cache folder was rewritten"
    assert again.cache_files and all(f["filename"].startswith(str(folder)) for f in again.cache_files)
    assert again["answer"] == ds["answer"] and list(tmp_path.iterdir()) == [folder]


def test_second_call_loads_without_drawing(tmp_path, monkeypatch):
    first = synthetic_dataset("shape", 6, 1, cache_dir=str(tmp_path))

    def no_drawing(*args, **kwargs):
        raise AssertionError("cache hit expected, but the samples were drawn again")

    monkeypatch.setattr(synthetic, "make_samples", no_drawing)
    assert synthetic_dataset("shape", 6, 1, cache_dir=str(tmp_path))["meta"] == first["meta"]


def test_cache_key_covers_arguments_and_generator_version(tmp_path, monkeypatch):
    synthetic_dataset("count", 4, 0, cache_dir=str(tmp_path))
    synthetic_dataset("count", 4, 1, cache_dir=str(tmp_path))
    synthetic_dataset("count", 4, 0, style="dark", cache_dir=str(tmp_path))
    monkeypatch.setattr(synthetic, "GENERATOR_VERSION", synthetic.GENERATOR_VERSION + 1)
    synthetic_dataset("count", 4, 0, cache_dir=str(tmp_path))
    assert len(list(tmp_path.iterdir())) == 4
    monkeypatch.setenv("MLLM_CL_CACHE", str(tmp_path / "env"))
    ds = synthetic_dataset("shape", 3, 0)
    assert all(f["filename"].startswith(str(tmp_path / "env")) for f in ds.cache_files)


def test_interrupted_write_leaves_no_cache(tmp_path, monkeypatch):
    def broken_save(self, path, **kwargs):
        (Path(path) / "half-written").write_text("x")
        raise KeyboardInterrupt

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", broken_save)
    with pytest.raises(KeyboardInterrupt):
        synthetic_dataset("colour", 5, 0, cache_dir=str(tmp_path))
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    assert len(synthetic_dataset("colour", 5, 0, cache_dir=str(tmp_path))) == 5


@pytest.mark.parametrize(
    ("kwargs", "valid"), [({"skill": "nope"}, SKILLS), ({"skill": "count", "style": "sepia"}, STYLES)]
)
def test_unknown_skill_or_style_raises_listing_valid_names(kwargs, valid, tmp_path):
    for fn, extra in ((make_samples, {}), (synthetic_dataset, {"cache_dir": str(tmp_path)})):
        with pytest.raises(ValueError) as err:
            fn(n=1, seed=0, **kwargs, **extra)
        message = str(err.value)
        assert "\n" not in message and all(name in message for name in valid)
