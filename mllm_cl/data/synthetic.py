"""Offline, seeded generator of synthetic visual-question-answer samples.

Each sample is a small PIL-drawn scene of filled, coloured shapes with a templated question
and a one-word answer, so a tiny multimodal LLM can be trained and evaluated on a CPU with no
download. Everything comes from a ``random.Random(seed)`` made inside the call: the same
arguments always give byte-identical images and identical text.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw

from mllm_cl.data.cache import cache_root, save_atomically

if TYPE_CHECKING:
    import datasets

# Bump whenever drawing or wording changes, so stale on-disk caches are never reused.
GENERATOR_VERSION = 1

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 200, 20),
    "purple": (140, 50, 180),
    "orange": (250, 130, 20),
}
SHAPES: tuple[str, ...] = ("square", "circle", "triangle")
# The *_ood_text skills reuse count/colour scenes with question wording unseen in those skills.
SKILLS = ("count", "colour", "shape", "spatial", "classify", "count_ood_text", "colour_ood_text")
STYLES: tuple[str, ...] = ("plain", "noisy", "dark")

_BACKGROUNDS = {"plain": (255, 255, 255), "noisy": (255, 255, 255), "dark": (40, 40, 40)}
# Empty pixels kept between any two bounding boxes, so objects are separate components.
_MARGIN = 2
_MAX_COUNT = 5
_MIN_IMAGE_SIZE = 16
_TOKEN_RE = re.compile(r"\w+|[^\w\s]")
_COLUMNS = ("id", "image", "question", "answer", "skill", "meta")

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class _Obj:
    """One drawn object: shape name, colour name, inclusive pixel bbox ``(x0, y0, x1, y1)``."""

    shape: str
    colour: str
    bbox: Box


# Question templates: the single source for generation and for vocabulary().
_Q_COUNT = "How many {shape}s are in the image?"
_Q_COLOUR = "What colour is the {shape}?"
_Q_SHAPE = "What shape is in the image?"
_Q_SPATIAL = "Is the {c1} {s1} left of the {c2} {s2}?"
_Q_CLASSIFY = "Which shape is this? Choose one of: {labels}."
_Q_MORE_THAN = "Are there more than {k} objects in the image?"
_Q_IS_COLOUR = "Is the {shape} {colour}?"


def _side(rng: random.Random, sides: tuple[int, int]) -> int:
    """Draw an object side length in pixels from the inclusive range `sides`."""
    return rng.randint(*sides)


def _box(x: int, y: int, side: int) -> Box:
    return (x, y, x + side - 1, y + side - 1)


def _separated(a: Box, b: Box) -> bool:
    """True when at least ``_MARGIN`` empty pixels lie between the two boxes on some axis."""
    return a[2] + _MARGIN < b[0] or b[2] + _MARGIN < a[0] or a[3] + _MARGIN < b[1] or b[3] + _MARGIN < a[1]


def _random_box(rng: random.Random, size: int, sides: tuple[int, int]) -> Box:
    side = _side(rng, sides)
    return _box(rng.randint(0, size - side), rng.randint(0, size - side), side)


def _count_scene(rng: random.Random, size: int, sides: tuple[int, int]) -> list[_Obj]:
    """1-5 objects of one shape, placed by rejection sampling so their boxes are apart.

    Colours may differ so counting cannot rely on colour. A dead end restarts the layout;
    five boxes of at most size/4 cover well under half the canvas, so this ends in practice.
    """
    shape, count = rng.choice(SHAPES), rng.randint(1, _MAX_COUNT)
    for _ in range(100):
        boxes: list[Box] = []
        for _ in range(200):
            box = _random_box(rng, size, sides)
            if all(_separated(box, other) for other in boxes):
                boxes.append(box)
                if len(boxes) == count:
                    return [_Obj(shape, rng.choice(list(COLOURS)), b) for b in boxes]
    raise RuntimeError(f"could not place {count} separated objects on a {size}px canvas")


def _single(rng: random.Random, size: int, sides: tuple[int, int]) -> _Obj:
    return _Obj(rng.choice(SHAPES), rng.choice(list(COLOURS)), _random_box(rng, size, sides))


def _left_right(rng: random.Random, size: int, sides: tuple[int, int]) -> tuple[_Obj, _Obj]:
    """Two differently coloured objects whose x-ranges are clearly apart."""
    gap = max(_MARGIN + 1, size // 16)
    s_left, s_right = _side(rng, sides), _side(rng, sides)
    x_left = rng.randint(0, size - s_left - s_right - gap)
    x_right = rng.randint(x_left + s_left + gap, size - s_right)
    c_left, c_right = rng.sample(list(COLOURS), 2)
    left = _Obj(rng.choice(SHAPES), c_left, _box(x_left, rng.randint(0, size - s_left), s_left))
    right = _Obj(rng.choice(SHAPES), c_right, _box(x_right, rng.randint(0, size - s_right), s_right))
    return left, right


# Each skill draws one scene and returns (objects, question, answer).
Scene = tuple[list[_Obj], str, str]


def _skill_count(rng: random.Random, size: int, sides: tuple[int, int]) -> Scene:
    objs = _count_scene(rng, size, sides)
    return objs, _Q_COUNT.format(shape=objs[0].shape), str(len(objs))


def _skill_colour(rng: random.Random, size: int, sides: tuple[int, int]) -> Scene:
    obj = _single(rng, size, sides)
    return [obj], _Q_COLOUR.format(shape=obj.shape), obj.colour


def _skill_shape(rng: random.Random, size: int, sides: tuple[int, int]) -> Scene:
    obj = _single(rng, size, sides)
    return [obj], _Q_SHAPE, obj.shape


def _skill_spatial(rng: random.Random, size: int, sides: tuple[int, int]) -> Scene:
    left, right = _left_right(rng, size, sides)
    yes = rng.random() < 0.5
    first, second = (left, right) if yes else (right, left)
    question = _Q_SPATIAL.format(c1=first.colour, s1=first.shape, c2=second.colour, s2=second.shape)
    return [left, right], question, "yes" if yes else "no"


def _skill_classify(rng: random.Random, size: int, sides: tuple[int, int]) -> Scene:
    obj = _single(rng, size, sides)
    labels = list(SHAPES)
    rng.shuffle(labels)  # label order varies so the model cannot learn a position prior
    return [obj], _Q_CLASSIFY.format(labels=", ".join(labels)), obj.shape


def _skill_count_ood_text(rng: random.Random, size: int, sides: tuple[int, int]) -> Scene:
    # With count uniform in 1..5 and k uniform in 1..4, P(count > k) is exactly 1/2.
    objs = _count_scene(rng, size, sides)
    k = rng.randint(1, _MAX_COUNT - 1)
    return objs, _Q_MORE_THAN.format(k=k), "yes" if len(objs) > k else "no"


def _skill_colour_ood_text(rng: random.Random, size: int, sides: tuple[int, int]) -> Scene:
    obj = _single(rng, size, sides)
    yes = rng.random() < 0.5
    asked = obj.colour if yes else rng.choice([c for c in COLOURS if c != obj.colour])
    return [obj], _Q_IS_COLOUR.format(shape=obj.shape, colour=asked), "yes" if yes else "no"


_SKILL_FNS: dict[str, Callable[[random.Random, int, tuple[int, int]], Scene]] = {
    "count": _skill_count,
    "colour": _skill_colour,
    "shape": _skill_shape,
    "spatial": _skill_spatial,
    "classify": _skill_classify,
    "count_ood_text": _skill_count_ood_text,
    "colour_ood_text": _skill_colour_ood_text,
}


def _background(size: int, style: str, noise: np.random.Generator) -> Image.Image:
    if style != "noisy":
        return Image.new("RGB", (size, size), _BACKGROUNDS[style])
    # Grey speckle (r == g == b) can never equal a saturated shape colour.
    arr = np.full((size, size, 3), 255, dtype=np.uint8)
    speckle = noise.random((size, size)) < 0.35
    grey = noise.integers(185, 240, size=(size, size), dtype=np.uint8)
    arr[speckle] = grey[speckle][:, None]
    return Image.fromarray(arr)


def _draw(draw: ImageDraw.ImageDraw, obj: _Obj) -> None:
    x0, y0, x1, y1 = obj.bbox
    fill = COLOURS[obj.colour]
    # ImageDraw on RGB images does not anti-alias, so every shape pixel is exactly `fill`.
    if obj.shape == "square":
        draw.rectangle(obj.bbox, fill=fill)
    elif obj.shape == "circle":
        draw.ellipse(obj.bbox, fill=fill)
    else:
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) // 2, y0)], fill=fill)


def _render(objs: list[_Obj], size: int, style: str, noise: np.random.Generator) -> Image.Image:
    image = _background(size, style, noise)
    draw = ImageDraw.Draw(image)
    for obj in objs:
        _draw(draw, obj)
    return image


def _check_args(skill: str, style: str, n: int, image_size: int) -> None:
    for kind, value, valid in (("skill", skill, SKILLS), ("style", style, STYLES)):
        if value not in valid:
            raise ValueError(f"unknown {kind} {value!r}; valid {kind}s: {', '.join(valid)}")
    if image_size < _MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be >= {_MIN_IMAGE_SIZE}, got {image_size}")


def _all_texts() -> Iterator[str]:
    """Yield every question and answer any skill can produce (a few hundred strings)."""
    colours, shapes = list(COLOURS), list(SHAPES)
    yield from (_Q_SHAPE, "yes", "no", *colours, *shapes, *(str(i) for i in range(1, _MAX_COUNT + 1)))
    for shape in shapes:
        yield from (_Q_COUNT.format(shape=shape), _Q_COLOUR.format(shape=shape))
        yield from (_Q_IS_COLOUR.format(shape=shape, colour=colour) for colour in colours)
    yield from (_Q_MORE_THAN.format(k=k) for k in range(1, _MAX_COUNT))
    yield from (_Q_CLASSIFY.format(labels=", ".join(p)) for p in itertools.permutations(shapes))
    for c1, s1, c2, s2 in itertools.product(colours, shapes, colours, shapes):
        yield _Q_SPATIAL.format(c1=c1, s1=s1, c2=c2, s2=s2)


def vocabulary() -> list[str]:
    """Every word any question or answer of any skill and style can contain.

    Words are lower-cased tokens of the regex ``\\w+|[^\\w\\s]``, so punctuation marks are
    words too. Used to build a word-level tokenizer.

    Returns:
        Sorted list of unique words.
    """
    words = {tok.lower() for text in _all_texts() for tok in _TOKEN_RE.findall(text)}
    return sorted(words)


def object_sides(image_size: int, object_size: tuple[float, float]) -> tuple[int, int]:
    """Object side range in pixels for fractions `object_size` = (min, max) of the canvas side."""
    lo, hi = object_size
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"object_size must be two fractions 0 < min <= max <= 1, got {object_size}")
    lo_px = max(3, int(image_size * lo))
    return lo_px, max(lo_px, int(image_size * hi))


def make_samples(
    skill: str,
    n: int,
    seed: int,
    image_size: int = 64,
    style: str = "plain",
    object_size: tuple[float, float] = (0.125, 0.25),
) -> list[dict]:
    """Draw ``n`` visual-question-answer samples for one skill and image style.

    Scenes and text do not depend on ``style``, so one seed gives the same scenes in every
    image domain; a smaller ``n`` gives a prefix of a larger one.

    Args:
        skill: One of ``SKILLS``.
        n: Number of samples.
        seed: Seed of the ``random.Random`` that drives everything.
        image_size: Side of the square RGB canvas in pixels (>= 16).
        style: One of ``STYLES`` (image domain: background).
        object_size: (min, max) object side as fractions of the canvas side. Larger objects are
            easier for tiny vision towers; count scenes need max <= 0.25, spatial max <= 0.45.

    Returns:
        List of dicts with keys id, image (PIL RGB), question, answer, skill and meta (JSON
        list of the drawn objects with shape, colour and inclusive bbox).

    Raises:
        ValueError: On an unknown skill or style or an ``image_size`` below 16.
    """
    _check_args(skill, style, n, image_size)
    sides = object_sides(image_size, object_size)
    if (
        skill in ("count", "count_ood_text")
        and object_size[1] > 0.25
        or skill == "spatial"
        and object_size[1] > 0.45
    ):
        raise ValueError(
            f"object_size max {object_size[1]} too large for {skill} scenes; use <= 0.25 (count) or 0.45 (spatial)"
        )
    rng = random.Random(seed)
    # Always drawn, even when unused, so scenes stay identical across styles.
    noise = np.random.default_rng(rng.getrandbits(64))
    make_scene = _SKILL_FNS[skill]
    samples = []
    for i in range(n):
        objs, question, answer = make_scene(rng, image_size, sides)
        uid = f"{skill}-{style}-{image_size}-{seed}-{i:06d}"
        image = _render(objs, image_size, style, noise)
        meta = json.dumps([asdict(o) for o in objs])
        samples.append(dict(zip(_COLUMNS, (uid, image, question, answer, skill, meta), strict=True)))
    return samples


def _cache_folder(
    root: Path, skill: str, n: int, seed: int, image_size: int, style: str, object_size=(0.125, 0.25)
) -> Path:
    key = dict(skill=skill, n=n, seed=seed, image_size=image_size, style=style, version=GENERATOR_VERSION)
    if tuple(object_size) != (0.125, 0.25):  # keeps the default's cache key (and folder) unchanged
        key["object_size"] = list(object_size)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return root / f"synthetic-{skill}-{style}-{digest}"


def synthetic_dataset(
    skill: str,
    n: int,
    seed: int,
    image_size: int = 64,
    style: str = "plain",
    cache_dir: str | None = None,
    object_size: tuple[float, float] = (0.125, 0.25),
) -> datasets.Dataset:
    """The samples of :func:`make_samples` as a Hugging Face dataset, cached on disk.

    The first call draws the samples and writes them atomically with ``save_to_disk``; later
    calls only ``load_from_disk``. The result is always loaded from the cache (memory-mapped).

    Args:
        skill: One of ``SKILLS``.
        n: Number of samples.
        seed: Seed of the generator.
        image_size: Side of the square canvas in pixels.
        style: One of ``STYLES``.
        cache_dir: Cache root; defaults to ``$MLLM_CL_CACHE`` or ``~/.cache/mllm_cl``.
        object_size: (min, max) object side as fractions of the canvas (see :func:`make_samples`).

    Returns:
        Dataset with columns id, image (``datasets.Image``), question, answer, skill, meta.

    Raises:
        ValueError: On an unknown skill or style (see :func:`make_samples`).
    """
    import datasets  # deferred: heavy import, not needed by make_samples users

    _check_args(skill, style, n, image_size)
    root = Path(cache_dir) if cache_dir else cache_root()
    root.mkdir(parents=True, exist_ok=True)
    final = _cache_folder(root, skill, n, seed, image_size, style, object_size)
    if not final.is_dir():
        samples = make_samples(skill, n, seed, image_size, style, object_size)
        string = datasets.Value("string")
        features = datasets.Features({c: datasets.Image() if c == "image" else string for c in _COLUMNS})
        columns = {name: [s[name] for s in samples] for name in features}
        save_atomically(datasets.Dataset.from_dict(columns, features=features), final)
    return datasets.load_from_disk(str(final))
