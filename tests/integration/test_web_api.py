"""The front end's server side (nodes/web_api.py) in library mode: listing, name checks, live payloads."""
from __future__ import annotations

import base64
import io
import json

import pytest
import torch
from PIL import Image

from concept_attention.nodes import register_model_folders
from concept_attention.nodes import web_api
from concept_attention.concepts.specs import ConceptSpec
from concept_attention.training.loop import train_concepts
from concept_attention.training.settings import TrainSettings
from support.concept_files import write_broken_file, write_concept_file


@pytest.fixture(scope="module")
def concepts_dir(tmp_path_factory):
    """A concepts folder with one good file (V1 cat, V2 dog) and one broken file."""
    import folder_paths

    register_model_folders()
    folder = tmp_path_factory.mktemp("web_api_concepts")
    write_concept_file(folder / "webapi_pair.safetensors", [("V1", "cat"), ("V2", "dog")])
    write_broken_file(folder / "webapi_broken.safetensors")
    (folder / "notes.txt").write_text("not a concept file")
    folder_paths.add_model_folder_path("concepts", str(folder))
    return folder


def _by_name(entries):
    return {entry["name"]: entry for entry in entries}


def test_listing_reads_header_triggers_and_flags_broken_files(concepts_dir):
    entries = _by_name(web_api.list_concept_files())
    good, broken = entries["webapi_pair.safetensors"], entries["webapi_broken.safetensors"]
    assert "notes.txt" not in entries
    assert good["triggers"] == ["V1", "V2"] and good["classes"] == ["cat", "dog"]
    assert good["concepts"] == [{"trigger": "V1", "class_phrase": "cat"},
                                {"trigger": "V2", "class_phrase": "dog"}]
    assert good["architecture"].startswith("SD15") and "error" not in good
    assert broken["triggers"] == [] and broken["error"]
    json.dumps(list(entries.values()))  # what the route sends must be JSON


@pytest.mark.parametrize("name", ["../webapi_pair.safetensors", "..", "/etc/passwd", "",
                                  "sub/../webapi_pair.safetensors", "webapi_pair", None])
def test_only_listed_names_are_accepted(concepts_dir, name):
    assert not web_api.known_concept_name(name)


def test_a_listed_name_is_accepted(concepts_dir):
    assert web_api.known_concept_name("webapi_pair.safetensors")
    assert web_api.concept_file_entry("webapi_pair.safetensors")["triggers"] == ["V1", "V2"]


def test_a_link_out_of_the_folder_is_listed_with_an_error_and_never_read(concepts_dir, tmp_path):
    write_concept_file(tmp_path / "outside.safetensors", [("V5", "bird")])
    link = concepts_dir / "webapi_link.safetensors"
    link.symlink_to(tmp_path / "outside.safetensors")
    try:
        entry = _by_name(web_api.list_concept_files())["webapi_link.safetensors"]
        assert entry["triggers"] == [] and "outside models/concepts" in entry["error"]
        assert "V5" not in json.dumps(web_api.concept_file_entry("webapi_link.safetensors"))
    finally:
        link.unlink()


def test_loss_series_is_thinned_but_keeps_the_last_step():
    history = [{"loss": 1.0 / (i + 1), "reconstruction": 0.5, "step": i + 1} for i in range(1000)]
    series = web_api.loss_series(history, limit=100)
    assert list(series) == ["step", "loss", "reconstruction"]
    assert 95 <= len(series["step"]) <= 101 and series["step"][-1] == 1000
    assert all(len(values) == len(series["step"]) for values in series.values())
    assert web_api.loss_series([{"loss": float("nan"), "step": 1}])["loss"] == [None]


def test_live_updates_are_throttled():
    assert [web_api.should_send(s, 3) for s in (1, 2, 3)] == [True, True, True]
    sent = [s for s in range(1, 251) if web_api.should_send(s, 250)]
    assert sent[0] == 1 and sent[-1] == 250 and len(sent) <= web_api.MAX_LIVE_MESSAGES + 2


@pytest.mark.parametrize("side, expected", [(64, 32), (8, 8)])
def test_maps_become_small_png_data_urls(side, expected):
    urls = web_api.maps_data_urls(torch.rand(4, side, side))
    assert len(urls) == 4
    prefix = "data:image/png;base64,"
    assert all(url.startswith(prefix) for url in urls)
    with Image.open(io.BytesIO(base64.b64decode(urls[0][len(prefix):]))) as picture:
        assert picture.size == (expected, expected) and picture.mode == "RGB"
    assert web_api.maps_data_urls(None) == []


def test_live_training_collects_and_sends(monkeypatch):
    sent = []
    monkeypatch.setattr(web_api, "send_training_update", lambda payload: sent.append(payload) or True)
    live = web_api.LiveTraining("7", ["V1", "cat"])
    for step in (1, 2, 3):
        live.update(step, 3, {"loss": 0.5, "reconstruction": 0.4}, torch.rand(2, 8, 8))
    assert live.sent == 3 and sent[-1]["node"] == "7" and sent[-1]["step"] == 3
    assert sent[-1]["losses"]["step"] == [1, 2, 3] and len(sent[-1]["maps"]) == 2
    assert sent[-1]["labels"] == ["V1", "cat"]
    assert len(json.dumps(sent[-1])) < 20_000
    web_api.LiveTraining(None, []).update(1, 1, {"loss": 1.0})  # headless: nothing, no error


def test_progress_callback_gets_the_trainers_current_maps(sd15):
    """The training loop hands each step's calibrated maps to ``progress`` (the live panel shows them)."""
    seen = []

    def progress(step: int, total: int, losses: dict[str, float], maps) -> None:
        seen.append(maps)

    settings = TrainSettings(steps=2, resolution=64, micro_batch=1, grad_accumulation=1, pool_size=1,
                             learning_rate=1e-3)
    picture = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        train_concepts(sd15.bundle.model, sd15.bundle.clip, sd15.bundle.vae, picture,
                       [ConceptSpec("V1", "cat"), ConceptSpec("V2", "dog")], settings, progress=progress)
    assert len(seen) == 2
    for maps in seen:
        assert isinstance(maps, torch.Tensor) and maps.ndim == 3 and maps.shape[0] == 4
