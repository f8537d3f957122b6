"""What the user asks to learn: triggers bound to class phrases, and the rules they follow."""
from __future__ import annotations

import functools
import re
import unicodedata
from dataclasses import dataclass

from .safe_files import is_reserved_device_name

# Words every training prompt may contain besides the captions (DisenDiff's caption and the
# augmentation prefixes); a trigger equal to one of them would replace it in every prompt.
PROMPT_WORDS = frozenset("a an the of and photo far away very small zoomed in close up with on at "
                         "to by for from is it this that".split())

@dataclass(frozen=True)
class ConceptSpec:
    """What the user asks to learn: a trigger name bound to a class phrase."""

    trigger: str
    class_phrase: str


_TRIGGER = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
MAX_CLASS_PHRASE_CHARS = 200
# Characters no class phrase needs and that hide what it says: controls, format characters (bidi
# overrides, zero-width joiners), surrogates, private use, unassigned code points.
_HIDDEN_CATEGORIES = {"Cc", "Cf", "Cs", "Co", "Cn"}


def parse_concept_specs(text: str) -> list[ConceptSpec]:
    """Parse "V1: cat" lines (or ';'-separated) into specs, with clear errors for bad input."""
    specs = []
    for entry in (e.strip() for e in text.replace(";", "\n").splitlines()):
        if not entry:
            continue
        trigger, sep, phrase = entry.partition(":")
        if not sep:
            raise ValueError(f"cannot read {entry!r}: write one concept per line as 'TRIGGER: class', "
                             "e.g. 'V1: cat'")
        trigger, phrase = trigger.strip(), " ".join(phrase.split())
        check_trigger_form(trigger)
        if not phrase:
            raise ValueError(f"trigger {trigger!r} has no class word: e.g. '{trigger}: cat'")
        specs.append(ConceptSpec(trigger, phrase))
    if not specs:
        raise ValueError("no concepts given: write one per line as 'TRIGGER: class', e.g. 'V1: cat'")
    check_specs(specs)
    return specs


def check_trigger_form(trigger: str) -> None:
    """A trigger is one word of ASCII letters, digits or _, starting with a letter."""
    if not isinstance(trigger, str) or not _TRIGGER.match(trigger):
        raise ValueError(f"trigger {trigger!r} must be one word of letters, digits or _, "
                         "starting with a letter (e.g. V1, sks_cat)")


def check_class_phrase(spec: ConceptSpec) -> None:
    """A class phrase is plain visible text: one or a few words."""
    phrase = spec.class_phrase
    if not isinstance(phrase, str) or not phrase.strip():
        raise ValueError(f"trigger {spec.trigger!r} has no class word: e.g. '{spec.trigger}: cat'")
    hidden = [c for c in phrase if unicodedata.category(c) in _HIDDEN_CATEGORIES]
    if hidden:
        raise ValueError(f"the class phrase of {spec.trigger!r} contains an invisible or control "
                         f"character (U+{ord(hidden[0]):04X}): write it as plain words, e.g. 'cat'")
    if len(phrase) > MAX_CLASS_PHRASE_CHARS:
        raise ValueError(f"the class phrase of {spec.trigger!r} is {len(phrase)} characters long; "
                         f"a class is a word or a few (at most {MAX_CLASS_PHRASE_CHARS} characters)")


@functools.lru_cache(maxsize=1)
def common_words() -> frozenset[str]:
    """Lower-case words a trigger must not be: prompt words and the shipped generic captions'."""
    from .merge import GENERIC_CAPTIONS

    words = set(PROMPT_WORDS)
    if GENERIC_CAPTIONS.is_file():
        words.update(re.findall(r"[a-z0-9_]+", GENERIC_CAPTIONS.read_text(encoding="utf-8").lower()))
    return frozenset(words)


def check_specs(specs: list[ConceptSpec]) -> None:
    """The rule every set of triggers follows, typed in Train Concepts or read from a concept file:
    one made-up word each, none twice, none a class word or a common word, each a valid file name."""
    for spec in specs:
        check_trigger_form(spec.trigger)
        check_class_phrase(spec)
    names = [s.trigger.lower() for s in specs]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise ValueError(f"trigger {duplicate!r} is used twice: give each concept its own trigger")
    class_words = {w.lower(): s.trigger for s in specs for w in s.class_phrase.split()}
    for spec in specs:
        name = spec.trigger.lower()
        if name in (w.lower() for w in spec.class_phrase.split()):
            raise ValueError(f"trigger {spec.trigger!r} must differ from its class word")
        if name in class_words:
            raise ValueError(f"trigger {spec.trigger!r} is also a class word (of concept "
                             f"{class_words[name]!r}): a trigger replaces every occurrence of its "
                             "word in a prompt, so pick a made-up word such as V1 or sks")
        if name in common_words():
            raise ValueError(f"trigger {spec.trigger!r} is a common word: it would replace that "
                             "word in every prompt; pick a made-up word such as V1 or sks")
        if is_reserved_device_name(spec.trigger):
            raise ValueError(f"trigger {spec.trigger!r} is a device name on Windows, so Export could "
                             "not write its embedding file: pick a made-up word such as V1")
