"""The pack's node vocabulary: node ids, menu category, model folders, socket types, the server.

Every node module takes these names from here, so one idea has one name in the whole pack.
"""
from __future__ import annotations

from typing import Any

from comfy_api.latest import io

NODE_PREFIX = "ConceptAttention_"  # node ids are NODE_PREFIX + class name; saved workflows depend on them
CATEGORY = "concept_attention"

CONCEPTS_FOLDER = "concepts"  # models/concepts: concept files (registered in nodes/__init__.py)
NESTED_ADAPTERS_FOLDER = "nested_adapters"  # models/nested_adapters: trained image adapters
IPADAPTER_FOLDER = "ipadapter"  # registered by ComfyUI_IPAdapter_plus, if installed
LORAS_FOLDER, EMBEDDINGS_FOLDER = "loras", "embeddings"  # ComfyUI's own, where Export writes
MODEL_FILE_EXTENSIONS = {".safetensors"}

ConceptsSocket = io.Custom("CONCEPTS")  # a ConceptSet (concepts/concept_set.py)
NestedSubjectSocket = io.Custom("NESTED_SUBJECT")  # a SubjectSpec (sampling/nested_subjects.py)
NestedAdapterSocket = io.Custom("NESTED_ADAPTER")  # a NestedAdapter (sampling/nested_adapter.py)


def prompt_server() -> Any | None:
    """The running ComfyUI server, or None in library mode (no ``server`` module or no instance)."""
    try:
        from server import PromptServer
    except ImportError:
        return None
    return getattr(PromptServer, "instance", None)
