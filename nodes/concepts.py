"""Nodes that learn, store, apply and export concepts (DisenDiff)."""
from __future__ import annotations

import logging
import os

import torch
from comfy_api.latest import io

from ..attention.calibration import CalibrationSettings
from ..attention.visualize import colorize, upscale_maps
from ..concepts.apply import apply_concepts
from ..concepts.concept_file import load_concepts, save_concepts, save_partial_concepts
from ..concepts.specs import parse_concept_specs
from ..concepts.export import concepts_with_banks, export_concepts
from ..concepts.safe_files import NAME_ADVICE, TargetExistsError, check_file_stem, check_targets, next_free_path
from ..training.loop import train_concepts
from ..training.plots import loss_curve_image
from ..training.settings import TrainSettings
from ..sampling.prior import captions_for, generate_prior_images
from .common import check_numbers, listed_model_path, overwrite_input
from .vocabulary import (CATEGORY, CONCEPTS_FOLDER, EMBEDDINGS_FOLDER, LORAS_FOLDER, NODE_PREFIX, ConceptsSocket,
                         prompt_server)
from .web_api import LiveTraining

log = logging.getLogger(__name__)



def concept_path(name: str, what: str = "save_name", overwrite: bool = True) -> str:
    """Where Save/Train/Merge write ``name`` in the first concepts folder (refusing path tricks);
    without ``overwrite`` a name that is taken is refused too, before any work."""
    import folder_paths

    stem = check_file_stem(name.strip().removesuffix(".safetensors"), f"the {what} (a concept file name)",
                           NAME_ADVICE)
    path = os.path.join(folder_paths.get_folder_paths(CONCEPTS_FOLDER)[0], f"{stem}.safetensors")
    check_targets([path], overwrite, what)
    return path


def report_progress_text(node_id: str, text: str) -> None:
    """Show a line of text under a running node in the ComfyUI front end (no-op headless)."""
    server = prompt_server()
    if server is not None:
        server.send_progress_text(text, node_id)


class TrainConcepts(io.ComfyNode):
    """Learns one new token per concept (plus shared K/V deltas) from one picture."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{NODE_PREFIX}TrainConcepts",
            display_name="Train Concepts from One Image (DisenDiff)",
            category=CATEGORY,
            description="Learns a trigger word per object of one picture, bound to its class word, "
                        "with DisenDiff's attention calibration.",
            inputs=[
                io.Model.Input("model", tooltip="Base model (SD1.x or SDXL)."),
                io.Clip.Input("clip", tooltip="Its text encoder."),
                io.Vae.Input("vae", tooltip="Its VAE, to encode the picture."),
                io.Image.Input("image", tooltip="ONE picture containing all the concepts."),
                io.String.Input("concepts", multiline=True, default="V1: cat\nV2: dog",
                                tooltip="One concept per line: 'TRIGGER: class word(s)'."),
                io.Int.Input("steps", default=250, min=1, max=100000,
                             tooltip="Optimizer steps (DisenDiff: 250)."),
                io.Float.Input("learning_rate", default=8e-5, min=1e-7, max=1.0, step=1e-6,
                               tooltip="AdamW learning rate (DisenDiff: 8e-5)."),
                io.Int.Input("resolution", default=512, min=64, max=2048, step=64,
                             tooltip="Training resolution in pixels (512 for SD1.x, 1024 for SDXL)."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff,
                             tooltip="Seed of augmentation, timesteps and noise."),
                io.Boolean.Input("calibration", default=True,
                                 tooltip="DisenDiff's attention losses; off = Custom Diffusion."),
                io.Float.Input("attention_weight", default=0.01, min=0.0, max=10.0, step=0.001,
                               tooltip="Weight of the attention losses (official code: 0.01)."),
                io.String.Input("save_name", default="",
                                tooltip="If set, save to models/concepts/<name>.safetensors (also a "
                                        "partial file when interrupted, which never replaces "
                                        "anything: then it is <name>_partial). An existing file "
                                        "is only replaced with 'overwrite' on."),
                io.Int.Input("micro_batch", default=2, min=1, max=64, optional=True,
                             tooltip="Images per forward pass."),
                io.Int.Input("grad_accumulation", default=4, min=1, max=64, optional=True,
                             tooltip="Forward passes per step (effective batch = both multiplied)."),
                io.Combo.Input("precision", options=["fp32", "bf16", "fp16", "auto"], default="auto",
                               optional=True,
                               tooltip="Autocast precision of the UNet during training. auto: bf16 "
                                       "on GPUs that have it (compute capability 8.0 and up), "
                                       "else fp32 (the CPU trains in fp32)."),
                io.Boolean.Input("gradient_checkpointing", default=False, optional=True,
                                 tooltip="Save memory by recomputing activations (slower)."),
                io.Mask.Input("masks", optional=True,
                              tooltip="One mask per concept, in order: supervises its maps and "
                                      "limits reconstruction to the objects."),
                io.Image.Input("prior_images", optional=True,
                               tooltip="Regularisation images of the classes (about half of the "
                                       "training batches use them)."),
                io.String.Input("prior_captions", multiline=True, default="", optional=True,
                                tooltip="Captions of the prior images: one per line, or one line "
                                        "for all."),
                io.Int.Input("generated_priors", default=0, min=0, max=1000, optional=True,
                             tooltip="Generate this many prior images with the base model from "
                                     "the class prompt (e.g. 'a photo of a cat and a dog')."),
                io.String.Input("caption", default="", optional=True,
                                tooltip="Training caption; must contain each 'TRIGGER class'. Empty: "
                                        "DisenDiff's 'photo of a V1 cat and V2 dog'."),
                io.String.Input("map_layers", default="latent/4", optional=True,
                                tooltip="Cross-attention layers whose maps are calibrated: "
                                        "'latent/4' (16x16 at 512 px, as DisenDiff), 'latent/2', "
                                        "'all', or keys like 'output:3:0'."),
                io.Int.Input("token_bank", default=0, min=0, max=64, optional=True,
                             tooltip="Also learn this many nested-attention tokens per concept "
                                     "(4 to 16 is typical; 0 = off). Use them with Nested Subject "
                                     "(Concept Token Bank) -> Apply Nested Attention."),
                overwrite_input("models/concepts/<save_name>.safetensors"),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="Model with the learned K/V deltas."),
                io.Clip.Output(display_name="CLIP", tooltip="CLIP that understands the triggers."),
                ConceptsSocket.Output(display_name="CONCEPTS", tooltip="The learned concepts."),
                io.Image.Output(display_name="attention_maps",
                                tooltip="Last calibrated maps: each trigger, then each class word."),
                io.Image.Output(display_name="loss_curve", tooltip="Loss terms over the steps."),
            ],
            hidden=[io.Hidden.unique_id],
            not_idempotent=True,
        )

    @classmethod
    def execute(cls, model, clip, vae, image, concepts: str, steps: int, learning_rate: float,
                resolution: int, seed: int, calibration: bool, attention_weight: float,
                save_name: str, micro_batch: int = 2, grad_accumulation: int = 4,
                precision: str = "auto", gradient_checkpointing: bool = False,
                masks=None, prior_images=None, prior_captions: str = "",
                generated_priors: int = 0, caption: str = "",
                map_layers: str = "latent/4", token_bank: int = 0,
                overwrite: bool = False) -> io.NodeOutput:
        import comfy.model_management
        import comfy.utils

        check_numbers(cls, locals())
        specs = parse_concept_specs(concepts)
        path = concept_path(save_name, overwrite=overwrite) if save_name.strip() else None
        settings = TrainSettings(
            steps=steps, learning_rate=learning_rate, resolution=resolution, seed=seed,
            micro_batch=micro_batch, grad_accumulation=grad_accumulation,
            calibration=CalibrationSettings(weight=attention_weight, use_bind=calibration,
                                            use_separation=calibration),
            autocast={"fp32": "none"}.get(precision, precision),
            gradient_checkpointing=gradient_checkpointing, caption=caption.strip(),
            map_layers=map_layers.strip() or "latent/4", token_bank=token_bank)
        prior = captions_for(prior_images, prior_captions) if prior_images is not None else []
        if generated_priors:
            class_prompt = "a photo of " + " and ".join(f"a {s.class_phrase}" for s in specs)
            prior += generate_prior_images(model, clip, vae, class_prompt, generated_priors,
                                           resolution, seed)
        bar = comfy.utils.ProgressBar(steps)
        node_id = cls.hidden.unique_id if cls.hidden is not None else None
        live = LiveTraining(node_id, [s.trigger for s in specs] + [s.class_phrase for s in specs])

        def progress(step: int, total: int, losses: dict[str, float], maps) -> None:
            bar.update_absolute(step, total)
            if node_id is not None:
                report_progress_text(node_id, f"step {step}/{total}  loss {losses['loss']:.4f}")
                live.update(step, total, losses, maps)
            comfy.model_management.throw_exception_if_processing_interrupted()

        def keep_partial(partial) -> None:
            if path is not None:
                written = save_partial_concepts(path, partial, overwrite=overwrite)
                log.info("training interrupted: partial concepts saved to %s", written)

        result = train_concepts(model, clip, vae, image, specs, settings, masks=masks,
                                prior=prior, progress=progress, on_checkpoint=keep_partial)
        new_model, new_clip = apply_concepts(model, clip, result.concepts)  # refuses a diverged run
        if path is not None:
            cls._save(path, result.concepts, overwrite)
        maps = cls._maps_image(result.maps, resolution)
        return io.NodeOutput(new_model, new_clip, result.concepts, maps,
                             loss_curve_image(result.history))

    @staticmethod
    def _save(path: str, concepts, overwrite: bool) -> None:
        """Save the finished run; if its name was taken during the run, keep it under the next free
        name rather than lose it or replace what appeared (the name was checked before training)."""
        try:
            save_concepts(path, concepts, overwrite=overwrite)
        except TargetExistsError:
            kept = next_free_path(path)
            save_concepts(kept, concepts, overwrite=False)
            log.warning("%s appeared while training; the trained concepts were saved to %s", path, kept)

    @staticmethod
    def _maps_image(maps, size: int) -> torch.Tensor:
        if maps is None:
            return torch.zeros(1, 64, 64, 3)
        return colorize(upscale_maps(maps, size // 4, size // 4))


class ApplyConcepts(io.ComfyNode):
    """Adds learned concepts to a MODEL and CLIP."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{NODE_PREFIX}ApplyConcepts",
            display_name="Apply Concepts",
            category=CATEGORY,
            description="Patches K/V weights (stacks with LoRA) and teaches the CLIP the trigger "
                        "words, for use in an ordinary CLIPTextEncode.",
            inputs=[
                io.Model.Input("model", tooltip="Model of the architecture the concepts came from."),
                io.Clip.Input("clip", tooltip="Its text encoder."),
                ConceptsSocket.Input("concepts", tooltip="From Train Concepts or Load Concepts."),
                io.Float.Input("strength", default=1.0, min=-2.0, max=2.0, step=0.01,
                               tooltip="Scale of the K/V deltas (triggers are always added)."),
            ],
            outputs=[io.Model.Output(display_name="MODEL"), io.Clip.Output(display_name="CLIP")],
        )

    @classmethod
    def execute(cls, model, clip, concepts, strength: float) -> io.NodeOutput:
        check_numbers(cls, locals())
        return io.NodeOutput(*apply_concepts(model, clip, concepts, strength))


class LoadConcepts(io.ComfyNode):
    """Loads a concept file from models/concepts."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        import folder_paths

        return io.Schema(
            node_id=f"{NODE_PREFIX}LoadConcepts",
            display_name="Load Concepts",
            category=CATEGORY,
            inputs=[io.Combo.Input("concept_name",
                                   options=folder_paths.get_filename_list(CONCEPTS_FOLDER),
                                   tooltip="A .safetensors file in models/concepts.")],
            outputs=[ConceptsSocket.Output(display_name="CONCEPTS")],
        )

    @classmethod
    def execute(cls, concept_name: str) -> io.NodeOutput:
        return io.NodeOutput(load_concepts(listed_model_path(CONCEPTS_FOLDER, concept_name, "concept_name")))


class SaveConcepts(io.ComfyNode):
    """Writes concepts to models/concepts/<name>.safetensors."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{NODE_PREFIX}SaveConcepts",
            display_name="Save Concepts",
            category=CATEGORY,
            inputs=[ConceptsSocket.Input("concepts", tooltip="Concepts to save."),
                    io.String.Input("name", default="my_concepts",
                                    tooltip="File name without extension."),
                    overwrite_input("models/concepts/<name>.safetensors")],
            outputs=[io.String.Output(display_name="path", tooltip="Where the file went.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, concepts, name: str, overwrite: bool = False) -> io.NodeOutput:
        path = concept_path(name, "name", overwrite)
        save_concepts(path, concepts, overwrite=overwrite)
        return io.NodeOutput(path)


class ExportConcepts(io.ComfyNode):
    """Exports K/V deltas as a LoRA and each trigger as an embedding, for use without this pack."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{NODE_PREFIX}ExportConcepts",
            display_name="Export Concepts (LoRA + embeddings)",
            category=CATEGORY,
            inputs=[ConceptsSocket.Input("concepts", tooltip="Concepts to export."),
                    io.String.Input("name", default="my_concepts",
                                    tooltip="LoRA file name (models/loras/<name>.safetensors)."),
                    io.Int.Input("rank", default=0, min=0, max=4096,
                                 tooltip="0 = exact (full) deltas; otherwise a low-rank SVD LoRA."),
                    overwrite_input("models/loras/<name>.safetensors or an embedding "
                                    "models/embeddings/<trigger>.safetensors")],
            outputs=[io.String.Output(display_name="report",
                                      tooltip="Files written and the low-rank error.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, concepts, name: str, rank: int, overwrite: bool = False) -> io.NodeOutput:
        import comfy.model_management
        import folder_paths

        stem = check_file_stem(name.strip(), "the name (a LoRA file name)", NAME_ADVICE)
        lora_path = os.path.join(folder_paths.get_folder_paths(LORAS_FOLDER)[0], f"{stem}.safetensors")
        lora_path, written, errors = export_concepts(
            lora_path, folder_paths.get_folder_paths(EMBEDDINGS_FOLDER)[0], concepts, rank or None,
            overwrite=overwrite, device=comfy.model_management.get_torch_device())
        worst = max(errors.values()) if errors else 0.0
        report = (f"LoRA: {lora_path} (rank {'full' if not rank else rank}, worst relative error "
                  f"{worst:.4f}); embeddings: {', '.join(str(p) for p in written)}; prompt with "
                  + ", ".join(f"'embedding:{c.trigger} {c.class_phrase}'" for c in concepts.concepts))
        dropped = concepts_with_banks(concepts)
        if dropped:
            report += f"; token banks of {', '.join(dropped)} not exported (they need this pack)"
        log.info(report)
        return io.NodeOutput(report)
