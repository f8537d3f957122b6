"""A compact way to describe a ComfyUI graph in Python and write it in the front end's UI format.

    g = Graph()
    ckpt = g.add("CheckpointLoaderSimple", col=0, ckpt_name="v1-5-pruned-emaonly-fp16.safetensors")
    text = g.add("CLIPTextEncode", col=1, clip=ckpt[1], text="a photo of a cat")
    workflow = g.to_ui(definitions)   # definitions: {node type: /object_info entry}

Keyword values are widget values, or links (``node[output index]``) to connect an input (a widget
input given a link becomes an input socket, as when a wire is dropped on a widget). Widgets are
written in the order the front end creates them: inputs in ``input_order`` (required, then
optional), an extra ``control_after_generate`` value after seed-like INT widgets, and the upload
button's value last on nodes with an ``image_upload`` combo.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
COLUMN_WIDTH = 400
ROW_GAP = 40
NOTE_COLOR, NOTE_BGCOLOR = "#432", "#653"
IMAGE_PREVIEW_HEIGHT = 200  # room for the picture under an image-upload widget


@dataclass(frozen=True)
class Link:
    """Output ``slot`` of node ``node_id``."""

    node_id: int
    slot: int


@dataclass
class Node:
    """One node of a :class:`Graph` as described (values not yet laid out)."""

    id: int
    type: str
    col: int
    values: dict[str, Any]
    title: str | None = None
    properties: dict[str, Any] = field(default_factory=dict)
    control: str = "fixed"  # value of a 'control after generate' widget, if the node has one

    def __getitem__(self, slot: int) -> Link:
        return Link(self.id, slot)


def is_widget(spec: list[Any]) -> bool:
    """Whether an ``/object_info`` input spec becomes a widget (not a socket) in the front end."""
    kind = spec[0]
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return (isinstance(kind, list) or kind in WIDGET_TYPES) and not options.get("forceInput")


def has_control_widget(name: str, spec: list[Any]) -> bool:
    """Whether the front end adds a 'control after generate' widget after this one."""
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if "control_after_generate" in options:
        return bool(options["control_after_generate"])
    return spec[0] == "INT" and name in ("seed", "noise_seed")


def ordered_inputs(info: dict[str, Any]) -> list[tuple[str, list[Any], bool]]:
    """``(name, spec, optional)`` for each input, in the front end's order."""
    order = info.get("input_order") or {k: list(v) for k, v in info["input"].items()}
    out = []
    for group in ("required", "optional"):
        specs = info["input"].get(group, {})
        out += [(name, list(specs[name]), group == "optional") for name in order.get(group, [])]
    return out


def default_value(spec: list[Any]) -> Any:
    """The value a fresh widget shows."""
    kind, options = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
    if "default" in options:
        return options["default"]
    if isinstance(kind, list):
        return kind[0] if kind else ""
    if kind == "COMBO":
        return (options.get("options") or [""])[0]
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[kind]


def node_height(n_sockets: int, n_widgets: int, n_multiline: int) -> int:
    """A size close to what the front end gives a fresh node."""
    return 30 + 22 * n_sockets + 26 * n_widgets + 90 * n_multiline


class Graph:
    """Nodes and links of one workflow, laid out in columns."""

    def __init__(self) -> None:
        self.nodes: list[Node] = []

    def add(self, type_: str, col: int, title: str | None = None,
            properties: dict[str, Any] | None = None, control: str = "fixed", **values: Any) -> Node:
        """Add a node in column ``col``; keyword values are widget values or links."""
        node = Node(len(self.nodes) + 1, type_, col, values, title, dict(properties or {}), control)
        self.nodes.append(node)
        return node

    def note(self, col: int, text: str, title: str = "Note") -> Node:
        """A Note node (front-end only; never sent to the server)."""
        return self.add("Note", col, title=title, text=text)

    # ----------------------------------------------------------------- serialisation
    def to_ui(self, defs: dict[str, dict[str, Any]], name: str) -> dict[str, Any]:
        """The workflow in the UI (LiteGraph, version 0.4) format."""
        links: list[list[Any]] = []
        ui_nodes = {n.id: self._ui_node(n, defs, links) for n in self.nodes}
        for link_id, origin, slot, _target, _tslot, _type in links:
            ui_nodes[origin]["outputs"][slot]["links"].append(link_id)
        for ui in ui_nodes.values():
            for output in ui["outputs"]:
                output["links"] = output["links"] or None
        self._layout(ui_nodes)
        for order, node_id in enumerate(self._topological()):
            ui_nodes[node_id]["order"] = order
        return {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"concept_attention/{name}")),
                "revision": 0, "last_node_id": len(self.nodes), "last_link_id": len(links),
                "nodes": list(ui_nodes.values()), "links": links, "groups": [], "config": {},
                "extra": {"ds": {"scale": 0.75, "offset": [40, 40]}}, "version": 0.4}

    def _ui_node(self, node: Node, defs: dict[str, dict[str, Any]],
                 links: list[list[Any]]) -> dict[str, Any]:
        if node.type == "Note":
            text = node.values["text"]
            ui = self._base(node, [], [], [text], {})
            ui.update(color=NOTE_COLOR, bgcolor=NOTE_BGCOLOR)
            ui["size"] = [360, 60 + 18 * (text.count("\n") + len(text) // 48)]
            return ui
        info = defs[node.type]
        unknown = set(node.values) - {name for name, _s, _o in ordered_inputs(info)}
        if unknown:
            raise ValueError(f"{node.type} has no inputs {sorted(unknown)}")
        inputs, widgets, multiline, upload = [], [], 0, False
        for name, spec, optional in ordered_inputs(info):
            value = node.values.get(name)
            kind = "COMBO" if isinstance(spec[0], list) else spec[0]
            if not is_widget(spec) or isinstance(value, Link):
                entry: dict[str, Any] = {"name": name, "type": kind, "link": None}
                if optional:
                    entry["shape"] = 7
                if is_widget(spec):
                    entry["widget"] = {"name": name}
                if isinstance(value, Link):
                    entry["link"] = len(links) + 1
                    links.append([entry["link"], value.node_id, value.slot, node.id, len(inputs),
                                  self._output_type(defs, value)])
                elif not optional:
                    raise ValueError(f"{node.type}.{name} needs a link")
                inputs.append(entry)
            if is_widget(spec):
                widgets.append(default_value(spec) if value is None or isinstance(value, Link)
                               else value)
                if has_control_widget(name, spec):
                    widgets.append(node.control)
                multiline += bool(len(spec) > 1 and isinstance(spec[1], dict)
                                  and spec[1].get("multiline"))
                upload |= bool(len(spec) > 1 and isinstance(spec[1], dict)
                               and spec[1].get("image_upload"))
        if upload:
            widgets.append("image")
        outputs = [{"name": out_name, "type": out_type, "slot_index": i, "links": []}
                   for i, (out_type, out_name) in enumerate(zip(info["output"], info["output_name"]))]
        ui = self._base(node, inputs, outputs, widgets, {"Node name for S&R": node.type})
        ui["size"] = [360 if multiline else 320,
                      node_height(max(len(inputs), len(outputs)), len(widgets), multiline)
                      + (IMAGE_PREVIEW_HEIGHT if upload else 0)]
        return ui

    def _output_type(self, defs: dict[str, dict[str, Any]], link: Link) -> str:
        """The type of the output a link starts from."""
        return defs[self.nodes[link.node_id - 1].type]["output"][link.slot]

    def _base(self, node: Node, inputs: list, outputs: list, widgets: list,
              properties: dict[str, Any]) -> dict[str, Any]:
        ui: dict[str, Any] = {"id": node.id, "type": node.type, "pos": [0, 0], "size": [320, 100],
                              "flags": {}, "order": 0, "mode": 0, "inputs": inputs,
                              "outputs": outputs, "properties": {**properties, **node.properties},
                              "widgets_values": widgets}
        if node.title:
            ui["title"] = node.title
        return ui

    def _layout(self, ui_nodes: dict[int, dict[str, Any]]) -> None:
        """Stack each column's nodes top to bottom, in the order they were added."""
        heights: dict[int, int] = {}
        for node in self.nodes:
            y = heights.get(node.col, 0)
            ui_nodes[node.id]["pos"] = [node.col * COLUMN_WIDTH, y]
            heights[node.col] = y + ui_nodes[node.id]["size"][1] + ROW_GAP

    def _topological(self) -> list[int]:
        """Node ids, each after every node it takes a link from (the front end's 'order')."""
        done: list[int] = []

        def visit(node: Node) -> None:
            if node.id in done:
                return
            for value in node.values.values():
                if isinstance(value, Link):
                    visit(self.nodes[value.node_id - 1])
            done.append(node.id)

        for node in self.nodes:
            visit(node)
        return done
