"""ComfyUI nodes of the pack (V3 schema). Thin: the work happens in ``attention/``, ``concepts/``, ``sampling/`` and ``training/``."""
from __future__ import annotations

import os

from comfy_api.latest import ComfyExtension, io

from .vocabulary import CONCEPTS_FOLDER, MODEL_FILE_EXTENSIONS, NESTED_ADAPTERS_FOLDER


def register_model_folders() -> None:
    """Register ``models/concepts`` and ``models/nested_adapters`` (users may add more paths with
    ``concepts:`` / ``nested_adapters:`` in extra_model_paths)."""
    import folder_paths

    for folder in (CONCEPTS_FOLDER, NESTED_ADAPTERS_FOLDER):
        default = os.path.join(folder_paths.models_dir, folder)
        folder_paths.add_model_folder_path(folder, default, is_default=False)
        paths, extensions = folder_paths.folder_names_and_paths[folder]
        folder_paths.folder_names_and_paths[folder] = (paths, set(extensions) | MODEL_FILE_EXTENSIONS)


def node_list() -> list[type[io.ComfyNode]]:
    """Every node class of the pack, in menu order."""
    from .compose import ConceptSampler, MergeConcepts
    from .concepts import (ApplyConcepts, ExportConcepts, LoadConcepts, SaveConcepts,
                           TrainConcepts)
    from .nested import ApplyNestedAttention, NestedSubjectFromConcepts
    from .nested_adapter import LoadNestedAdapter, NestedSubjectFromImage
    from .preview import AttentionMapSampler
    from .toy_world import ToyWorldLoader, ToyWorldScene

    return [TrainConcepts, ApplyConcepts, LoadConcepts, SaveConcepts, ExportConcepts,
            MergeConcepts, ConceptSampler, AttentionMapSampler, ApplyNestedAttention,
            NestedSubjectFromConcepts, LoadNestedAdapter, NestedSubjectFromImage, ToyWorldLoader,
            ToyWorldScene]


class ConceptAttentionExtension(ComfyExtension):
    """The pack's V3 extension object."""

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return node_list()
