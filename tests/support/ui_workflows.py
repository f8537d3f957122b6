"""UI-format (LiteGraph) workflows → API prompts, the way the front end's ``graphToPrompt`` does it.

Links become ``[origin node id, output slot]``; ``widgets_values`` are matched to input names in the
order the front end creates widgets (``input_order``: required then optional; a 'control after
generate' value after seed-like INT widgets and after combos that ask for one; the image-upload
button's value last). Front-end-only nodes (notes) are skipped, as are muted or bypassed nodes.
"""
from __future__ import annotations

from typing import Any

from devkit.workflows import Prompt

VIRTUAL_NODES = {"Note", "MarkdownNote"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def _options(spec: list[Any]) -> dict[str, Any]:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def widget_slots(info: dict[str, Any]) -> list[str | None]:
    """Input name of each ``widgets_values`` entry (None for values the server never sees)."""
    slots: list[str | None] = []
    upload = False
    order = info.get("input_order") or {k: list(v) for k, v in info["input"].items()}
    for group in ("required", "optional"):
        for name in order.get(group, []):
            spec = info["input"][group][name]
            options = _options(spec)
            if not (isinstance(spec[0], list) or spec[0] in WIDGET_TYPES) or options.get("forceInput"):
                continue
            slots.append(name)
            control = options.get("control_after_generate",
                                  spec[0] == "INT" and name in ("seed", "noise_seed"))
            if control:
                slots.append(None)
            upload |= bool(options.get("image_upload"))
    return slots + [None] if upload else slots


def ui_to_api(workflow: dict[str, Any], object_info: dict[str, dict[str, Any]]) -> Prompt:
    """The API prompt the front end would queue for ``workflow``."""
    links = {link[0]: link for link in workflow["links"]}
    prompt: Prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in VIRTUAL_NODES or node.get("mode", 0) in (2, 4):
            continue
        info = object_info[node["type"]]
        inputs: dict[str, Any] = {}
        values = node.get("widgets_values") or []
        slots = widget_slots(info)
        if len(values) != len(slots):
            raise ValueError(f"node {node['id']} ({node['type']}): {len(values)} widget values for "
                             f"{len(slots)} widgets {slots}")
        for name, value in zip(slots, values):
            if name is not None:
                inputs[name] = value
        for index, entry in enumerate(node.get("inputs", [])):
            if entry.get("link") is not None:
                _id, origin, slot, target, target_slot, _type = links[entry["link"]]
                if (target, target_slot) != (node["id"], index):
                    raise ValueError(f"link {entry['link']} ends at {target}:{target_slot}, "
                                     f"not at node {node['id']} input {index}")
                inputs[entry["name"]] = [str(origin), slot]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt
