"""Unit tests for smallworld/scenes.py: determinism, masks, captions, hidden combos."""
from __future__ import annotations

import itertools
import re

import numpy as np
import pytest

from concept_attention.smallworld import scenes as sw


def _scenes(n: int, seed: int = 11, size: int = 128) -> list:
    return [sw.random_scene(np.random.default_rng([seed, i]), size=size) for i in range(n)]


def test_vocabularies_are_far_apart() -> None:
    colours = {**sw.COLOURS, "ink": sw.INK}
    for (a, ca), (b, cb) in itertools.combinations(colours.items(), 2):
        assert np.linalg.norm(np.subtract(ca, cb)) > 80, (a, b)
    for (a, ca), (b, cb) in itertools.product(colours.items(), sw.BACKGROUNDS.items()):
        assert np.linalg.norm(np.subtract(ca, cb)) > 80, (a, b)
    for colour, pattern in sw.HIDDEN_COMBOS:
        assert colour in sw.COLOURS and pattern in sw.PATTERNS and pattern != "solid"


def test_same_seed_same_bytes_different_seed_differs() -> None:
    a, b = sw.random_scene(1234), sw.random_scene(1234)
    assert a.image.tobytes() == b.image.tobytes()
    assert np.array_equal(a.masks, b.masks) and a.caption == b.caption and a.objects == b.objects
    c = sw.random_scene(1235)
    assert a.image.tobytes() != c.image.tobytes()
    first = [s.image.tobytes() + s.caption.encode() for s in sw.dataset(20, seed=3)]
    again = [s.image.tobytes() + s.caption.encode() for s in sw.dataset(20, seed=3)]
    other = [s.image.tobytes() for s in sw.dataset(20, seed=4)]
    assert first == again
    assert sum(x.startswith(y) for x, y in zip(first, other)) < 3
    refs = [s.image.tobytes() for s in sw.reference_scenes(6, seed=1)]
    assert refs == [s.image.tobytes() for s in sw.reference_scenes(6, seed=1)]


@pytest.mark.parametrize("size", [128, 96, 64])
def test_masks_match_drawn_pixels(size: int) -> None:
    for scene in _scenes(60, size=size):
        bg = np.array(sw.BACKGROUNDS[scene.background])
        drawn = np.any(scene.image != bg, axis=-1)
        union = scene.masks.any(0)
        assert np.array_equal(drawn, union)  # no object pixel outside masks, none inside is bg
        assert scene.masks.sum(0).max() <= 1  # masks are disjoint
        assert scene.image.dtype == np.uint8 and scene.image.shape == (size, size, 3)
        for obj, mask in zip(scene.objects, scene.masks):
            assert mask.sum() > 0
            # random scenes never overlap: the visible mask is the whole shape
            assert np.array_equal(mask, sw.shape_mask(obj.shape, obj.cx, obj.cy, obj.size, size))
            pixels = scene.image[mask]
            is_colour = np.all(pixels == sw.COLOURS[obj.colour], axis=-1)
            is_ink = np.all(pixels == sw.INK, axis=-1)
            assert np.all(is_colour | is_ink)
            ink = is_ink.mean()
            if obj.pattern == "solid":
                assert ink == 0
            else:
                nominal = sw.INK_FRACTION[obj.pattern]
                assert 0.6 * nominal <= ink <= 1.4 * nominal
                expected = sw.pattern_mask(obj.pattern, size, scene.cell)[mask]
                assert np.array_equal(is_ink, expected)


def test_later_objects_occlude_earlier_ones() -> None:
    objects = [sw.ObjectSpec("square", "red", "solid", 50, 50, 50),
               sw.ObjectSpec("circle", "blue", "stripes", 70, 60, 40)]
    scene = sw.draw_scene(objects, "beige", 128)
    square = sw.shape_mask("square", 50, 50, 50, 128)
    circle = sw.shape_mask("circle", 70, 60, 40, 128)
    assert np.array_equal(scene.masks[1], circle)
    assert np.array_equal(scene.masks[0], square & ~circle)
    top = scene.image[circle]
    assert np.all(np.all(top == sw.COLOURS["blue"], -1) | np.all(top == sw.INK, -1))
    assert np.all(scene.image[scene.masks[0]] == sw.COLOURS["red"])
    assert np.array_equal(np.any(scene.image != sw.BACKGROUNDS["beige"], -1), square | circle)


def test_captions_and_positions() -> None:
    objs = [sw.ObjectSpec("circle", "red", "stripes", 20, 64, 30),
            sw.ObjectSpec("square", "blue", "solid", 100, 20, 30)]
    assert sw.caption_for(objs, "grey") == (
        "a red striped circle and a blue square on a grey background")
    assert sw.caption_for(objs, None, position=True) == (
        "a red striped circle on the left and a blue square at the top right")
    assert sw.caption_for(objs[:1], "light blue", colour=False) == (
        "a striped circle on a light blue background")
    orange = sw.ObjectSpec("star", "orange", "checks", 64, 64, 40)
    three = sw.caption_for(objs + [orange], "beige")
    assert three == ("a red striped circle, a blue square and an orange checkered star"
                     " on a beige background")
    assert sw.position_word(64, 64, 128) == "center"
    assert sw.position_word(10, 120, 128) == "bottom left"
    assert sw.position_word(64, 5, 128) == "top"


def test_hidden_combos_never_named() -> None:
    hidden_seen = 0
    forbidden = [re.compile(rf"\b{c} {sw.PATTERN_WORDS[p]}\b") for c, p in sw.HIDDEN_COMBOS]
    scenes = list(sw.dataset(300, seed=5)) + _scenes(200, seed=6)
    for scene in scenes:
        assert not any(f.search(scene.caption) for f in forbidden), scene.caption
        for obj in scene.objects:
            if obj.hidden:
                hidden_seen += 1
                for kw in ({}, {"position": True}):
                    phrase = sw.object_phrase(obj, scene.size, **kw)
                    assert obj.colour not in phrase.split()
                    assert sw.PATTERN_WORDS[obj.pattern] not in phrase.split()
                    assert phrase.startswith(f"a {obj.shape}")
    assert hidden_seen >= 50
    plain = sw.ObjectSpec("circle", "purple", "stripes", 64, 64, 40)
    assert sw.caption_for([plain], None) == "a circle"


def test_hidden_hints_name_one_attribute_never_the_pair() -> None:
    """A hint names a hidden combo's colour or its pattern, never both; other objects are named as before."""
    purple = sw.ObjectSpec("square", "purple", "stripes", 64, 64, 40)
    red = sw.ObjectSpec("circle", "red", "dots", 30, 30, 20)
    assert sw.object_phrase(purple, 128, hint="colour") == "a purple square"
    assert sw.object_phrase(purple, 128, hint="pattern") == "a striped square"
    assert sw.object_phrase(purple, 128, colour=False, hint="colour") == "a square"  # a dropped word stays dropped
    assert sw.object_phrase(red, 128, hint="pattern") == "a red dotted circle"
    orange = sw.ObjectSpec("circle", "orange", "dots", 30, 30, 20)
    assert sw.object_phrase(orange, 128, hint="colour") == "an orange circle"
    assert sw.object_phrase(orange, 128, hint="pattern") == "a dotted circle"
    with pytest.raises(ValueError, match="2 hints for 1 objects"):
        sw.caption_for([purple], None, hints=("colour", ""))
    assert sw.caption_for([purple, red], "grey", hints=("pattern",)) == (
        "a striped square and a red dotted circle on a grey background")
    with pytest.raises(ValueError, match="hint must be one of"):
        sw.object_phrase(purple, 128, hint="both")
    with pytest.raises(ValueError, match="rate must lie in"):
        sw.hidden_hints([purple], np.random.default_rng(0), 1.5)

    rng = np.random.default_rng(3)
    forbidden = [re.compile(rf"\b{c} {sw.PATTERN_WORDS[p]}\b") for c, p in sw.HIDDEN_COMBOS]
    counts = {"": 0, "colour": 0, "pattern": 0}
    for i in range(300):
        scene = sw.pretraining_scene(np.random.default_rng([0, 2, i]))
        hints = sw.hidden_hints(scene.objects, rng, 0.5)
        assert sw.hidden_hints(scene.objects, rng, 0.0) == ("",) * len(scene.objects)
        caption = sw.random_caption(scene.objects, scene.background, 128, np.random.default_rng(i), hints=hints)
        assert not any(f.search(caption) for f in forbidden), caption
        for obj, hint in zip(scene.objects, hints):
            assert obj.hidden or hint == ""
            if obj.hidden:
                counts[hint] += 1
    hidden = sum(counts.values())
    assert hidden > 100 and 0.4 < counts[""] / hidden < 0.6, counts
    assert abs(counts["colour"] - counts["pattern"]) < 0.25 * hidden, counts


def test_reference_scenes_structure() -> None:
    refs = sw.reference_scenes(12, seed=2)
    assert [len(s.objects) for s in refs] == [2, 2, 2, 3] * 3
    for scene in refs:
        objs = scene.objects
        assert objs[0].hidden
        for key in ("shape", "colour", "pattern"):
            values = [getattr(o, key) for o in objs]
            assert len(set(values)) == len(values), (key, values)
        assert scene.background == sw.DEFAULT_BACKGROUND
        assert scene.masks.shape == (len(objs), 128, 128) and scene.masks.sum((1, 2)).min() > 300
        assert scene.caption == sw.caption_for(objs, scene.background)
        assert objs[0].colour not in scene.caption.split()


def test_random_scene_options() -> None:
    for n in (1, 2, 3):
        scene = sw.random_scene(np.random.default_rng(n), n_objects=n, background="beige")
        assert len(scene.objects) == n and scene.background == "beige"
    counts = {len(s.objects) for s in _scenes(40)}
    assert counts == {1, 2, 3}
    captions = [s.caption for s in sw.dataset(60, seed=9)]
    assert any("background" not in c for c in captions)  # words get dropped for pretraining
    with pytest.raises(ValueError):
        sw.shape_mask("hexagon", 10, 10, 5, 32)
