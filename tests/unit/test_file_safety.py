"""File safety (docs/reliability.md, "Files"): safe names, no silent replacement, all-or-nothing writes.

Every writer of the pack goes through ``concepts/safe_files.py``: names are checked there, targets
are checked there (an existing file is refused unless ``overwrite``, a folder always), and several
files are written all or nothing. Faults are injected at every point of a three-file write; each
time the folder afterwards holds exactly what it held before, byte for byte.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pytest
import safetensors.torch
import torch

from concept_attention.concepts import safe_files
from concept_attention.concepts.concept_file import (kv_digest, load_concepts, save_concepts,
                                                     save_partial_concepts)
from concept_attention.concepts.concept_set import Concept, ConceptSet
from concept_attention.concepts.export import export_concepts
from concept_attention.concepts.safe_files import (TargetExistsError, check_file_stem, next_free_path,
                                                 text_writer, write_files_atomically)

LAYER = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2"


def pair_set(seed: int = 0, complete: bool = True, triggers: tuple[str, ...] = ("V1", "V2")) -> ConceptSet:
    """A small valid set of two concepts; ``seed`` makes its contents differ."""
    shapes = {f"{LAYER}.to_k.weight": (8, 16), f"{LAYER}.to_v.weight": (8, 16)}
    g = torch.Generator().manual_seed(seed)
    concepts = [Concept(trigger, phrase, {"clip_l": torch.randn(1, 16, generator=g)})
                for trigger, phrase in zip(triggers, ("cat", "dog"))]
    return ConceptSet(concepts, {k: torch.randn(s, generator=g) for k, s in shapes.items()},
                      {"model": "SD15", "kv_layers": 1, "kv_digest": kv_digest(shapes),
                       "encoders": {"clip_l": 16}}, {"complete": complete, "seed": seed})


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# Names

REFUSED_NAMES = [
    ("CONIN$", "reserved device name"), ("conout$", "reserved device name"), ("CLOCK$", "reserved device name"),
    ("COM\u00b9", "reserved device name"), ("lpt\u00b3", "reserved device name"), ("com0", "reserved device name"),
    ("NUL.tar", "reserved device name"), ("aux.v2", "reserved device name"),
    ("V1\u202e", "direction-changing character (U+202E)"), ("\u2066cat", "U+2066"),
    ("V\u200b1", "invisible or direction-changing character (U+200B)"), ("V\u200d1", "U+200D"),
    ("\ufeffname", "U+FEFF"), ("soft\u00adhyphen", "U+00AD"), ("x\ud800", "U+D800"),
    ("private\ue000", "U+E000"), ("a\u3000b", "a space"), ("line\u2028break", "a space"),
]


@pytest.mark.parametrize("name,problem", REFUSED_NAMES, ids=[repr(n) for n, _ in REFUSED_NAMES])
def test_unsafe_names_are_refused(name: str, problem: str) -> None:
    with pytest.raises(ValueError) as caught:
        check_file_stem(name, "the save_name (a concept file name)", safe_files.NAME_ADVICE)
    text = str(caught.value)
    assert "cannot be used as the save_name" in text and problem in text, text
    assert "letters, digits" in text  # says what to do


@pytest.mark.parametrize("name", ["V1", "my_cat-2.v3", "\u00dcn\u00efcode_name", "\u732b", "CONSOLE", "COM10",
                                  "LPT", "con_cat", "nul_points"])
def test_ordinary_names_are_accepted(name: str) -> None:
    assert check_file_stem(name) == name


# ---------------------------------------------------------------------------------------------
# Targets: nothing that exists is replaced without 'overwrite'


def test_an_existing_file_is_refused_without_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "mine.safetensors"
    target.write_bytes(b"the user's file")
    with pytest.raises(TargetExistsError) as caught:
        write_files_atomically([(target, text_writer("new"))], overwrite=False, input_name="save_name")
    text = str(caught.value)
    assert str(target) in text and "already exists" in text and "another save_name" in text
    assert "switch 'overwrite' on" in text
    assert snapshot(tmp_path) == {"mine.safetensors": b"the user's file"}
    write_files_atomically([(target, text_writer("new"))], overwrite=True)
    assert target.read_text() == "new" and snapshot(tmp_path).keys() == {"mine.safetensors"}


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_in_the_way_is_named_not_a_temp_path(tmp_path: Path, overwrite: bool) -> None:
    (tmp_path / "taken.safetensors").mkdir()
    (tmp_path / "taken.safetensors" / "inside.txt").write_text("kept")
    with pytest.raises(ValueError) as caught:
        save_concepts(tmp_path / "taken.safetensors", pair_set(), overwrite=overwrite)
    assert not isinstance(caught.value, IsADirectoryError)
    assert "taken.safetensors is a folder, not a file" in str(caught.value)
    assert snapshot(tmp_path) == {"taken.safetensors/inside.txt": b"kept"}


def test_two_names_of_one_write_that_differ_only_in_case_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="would both be 'v1.safetensors'"):
        write_files_atomically([(tmp_path / "V1.safetensors", text_writer("a")),
                                (tmp_path / "v1.safetensors", text_writer("b"))])
    assert snapshot(tmp_path) == {}


@pytest.mark.skipif(os.name == "nt", reason="symlinks need privileges on Windows")
def test_a_dangling_link_counts_as_taken(tmp_path: Path) -> None:
    link = tmp_path / "link.safetensors"
    link.symlink_to(tmp_path / "nowhere")
    with pytest.raises(TargetExistsError):
        write_files_atomically([(link, text_writer("x"))], overwrite=False)
    assert link.is_symlink() and not (tmp_path / "nowhere").exists()


def test_next_free_path_counts_like_comfyui(tmp_path: Path) -> None:
    assert next_free_path(tmp_path / "a.safetensors") == tmp_path / "a.safetensors"
    (tmp_path / "a.safetensors").write_bytes(b"")
    assert next_free_path(tmp_path / "a.safetensors") == tmp_path / "a_2.safetensors"
    assert next_free_path(tmp_path / "a.safetensors", "_partial") == tmp_path / "a_partial.safetensors"
    (tmp_path / "a_partial.safetensors").write_bytes(b"")
    assert next_free_path(tmp_path / "a.safetensors", "_partial") == tmp_path / "a_partial_2.safetensors"


# ---------------------------------------------------------------------------------------------
# All or nothing: a fault at any point of a three-file write changes nothing


class Fault(Exception):
    """The injected failure."""


def _failing_on_call(original: Callable, call: int, error: BaseException,
                     count: list[int] | None = None) -> Callable:
    """``original``, except that its ``call``-th call (0-based) raises ``error`` instead; functions
    given the same ``count`` share the count of calls."""
    count = [0] if count is None else count

    def wrapper(*args, **kwargs):
        count[0] += 1
        if count[0] == call + 1:
            raise error
        return original(*args, **kwargs)
    return wrapper


def _three_files(folder: Path) -> list[tuple[Path, safe_files.Writer]]:
    return [(folder / "lora.safetensors", text_writer("new lora")),
            (folder / "emb" / "V1.safetensors", text_writer("new V1")),
            (folder / "emb" / "V2.safetensors", text_writer("new V2"))]


# New files: three moves (links). Replacing: keep the old lora, replace it, link V1, keep the old
# V2, replace it: five moves.
FAULT_POINTS = [(overwrite, where, call) for overwrite in (False, True) for where in ("write", "fsync")
                for call in range(3)]
FAULT_POINTS += [(overwrite, "move", call) for overwrite in (False, True) for call in range(5 if overwrite else 3)]


@pytest.mark.parametrize("error", [Fault("injected"), KeyboardInterrupt()], ids=["error", "interrupt"])
@pytest.mark.parametrize("overwrite,where,call", FAULT_POINTS,
                         ids=[f"{'replacing' if o else 'new files'}, {w} {c + 1}" for o, w, c in FAULT_POINTS])
def test_a_fault_anywhere_in_a_multi_file_write_changes_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str, call: int, overwrite: bool,
        error: BaseException) -> None:
    (tmp_path / "emb").mkdir()
    (tmp_path / "emb" / "unrelated.safetensors").write_bytes(b"someone else's embedding")
    if overwrite:  # two of the three targets exist and are to be replaced
        (tmp_path / "lora.safetensors").write_bytes(b"old lora")
        (tmp_path / "emb" / "V2.safetensors").write_bytes(b"old V2")
    before = snapshot(tmp_path)
    files = _three_files(tmp_path)
    if where == "write":
        files[call] = (files[call][0], _failing_on_call(files[call][1], 0, error))
    elif where == "fsync":
        monkeypatch.setattr(safe_files, "_fsync_file", _failing_on_call(safe_files._fsync_file, call, error))
    else:  # the k-th move into place (os.link for new files and kept copies, os.replace over old ones)
        moves = [0]
        monkeypatch.setattr(safe_files.os, "link", _failing_on_call(os.link, call, error, moves))
        monkeypatch.setattr(safe_files.os, "replace", _failing_on_call(os.replace, call, error, moves))
    with pytest.raises(type(error)):
        write_files_atomically(files, overwrite=overwrite)
    monkeypatch.undo()
    assert snapshot(tmp_path) == before
    write_files_atomically(_three_files(tmp_path), overwrite=overwrite)  # and the next write works
    assert (tmp_path / "emb" / "V2.safetensors").read_text() == "new V2"


def test_a_file_that_appears_during_the_write_is_never_replaced(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    files = _three_files(tmp_path)
    original_fsync = safe_files._fsync_file

    def another_process_saves(path: Path) -> None:
        original_fsync(path)
        if path.name.startswith(".V2.safetensors."):
            (tmp_path / "emb" / "V2.safetensors").write_bytes(b"saved meanwhile")

    monkeypatch.setattr(safe_files, "_fsync_file", another_process_saves)
    with pytest.raises(TargetExistsError, match="appeared while it was being written"):
        write_files_atomically(files, overwrite=False)
    assert snapshot(tmp_path) == {"emb/V2.safetensors": b"saved meanwhile"}


# ---------------------------------------------------------------------------------------------
# Export (LoRA + embeddings) and partial concept files


def test_export_refuses_an_unrelated_embedding_of_a_trigger_name_and_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "embeddings").mkdir()
    (tmp_path / "embeddings" / "V2.safetensors").write_bytes(b"an embedding from elsewhere")
    before = snapshot(tmp_path)
    with pytest.raises(TargetExistsError) as caught:
        export_concepts(tmp_path / "loras" / "pets.safetensors", tmp_path / "embeddings", pair_set())
    assert "V2.safetensors already exists" in str(caught.value)
    assert snapshot(tmp_path) == before and not (tmp_path / "loras").exists()


@pytest.mark.parametrize("failing_file", [1, 2], ids=["first embedding", "second embedding"])
def test_export_failing_midway_leaves_nothing_new_and_nothing_changed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing_file: int) -> None:
    (tmp_path / "loras").mkdir()
    (tmp_path / "loras" / "pets.safetensors").write_bytes(b"the previous export")
    before = snapshot(tmp_path)
    monkeypatch.setattr(safetensors.torch, "save",
                        _failing_on_call(safetensors.torch.save, failing_file, Fault("disk full")))
    with pytest.raises(Fault):
        export_concepts(tmp_path / "loras" / "pets.safetensors", tmp_path / "embeddings", pair_set(),
                        overwrite=True)
    assert snapshot(tmp_path) == before
    monkeypatch.undo()
    lora, embeddings, _ = export_concepts(tmp_path / "loras" / "pets.safetensors", tmp_path / "embeddings",
                                          pair_set(), overwrite=True)
    assert [p.name for p in embeddings] == ["V1.safetensors", "V2.safetensors"]
    assert lora.read_bytes() != b"the previous export"


def test_a_partial_save_without_overwrite_replaces_nothing(tmp_path: Path) -> None:
    path = tmp_path / "run.safetensors"
    save_concepts(path, pair_set(1, complete=False))  # an earlier cancelled run, also a user's file
    (tmp_path / "run_partial.safetensors").write_bytes(b"damaged, but not ours to delete")
    before = snapshot(tmp_path)
    written = save_partial_concepts(path, pair_set(2, complete=False), overwrite=False)
    assert written == tmp_path / "run_partial_2.safetensors"
    assert load_concepts(written).metadata["seed"] == 2
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before
    fresh = save_partial_concepts(tmp_path / "new.safetensors", pair_set(3, complete=False), overwrite=False)
    assert fresh == tmp_path / "new.safetensors"
