"""Pattern adherence: named colour and pattern drawn by the base model (a diagnostic beside the gates)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from smallworld_lab import quality
from concept_attention.smallworld import scenes as sw


def read(colour: str, pattern: str) -> SimpleNamespace:
    """A read-out object of that colour and pattern."""
    return SimpleNamespace(colour=colour, pattern=pattern, attributes=lambda: {"colour": colour})


def test_adherence_prompts_name_a_visible_pattern_and_are_seeded():
    prompts = quality.adherence_prompts(40)
    assert prompts == quality.adherence_prompts(40) and len(prompts) == 40
    for prompt, shape, colour, pattern in prompts:
        assert pattern != "solid" and (colour, pattern) not in sw.HIDDEN_COMBOS
        assert prompt == f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {sw.PATTERN_WORDS[pattern]} {shape} on a grey background"
    assert len({p[3] for p in prompts}) == 3  # stripes, dots and checks all asked


def test_adherence_counts_one_object_with_the_named_colour_and_pattern():
    report = quality.AdherenceReport()
    report.add("right", [read("red", "stripes")], {"red"}, {"stripes"})
    report.add("pattern wrong", [read("red", "dots")], {"red"}, {"stripes"})
    report.add("colour wrong", [read("blue", "stripes")], {"red"}, {"stripes"})
    report.add("two objects", [read("red", "stripes"), read("red", "stripes")], {"red"}, {"stripes"})
    report.add("nothing", [], {"red"}, {"stripes"})
    assert (report.samples, report.colour, report.pattern, report.colour_pattern) == (5, 2, 2, 1)
    assert "| 5 | 40% | 20% |" in report.table()
    with pytest.raises(TypeError, match="collections of names"):
        report.add("one name", [read("red", "stripes")], "red", {"stripes"})


def test_hidden_word_prompts_name_each_hidden_combo_three_ways():
    prompts = quality.hidden_word_prompts()
    texts = [prompt for _, _, prompt, _, _ in prompts]
    assert len(texts) == len(set(texts)) == len(sw.SHAPES) * (4 + 3 + 4)  # 4 pairs, 3 patterns, 4 colours
    assert ("both words", "circle", "a purple striped circle on a grey background",
            frozenset({"purple"}), frozenset({"stripes"})) in prompts
    assert ("pattern word", "star", "a striped star on a grey background",
            frozenset({"purple", "yellow"}), frozenset({"stripes"})) in prompts
    assert ("colour word", "circle", "an orange circle on a grey background",
            frozenset({"orange"}), frozenset({"dots"})) in prompts
    assert ("pattern word", "square", "a dotted square on a grey background",
            frozenset({"orange"}), frozenset({"dots"})) in prompts
    for kind, shape, prompt, colours, patterns in prompts:
        words = prompt.split()
        assert words[-5] == shape and all((c, p) in sw.HIDDEN_COMBOS for c in colours for p in patterns)
        assert any(c in words for c in colours) == (kind != "pattern word"), prompt
        assert any(sw.PATTERN_WORDS[p] in words for p in patterns) == (kind != "colour word"), prompt


def test_hidden_words_count_the_combos_colour_and_pattern_per_kind():
    report = quality.HiddenWordReport()
    striped, purple = report.kinds["pattern word"], report.kinds["colour word"]
    striped.add("a striped star", [read("cyan", "stripes")], {"purple", "yellow"}, {"stripes"})
    striped.add("a striped star", [read("yellow", "stripes")], {"purple", "yellow"}, {"stripes"})
    purple.add("a purple star", [read("purple", "solid")], {"purple"}, {"stripes"})
    purple.add("a purple star", [read("purple", "stripes"), read("red", "dots")], {"purple"}, {"stripes"})
    assert "| pattern word | 2 | 50% | 100% | 50% |" in report.table()
    assert "| colour word | 2 | 50% | 0% | 0% |" in report.table()
    assert "| both words | 0 | 0% | 0% | 0% |" in report.table()
