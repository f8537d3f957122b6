"""Durability: every file the pack writes is replaced atomically (docs/reliability.md, "Durability").

Faults are injected at each point of a write (while the data is written, at fsync, at the
rename, as an exception and as a KeyboardInterrupt) into every writer: concept files, partial
concept files, the LoRA and embedding exports, nested adapters and the adapter trainer's JSON
checkpoint. Each time the previous file stays byte for byte and no temporary file is left. A
writer process killed with SIGKILL at random moments leaves either the old or the new complete
file, every time.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest
import torch

from concept_attention.concepts import safe_files
from concept_attention.concepts.concept_file import (load_concepts, save_concepts,
                                                     save_partial_concepts)
from concept_attention.concepts.concept_set import Concept, ConceptSet
from concept_attention.concepts.export import save_embeddings, save_lora

DEV_DIR = Path(__file__).resolve().parents[2] / "dev"
LAYER = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2"


def concept_set(seed: int, complete: bool = True, width: int = 16) -> ConceptSet:
    """A small valid set; ``seed`` makes its contents differ."""
    from concept_attention.concepts.concept_file import kv_digest

    shapes = {f"{LAYER}.to_k.weight": (8, width), f"{LAYER}.to_v.weight": (8, width)}
    g = torch.Generator().manual_seed(seed)
    return ConceptSet([Concept("V1", "cat", {"clip_l": torch.randn(1, width, generator=g)})],
                      {k: torch.randn(s, generator=g) for k, s in shapes.items()},
                      {"model": "SD15", "kv_layers": 1, "kv_digest": kv_digest(shapes),
                       "encoders": {"clip_l": width}}, {"complete": complete, "seed": seed})


def _adapter_writer(folder: Path, seed: int) -> None:
    """Save a tiny nested adapter (IP-Adapter-Plus layout) with ``save_adapter``."""
    from concept_attention.sampling.nested_adapter import adapter_from_state_dict, save_adapter
    from support.tiny_adapters import tiny_sd15_plus

    save_adapter(adapter_from_state_dict(tiny_sd15_plus(seed), {}, torch.float32),
                 folder / "adapter.safetensors")


# Each writer: (name, file it writes in a folder, how to write version ``seed``).
WRITERS: list[tuple[str, str, Callable[[Path, int], None]]] = [
    ("concept file", "set.safetensors", lambda f, s: save_concepts(f / "set.safetensors", concept_set(s))),
    ("partial concept file", "run.safetensors",
     lambda f, s: save_partial_concepts(f / "run.safetensors", concept_set(s, complete=False))),
    ("LoRA export", "lora.safetensors", lambda f, s: save_lora(f / "lora.safetensors", concept_set(s), rank=2)),
    ("embedding export", "V1.safetensors", lambda f, s: save_embeddings(f, concept_set(s))),
    ("nested adapter", "adapter.safetensors", _adapter_writer),
    ("adapter checkpoint JSON", "checkpoint.json",
     lambda f, s: safe_files.atomic_write_text(f / "checkpoint.json", f'{{"step": {s}}}')),
]


class Fault(Exception):
    """The injected failure."""


def _raise(*args, **kwargs):
    raise Fault("injected")


class _HalfWritten:
    """A writer dying halfway: part of the file is on disk, then ``error``."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def __call__(self, handle, data) -> None:
        handle.write(data[: max(1, len(data) // 2)])
        handle.close()
        raise self.error


FAULTS: dict[str, tuple[str, Callable[..., None], type[BaseException]]] = {
    "half written": ("write", _HalfWritten(Fault("disk full (injected)")), Fault),
    "interrupted while writing": ("write", _HalfWritten(KeyboardInterrupt()), KeyboardInterrupt),
    "fsync fails": ("fsync", _raise, Fault),
    "rename fails": ("replace", _raise, Fault),
}


class _FaultyFile:
    """A file handle whose first ``write`` runs ``fault`` instead."""

    def __init__(self, handle, fault: Callable[..., None]) -> None:
        self.handle, self.fault = handle, fault

    def write(self, data):
        return self.fault(self.handle, data)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.handle.close()


def _inject(monkeypatch: pytest.MonkeyPatch, where: str, fault: Callable[..., None]) -> None:
    if where == "fsync":
        monkeypatch.setattr(safe_files, "_fsync_file", fault)
    elif where == "replace":
        monkeypatch.setattr(safe_files.os, "replace", fault)
    else:
        original_open = open

        def faulty_open(file, mode="r", *args, **kwargs):  # both writers fill the temp file with open()
            handle = original_open(file, mode, *args, **kwargs)
            if "w" in mode and str(file).endswith(safe_files.TEMP_SUFFIX):
                return _FaultyFile(handle, fault)
            return handle

        monkeypatch.setattr("builtins.open", faulty_open)


@pytest.mark.parametrize("fault", list(FAULTS), ids=list(FAULTS))
@pytest.mark.parametrize("writer", WRITERS, ids=[w[0] for w in WRITERS])
def test_a_fault_at_any_point_keeps_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      writer, fault: str) -> None:
    name, filename, write = writer
    write(tmp_path, 1)
    target = tmp_path / filename
    before = target.read_bytes()
    where, inject, error = FAULTS[fault]
    with monkeypatch.context() as patch:
        _inject(patch, where, inject)
        with pytest.raises(error):
            write(tmp_path, 2)
    assert target.read_bytes() == before, f"{name}: the previous file changed"
    assert sorted(p.name for p in tmp_path.iterdir()) == [filename], f"{name}: a temporary file was left"
    write(tmp_path, 3)  # and the next write works
    assert target.read_bytes() != before


def test_a_partial_run_never_replaces_a_finished_file(tmp_path: Path) -> None:
    path = tmp_path / "mycat.safetensors"
    save_concepts(path, concept_set(1))
    finished = path.read_bytes()
    written = save_partial_concepts(path, concept_set(2, complete=False))
    assert written == tmp_path / "mycat_partial.safetensors"
    assert path.read_bytes() == finished
    assert load_concepts(written).metadata["complete"] is False
    again = save_partial_concepts(written, concept_set(3, complete=False))  # a partial may replace a partial
    assert again == written and load_concepts(written).metadata["seed"] == 3


def test_a_damaged_file_is_no_work_to_keep(tmp_path: Path) -> None:
    path = tmp_path / "run.safetensors"
    path.write_bytes(b"garbage")
    assert save_partial_concepts(path, concept_set(2, complete=False)) == path
    assert load_concepts(path).metadata["seed"] == 2


def test_interrupt_with_a_failing_save_still_reports_the_interrupt(monkeypatch: pytest.MonkeyPatch) -> None:
    """ConceptTrainer.run: if keeping the partial set fails, the user still sees the interrupt."""
    from concept_attention.training.loop import ConceptTrainer
    from concept_attention.training.settings import TrainResult, TrainSettings

    class Stop(Exception):
        pass

    trainer = ConceptTrainer.__new__(ConceptTrainer)
    monkeypatch.setattr(trainer, "prepare", lambda: ([], [], [], None), raising=False)
    trainer.settings = TrainSettings(steps=1)
    trainer.history = []
    trainer.clip = SimpleNamespace(cond_stage_model=torch.nn.Module())
    monkeypatch.setattr(trainer, "step", lambda *a: (_ for _ in ()).throw(Stop("cancelled")), raising=False)
    monkeypatch.setattr(trainer, "result", lambda stopped: TrainResult(concept_set(1), [], None, stopped),
                        raising=False)

    def failing_save(concepts: ConceptSet) -> None:
        raise OSError("disk full")

    with pytest.raises(Stop, match="cancelled"):
        trainer.run(on_checkpoint=failing_save)


WRITER_LOOP = textwrap.dedent('''
    import sys
    sys.path.insert(0, {dev!r})
    from devkit.pack import install_alias
    install_alias()
    import torch
    from concept_attention.concepts.concept_file import kv_digest, save_concepts
    from concept_attention.concepts.concept_set import Concept, ConceptSet
    layer = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2"
    shapes = {{f"{{layer}}.to_k.weight": (512, 1024), f"{{layer}}.to_v.weight": (512, 1024)}}
    arch = {{"model": "SD15", "kv_layers": 1, "kv_digest": kv_digest(shapes), "encoders": {{"clip_l": 1024}}}}
    sets = [ConceptSet([Concept("V1", "cat", {{"clip_l": torch.full((1, 1024), float(v))}})],
                       {{k: torch.full(s, float(v)) for k, s in shapes.items()}}, arch, {{"version": v}})
            for v in (1, 2)]
    save_concepts(sys.argv[1], sets[0])
    print("ready", flush=True)
    i = 0
    while True:
        i += 1
        save_concepts(sys.argv[1], sets[i % 2])
''')


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_a_writer_killed_at_random_moments_leaves_an_old_or_new_complete_file(tmp_path: Path) -> None:
    path = tmp_path / "killed.safetensors"
    script = tmp_path / "writer.py"
    script.write_text(WRITER_LOOP.format(dev=str(DEV_DIR)), encoding="utf-8")
    rng = random.Random(0)
    versions = []
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        try:
            assert proc.stdout.readline().strip() == b"ready", proc.stderr.read().decode()[-2000:]
            time.sleep(rng.uniform(0.02, 0.3))  # a 4 MiB file: mid-write most of the time
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(30)
            proc.stdout.close()
            proc.stderr.close()
        loaded = load_concepts(path)
        version = loaded.metadata["version"]
        assert version in (1, 2)
        assert all(bool((t == float(version)).all()) for t in loaded.kv_deltas.values())
        versions.append(version)
        leftovers = [p.name for p in tmp_path.iterdir() if p.name not in ("writer.py", path.name)]
        # A killed process cannot clean up: its temporary file may stay, hidden and not *.safetensors,
        # so no concept list ever shows it.
        assert all(n.startswith(".") and n.endswith(safe_files.TEMP_SUFFIX) for n in leftovers), leftovers
        for name in leftovers:
            (tmp_path / name).unlink()
    assert versions  # which version survived is up to timing; each one was complete
