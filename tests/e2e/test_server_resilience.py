"""Broken prompts interleaved with good ones on the REAL server (docs/reliability.md, "Server").

One sequence, in order: every good prompt must complete with the right output, every broken
one must come back with a clear error containing the expected words -- either a validation
rejection (HTTP 400, ComfyUI's own checks of ranges and file lists) or an execution error from
our nodes -- and the server must keep serving. The last good prompt samples the cached tiny
model with KSampler with Concepts (composition off) after all of it and must give exactly the
pixels of the first stock KSampler prompt: nothing leaked into the model ComfyUI keeps cached.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from support.concept_files import write_concept_file
from devkit.server import ComfyServer, PromptRejected, format_node_errors
from devkit.workflows import TINY_LOADER, link, node, tiny_txt2img

SIZE = 64
PAIR = "resilience_pair.safetensors"
NAN = float("nan")
CONCEPTS = "models/concepts"  # the first concepts folder (from extra_model_paths), under the work dir
EMBEDDINGS = "base/models/embeddings"  # the first embeddings and loras folders: ComfyUI's defaults
LORAS = "base/models/loras"


def loader() -> dict:
    return node(TINY_LOADER, architecture="sd15", seed=0)


def train(concepts: str = "V1: square\nV2: circle", save_name: str = "", steps: int = 1,
          image: str = "image", **extra: Any) -> dict:
    graph = {
        "loader": loader(),
        "image": node("LoadImage", image="resilience_scene.png"),
        "train": node("ConceptAttention_TrainConcepts", model=link("loader", 0), clip=link("loader", 1),
                      vae=link("loader", 2), image=link(image, 0), concepts=concepts, steps=steps,
                      learning_rate=1e-3, resolution=SIZE, seed=0, calibration=True, attention_weight=0.01,
                      save_name=save_name, micro_batch=1, grad_accumulation=1, **extra),
        "maps": node("SaveImage", images=link("train", 3), filename_prefix="resilience_maps"),
    }
    return graph


def sample(concept_file: str, prompt: str = "a photo of V1 square", arch: str = "sd15") -> dict:
    graph = {
        "loader": node(TINY_LOADER, architecture=arch, seed=0),
        "concepts": node("ConceptAttention_LoadConcepts", concept_name=concept_file),
        "apply": node("ConceptAttention_ApplyConcepts", model=link("loader", 0), clip=link("loader", 1),
                      concepts=link("concepts"), strength=1.0),
        "positive": node("CLIPTextEncode", text=prompt, clip=link("apply", 1)),
        "negative": node("CLIPTextEncode", text="", clip=link("apply", 1)),
        "latent": node("EmptyLatentImage", width=SIZE, height=SIZE, batch_size=1),
        "sampler": node("KSampler", model=link("apply", 0), positive=link("positive"),
                        negative=link("negative"), latent_image=link("latent"), seed=1, steps=2, cfg=5.0,
                        sampler_name="euler", scheduler="normal", denoise=1.0),
        "decode": node("VAEDecode", samples=link("sampler"), vae=link("loader", 2)),
        "save": node("SaveImage", images=link("decode"), filename_prefix="resilience_sample"),
    }
    return graph


STOCK = dict(prompt="a photo of a cat", seed=7, steps=2, size=SIZE)


def concept_sampler_off() -> dict:
    """KSampler with Concepts, composition off, on the cached loader: must equal the stock KSampler."""
    graph = tiny_txt2img("sd15", filename_prefix="resilience_off", **STOCK)
    graph["concepts"] = node("ConceptAttention_LoadConcepts", concept_name=PAIR)
    graph["sampler"] = node("ConceptAttention_ConceptSampler", model=link("loader", 0),
                            concepts_1=link("concepts"), composition="off", strength=1.0,
                            seed=STOCK["seed"], steps=STOCK["steps"], cfg=5.0, sampler_name="euler",
                            scheduler="normal", positive=link("positive"), negative=link("negative"),
                            latent_image=link("latent"), denoise=1.0)
    return graph


def _with(graph: dict, node_id: str, value: dict) -> dict:
    graph[node_id] = value
    return graph


def all_one_masks(graph: dict) -> dict:
    """Two all-white masks as one MASK batch, from stock nodes only."""
    graph["one"] = node("SolidMask", value=1.0, width=128, height=128)
    graph["one_image"] = node("MaskToImage", mask=link("one"))
    graph["two_images"] = node("RepeatImageBatch", image=link("one_image"), amount=2)
    graph["masks"] = node("ImageToMask", image=link("two_images"), channel="red")
    return graph


def _edit(graph: dict, node_id: str, **inputs: Any) -> dict:
    graph[node_id]["inputs"].update(inputs)
    return graph


@dataclass
class Step:
    """One prompt of the sequence: good (with a check of its output) or broken (expected words)."""

    name: str
    graph: Callable[[], dict]
    expect: tuple[str, ...] = ()  # broken: words of the error
    rejected: bool = False  # broken at validation (HTTP 400) rather than while running
    check: Callable[[ComfyServer, list[Path]], None] | None = None  # good: its output
    unchanged: tuple[str, ...] = ()  # files (under the server's work dir) that must keep their bytes
    absent: tuple[str, ...] = ()  # files (under the server's work dir) that must not appear

    @property
    def good(self) -> bool:
        return not self.expect


def _image_size(size: int) -> Callable[[ComfyServer, list[Path]], None]:
    def check(server: ComfyServer, images: list[Path]) -> None:
        assert images, "no image saved"
        for path in images:
            with Image.open(path) as image:
                assert image.size == (size, size), path
    return check


def _trained(server: ComfyServer, images: list[Path]) -> None:
    from concept_attention.concepts.concept_file import load_concepts

    assert len(images) == 4  # trigger and class map per concept
    assert load_concepts(server.concepts_dir / PAIR).triggers == ["V1", "V2"]


SEQUENCE: list[Step] = [
    Step("stock txt2img", lambda: tiny_txt2img("sd15", filename_prefix="resilience_stock", **STOCK),
         check=_image_size(SIZE)),
    Step("steps 0", lambda: train(steps=0), ("steps", "Value 0 smaller than min of 1"), rejected=True),
    Step("trigger is a common word", lambda: train("photo: square"), ("trigger 'photo' is a common word",)),
    Step("train and save", lambda: train(save_name=PAIR.removesuffix(".safetensors")), check=_trained),
    Step("save_name traversal", lambda: train(save_name="../evil"),
         ("'../evil' cannot be used as the save_name", "no folders")),
    Step("concept_name traversal", lambda: sample("../../etc/passwd"),
         ("concept_name '../../etc/passwd' is not a file in models/concepts",)),
    Step("truncated concept file", lambda: sample("resilience_truncated.safetensors"),
         ("resilience_truncated.safetensors", "damaged or incomplete")),
    Step("sample with the trained concepts", lambda: sample(PAIR), check=_image_size(SIZE)),
    Step("pickle named .safetensors", lambda: sample("resilience_pickle.safetensors"),
         ("resilience_pickle.safetensors", "pickle")),
    Step("SD1.5 concepts on SDXL", lambda: sample(PAIR, arch="sdxl"),
         ("trained for a SD15 model", "MODEL given is SDXL")),
    Step("batch where one image was expected",
         lambda: _with(train(image="batch"), "batch", node("RepeatImageBatch", image=link("image", 0), amount=2)),
         ("batch of 2 pictures", "ONE picture")),
    Step("1-pixel image",
         lambda: _with(train(image="crop"), "crop", node("ImageCrop", image=link("image", 0), width=1, height=1,
                                                           x=0, y=0)),
         ("1x1 px", "at least 64 px")),
    Step("one mask for two concepts",
         lambda: _with(train(masks=link("mask")), "mask", node("SolidMask", value=1.0, width=128, height=128)),
         ("1 masks were given for 2 concepts",)),
    Step("all-one masks", lambda: all_one_masks(train(masks=link("masks"))),
         ("masks 1 and 2 overlap on 100%",)),
    Step("train onto an existing save_name",  # another seed: not the cached result of "train and save"
         lambda: _edit(train(save_name=PAIR.removesuffix(".safetensors")), "train", seed=1),
         (f"{PAIR} already exists", "nothing was written", "switch 'overwrite' on"),
         unchanged=(f"{CONCEPTS}/{PAIR}",)),
    Step("save onto an existing name", lambda: {
        "concepts": node("ConceptAttention_LoadConcepts", concept_name=PAIR),
        "save": node("ConceptAttention_SaveConcepts", concepts=link("concepts"),
                     name=PAIR.removesuffix(".safetensors"))},
        (f"{PAIR} already exists", "another name"), unchanged=(f"{CONCEPTS}/{PAIR}",)),
    Step("export onto an unrelated embedding V1", lambda: {
        "concepts": node("ConceptAttention_LoadConcepts", concept_name=PAIR),
        "export": node("ConceptAttention_ExportConcepts", concepts=link("concepts"), name="resilience_export",
                       rank=0)},
        ("V1.safetensors", "already exist", "nothing was written"), unchanged=(f"{EMBEDDINGS}/V1.safetensors",),
        absent=(f"{LORAS}/resilience_export.safetensors",)),
    Step("strength NaN through the API", lambda: _edit(sample(PAIR), "apply", strength=NAN),
         ("'strength' must be a finite number from -2 to 2, got nan",)),
    Step("denoise NaN in KSampler with Concepts", lambda: _edit(concept_sampler_off(), "sampler", denoise=NAN),
         ("'denoise' must be a finite number",)),
    Step("regional_auto with denoise 0", lambda: _edit(concept_sampler_off(), "sampler", composition="regional_auto",
                                                      denoise=0.0), ("'denoise' is 0", "regional_auto")),
    Step("a concept file with K/V deltas of 1e30", lambda: sample("resilience_huge.safetensors"),
         ("resilience_huge.safetensors", "holds values up to 1e+30", "lower learning rate")),
    Step("a concept file with the trigger 'a'", lambda: sample("resilience_trigger_a.safetensors"),
         ("resilience_trigger_a.safetensors", "trigger 'a' is a common word")),
    Step("a link out of models/concepts", lambda: sample("resilience_link.safetensors"),
         ("is a link to", "outside models/concepts")),
    Step("export name traversal", lambda: {
        "concepts": node("ConceptAttention_LoadConcepts", concept_name=PAIR),
        "export": node("ConceptAttention_ExportConcepts", concepts=link("concepts"), name="../x", rank=0)},
        ("'../x' cannot be used as the name",)),
    Step("merge colliding triggers", lambda: {
        "loader": loader(),
        "a": node("ConceptAttention_LoadConcepts", concept_name=PAIR),
        "merge": node("ConceptAttention_MergeConcepts", model=link("loader", 0), clip=link("loader", 1),
                      concepts_1=link("a"), concepts_2=link("a"), save_name="")},
        ("trigger words must be unique",)),
    Step("attention-map word absent", lambda: _with(tiny_txt2img("sd15", **STOCK), "sampler", node(
        "ConceptAttention_AttentionMapSampler", model=link("loader", 0), clip=link("loader", 1),
        positive_text="a photo of a cat", words="giraffe", seed=1, steps=1, cfg=5.0, sampler_name="euler",
        scheduler="normal", negative=link("negative"), latent_image=link("latent"), denoise=1.0,
        layers="all", step_start=0.0, step_end=1.0)),
        ("the word 'giraffe' does not occur",)),
    Step("link to a missing node", lambda: _edit(tiny_txt2img("sd15", **STOCK), "decode",
                                                 samples=link("nowhere")),
         ("nowhere",), rejected=True),
    Step("composition off after everything", concept_sampler_off, check=_image_size(SIZE)),
]


@pytest.fixture(scope="module")
def prepared(comfy_server: ComfyServer) -> ComfyServer:
    """The scene picture, a truncated concept file and a pickle in the server's folders."""
    pixels = np.full((128, 128, 3), 128, dtype=np.uint8)
    pixels[20:60, 16:56] = (220, 30, 30)
    pixels[70:110, 72:112] = (30, 60, 220)
    Image.fromarray(pixels).save(comfy_server.input_dir / "resilience_scene.png")
    (comfy_server.concepts_dir / "resilience_pickle.safetensors").write_bytes(pickle.dumps({"a": 1}))
    _tampered(comfy_server.concepts_dir / "resilience_huge.safetensors",
              lambda tensors, meta: next(iter(tensors.values())).fill_(1e30))
    _tampered(comfy_server.concepts_dir / "resilience_trigger_a.safetensors",
              lambda tensors, meta: meta.__setitem__("concepts", meta["concepts"].replace('"V1"', '"a"')))
    outside = comfy_server.workdir / "outside"
    write_concept_file(outside / "elsewhere.safetensors", [("V1", "square")])
    (comfy_server.concepts_dir / "resilience_link.safetensors").symlink_to(outside / "elsewhere.safetensors")
    embedding = comfy_server.workdir / EMBEDDINGS / "V1.safetensors"  # another pack's (or an earlier test's)
    if not embedding.exists():
        embedding.parent.mkdir(parents=True, exist_ok=True)
        embedding.write_bytes(b"an embedding from elsewhere")
    return comfy_server


def _tampered(path: Path, change: Callable[[dict, dict], Any]) -> None:
    """A valid concept file, changed past what saving allows (as a hand-edited or crafted file)."""
    from safetensors.torch import load_file, save_file

    write_concept_file(path, [("V1", "square")])
    with safe_open(str(path), "pt") as handle:
        meta = dict(handle.metadata())
    tensors = load_file(str(path))
    change(tensors, meta)
    save_file(tensors, str(path), metadata=meta)


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).copy()


def test_broken_prompts_between_good_ones(prepared: ComfyServer) -> None:
    server = prepared
    first_stock: np.ndarray | None = None
    report = []
    for step in SEQUENCE:
        if step.name == "truncated concept file":  # from the file the good training prompt wrote
            data = (server.concepts_dir / PAIR).read_bytes()
            (server.concepts_dir / "resilience_truncated.safetensors").write_bytes(data[: len(data) // 2])
        before = {name: (server.workdir / name).read_bytes() for name in step.unchanged}
        if step.rejected:
            with pytest.raises(PromptRejected) as caught:
                server.queue(step.graph())
            text = format_node_errors(caught.value.body)
            for words in step.expect:
                assert words in text, f"{step.name}: expected {words!r} in the rejection:\n{text}"
            report.append((step.name, "rejected"))
            continue
        result = server.run(step.graph(), timeout=600)
        if step.good:
            assert result.ok, f"{step.name}: {result.describe()}"
            images = server.output_images(result)
            step.check(server, images)
            if step.name == "stock txt2img":
                first_stock = _pixels(images[0])
            if step.name == "composition off after everything":
                assert first_stock is not None
                assert np.array_equal(_pixels(images[0]), first_stock), \
                    "sampling the cached model changed after the broken prompts"
            report.append((step.name, "ok"))
        else:
            assert result.status == "error", f"{step.name}: expected an error, got {result.describe()}"
            message = result.error_message or ""
            for words in step.expect:
                assert words in message, f"{step.name}: expected {words!r} in: {message}"
            assert result.error_type in ("ValueError", "builtins.ValueError", "concept_attention.concepts."
                                         "concept_file.ConceptFileError") or "Error" in (result.error_type or ""), \
                result.describe()
            report.append((step.name, "error"))
        for name, data in before.items():
            assert (server.workdir / name).read_bytes() == data, f"{step.name} changed {name}"
        for name in step.absent:
            assert not (server.workdir / name).exists(), f"{step.name} wrote {name}"
        assert server.is_running(), f"the server died after {step.name}"
    assert [name for name, _ in report] == [s.name for s in SEQUENCE]
    assert server.system_stats()["system"]  # still answering
