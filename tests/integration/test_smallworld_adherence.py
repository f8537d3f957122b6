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



def test_hidden_word_prompts_name_each_hidden_combo_three_ways():
    prompts = quality.hidden_word_prompts()
    assert len(prompts) == len(sw.HIDDEN_COMBOS) * len(sw.SHAPES) * len(quality.HIDDEN_WORD_KINDS)
    for kind, prompt, colour, pattern in prompts:
        assert (colour, pattern) in sw.HIDDEN_COMBOS and prompt.endswith(" on a grey background")
        words = prompt.split()
        assert (colour in words) == (kind != "pattern word"), prompt
        assert (sw.PATTERN_WORDS[pattern] in words) == (kind != "colour word"), prompt
        assert words[0] == ("an" if words[1][0] in "aeiou" else "a"), prompt
    assert {k for k, *_ in prompts} == set(quality.HIDDEN_WORD_KINDS)


def test_hidden_words_count_the_combos_colour_and_pattern_per_kind():
    def read(colour: str, pattern: str) -> SimpleNamespace:
        return SimpleNamespace(colour=colour, pattern=pattern, attributes=lambda: {"colour": colour})

    report = quality.HiddenWordReport()
    report.add("pattern word", "a striped star", [read("cyan", "stripes")], "purple", "stripes")
    report.add("pattern word", "a striped star", [read("purple", "stripes")], "purple", "stripes")
    report.add("colour word", "a purple star", [read("purple", "solid")], "purple", "stripes")
    report.add("colour word", "a purple star", [read("purple", "stripes"), read("red", "dots")], "purple", "stripes")
    assert report.counts["pattern word"] == [2, 1, 2, 1]
    assert report.counts["colour word"] == [2, 1, 0, 0]
    assert "| pattern word | 2 | 50% | 100% | 50% |" in report.table()
    assert "| both words | 0 | 0% | 0% | 0% |" in report.table()
