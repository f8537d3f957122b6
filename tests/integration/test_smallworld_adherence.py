"""Pattern adherence: named colour and pattern drawn by the base model (a diagnostic beside the gates)."""
from __future__ import annotations

from types import SimpleNamespace

from smallworld_lab import quality
from concept_attention.smallworld import scenes as sw


def test_adherence_prompts_name_a_visible_pattern_and_are_seeded():
    prompts = quality.adherence_prompts(40)
    assert prompts == quality.adherence_prompts(40) and len(prompts) == 40
    for prompt, shape, colour, pattern in prompts:
        assert pattern != "solid" and (colour, pattern) not in sw.HIDDEN_COMBOS
        assert prompt == f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {sw.PATTERN_WORDS[pattern]} {shape} on a grey background"
    assert len({p[3] for p in prompts}) == 3  # stripes, dots and checks all asked


def test_adherence_counts_one_object_with_the_named_colour_and_pattern():
    def read(colour: str, pattern: str) -> SimpleNamespace:
        return SimpleNamespace(colour=colour, pattern=pattern, attributes=lambda: {"colour": colour})

    report = quality.AdherenceReport()
    report.add("right", [read("red", "stripes")], "red", "stripes")
    report.add("pattern wrong", [read("red", "dots")], "red", "stripes")
    report.add("two objects", [read("red", "stripes"), read("red", "stripes")], "red", "stripes")
    report.add("nothing", [], "red", "stripes")
    assert (report.samples, report.colour, report.colour_pattern) == (4, 2, 1)
    assert "| 4 | 50% | 25% |" in report.table()

