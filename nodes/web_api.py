"""The pack's server side for its front-end extension (``web/js/concept_attention.js``).

* ``GET /concept_attention/concepts``: every concept file in ``models/concepts`` with its triggers,
  class phrases and architecture, read from the file header only (a damaged file is listed with
  an ``error``). ``GET /concept_attention/concept?name=...`` answers for one file; only names that
  ``folder_paths.get_filename_list("concepts")`` returns are accepted, so nothing outside the
  models folders can be named or read.
* ``concept_attention.training`` messages: a small, throttled live view of a Train Concepts run
  (losses so far, step, current attention maps as small PNG data URLs), sent to the client that
  queued the prompt.

Everything here is read-only and a no-op without a running ``PromptServer`` (library mode).
"""
from __future__ import annotations

import base64
import io as _bytes_io
import logging
import math
from typing import Any

import torch

from ..attention.visualize import colorize, upscale_maps
from .vocabulary import CONCEPTS_FOLDER, prompt_server

log = logging.getLogger(__name__)

ROUTE_PREFIX = "/concept_attention"
TRAINING_EVENT = "concept_attention.training"
MAX_LIVE_MESSAGES = 50  # a run sends at most about this many progress messages
MAX_LOSS_POINTS = 400  # loss history is thinned to at most this many points per message
MAX_MAP_SIDE = 32  # live maps are shrunk to at most this many pixels a side

_registered = False


# ----- concept file listing ----------------------------------------------------------------------
def _describe_architecture(architecture: dict[str, Any]) -> str:
    """A short label of a concept file's architecture, e.g. 'SD15 (16 K/V layers)'."""
    model = str(architecture.get("model") or "unknown")
    layers = architecture.get("kv_layers")
    return f"{model} ({layers} K/V layers)" if layers else model


def concept_file_entry(name: str) -> dict[str, Any]:
    """What the front end needs to know about one listed concept file (never raises)."""
    from ..concepts.concept_file import concept_file_info
    from .common import listed_model_path

    entry: dict[str, Any] = {"name": name}
    try:
        info = concept_file_info(listed_model_path(CONCEPTS_FOLDER, name, "concept file"))
        metadata = info.get("metadata") or {}
        entry.update({
            "triggers": list(info["triggers"]),
            "classes": [c.get("class_phrase", "") for c in info["concepts"]],
            "concepts": [{"trigger": c.get("trigger", ""), "class_phrase": c.get("class_phrase", "")}
                         for c in info["concepts"]],
            "architecture": _describe_architecture(info.get("architecture") or {}),
            "format_version": info.get("format_version"),
            "complete": metadata.get("complete"),
            "steps_done": metadata.get("steps_done"),
        })
    except Exception as exc:  # noqa: BLE001 - a corrupt file must not break the listing
        entry.update({"triggers": [], "classes": [], "concepts": [], "error": str(exc)})
    return entry


def list_concept_files() -> list[dict[str, Any]]:
    """Every file of the concepts folders, sorted by name, each as ``concept_file_entry``."""
    import folder_paths

    return [concept_file_entry(name) for name in sorted(folder_paths.get_filename_list(CONCEPTS_FOLDER))]


def known_concept_name(name: str) -> bool:
    """Whether ``name`` is exactly one of the listed concept files (the only names ever opened)."""
    import folder_paths

    return isinstance(name, str) and name in folder_paths.get_filename_list(CONCEPTS_FOLDER)


def register_routes() -> bool:
    """Add the read-only routes to the running PromptServer (once); False when there is none."""
    global _registered
    if _registered:
        return True
    server = prompt_server()
    if server is None:
        return False
    from aiohttp import web

    async def concepts_route(request: web.Request) -> web.Response:
        return web.json_response({"concepts": list_concept_files()})

    async def concept_route(request: web.Request) -> web.Response:
        name = request.query.get("name", "")
        if not known_concept_name(name):
            return web.json_response({"error": "unknown concept file: use a name listed by "
                                               f"{ROUTE_PREFIX}/concepts"}, status=404)
        return web.json_response(concept_file_entry(name))

    try:
        server.routes.get(f"{ROUTE_PREFIX}/concepts")(concepts_route)
        server.routes.get(f"{ROUTE_PREFIX}/concept")(concept_route)
    except Exception:  # noqa: BLE001 - the nodes must load even if the routes cannot
        log.warning("concept_attention: could not register the front end's routes", exc_info=True)
        return False
    _registered = True
    log.debug("concept_attention routes registered under %s", ROUTE_PREFIX)
    return True


# ----- live training messages --------------------------------------------------------------------
def live_interval(total_steps: int) -> int:
    """Send a live update every this many steps (about MAX_LIVE_MESSAGES per run)."""
    return max(1, math.ceil(total_steps / MAX_LIVE_MESSAGES))


def should_send(step: int, total_steps: int) -> bool:
    """Whether step ``step`` (1-based) of ``total_steps`` gets a live update."""
    return step == 1 or step >= total_steps or step % live_interval(total_steps) == 0


def _thin(count: int, limit: int) -> list[int]:
    """At most ``limit`` evenly spread indices of ``range(count)``, always keeping the last."""
    if count <= limit:
        return list(range(count))
    stride = count / limit
    picked = sorted({min(count - 1, int(i * stride)) for i in range(limit)} | {count - 1})
    return picked


def loss_series(history: list[dict[str, float]], limit: int = MAX_LOSS_POINTS) -> dict[str, list[float]]:
    """Loss history as ``{"step": [...], "loss": [...], <term>: [...]}``, thinned to ``limit`` points."""
    keep = _thin(len(history), limit)
    names = sorted({k for row in history for k in row if k != "step"}, key=lambda k: (k != "loss", k))
    series: dict[str, list[float]] = {"step": [int(history[i].get("step", i + 1)) for i in keep]}
    for name in names:
        values = [history[i].get(name) for i in keep]
        series[name] = [round(float(v), 6) if v is not None and math.isfinite(v) else None
                        for v in values]
    return series


def maps_data_urls(maps: torch.Tensor | None, max_side: int = MAX_MAP_SIDE) -> list[str]:
    """``[N, h, w]`` attention maps as small colourised PNG data URLs (empty without maps)."""
    if maps is None or maps.ndim != 3 or maps.shape[0] == 0:
        return []
    from PIL import Image

    maps = maps.detach().float().cpu()
    height, width = maps.shape[1:]
    scale = min(1.0, max_side / max(height, width))
    if scale < 1.0:
        maps = upscale_maps(maps, max(1, round(height * scale)), max(1, round(width * scale)))
    pixels = (colorize(maps) * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    urls = []
    for picture in pixels:
        buffer = _bytes_io.BytesIO()
        Image.fromarray(picture).save(buffer, format="PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"))
    return urls


def training_payload(node_id: str, step: int, total: int, history: list[dict[str, float]],
                     maps: torch.Tensor | None, labels: list[str]) -> dict[str, Any]:
    """The JSON body of one ``concept_attention.training`` message."""
    return {"node": str(node_id), "step": int(step), "total": int(total),
            "losses": loss_series(history), "maps": maps_data_urls(maps), "labels": list(labels)}


def send_training_update(payload: dict[str, Any]) -> bool:
    """Send ``payload`` to the client that queued the running prompt; False when headless."""
    server = prompt_server()
    if server is None:
        return False
    server.send_sync(TRAINING_EVENT, payload, getattr(server, "client_id", None))
    return True


class LiveTraining:
    """Collects a Train Concepts run's progress and sends throttled live updates to the page."""

    def __init__(self, node_id: str | None, labels: list[str]):
        self.node_id = node_id
        self.labels = list(labels)
        self.history: list[dict[str, float]] = []
        self.sent = 0

    def update(self, step: int, total: int, losses: dict[str, float],
               maps: torch.Tensor | None = None) -> None:
        """Record one step; every few steps send the losses so far and the current maps."""
        if self.node_id is None:
            return
        self.history.append({**losses, "step": step})
        if not should_send(step, total):
            return
        try:
            payload = training_payload(self.node_id, step, total, self.history, maps, self.labels)
            if send_training_update(payload):
                self.sent += 1
        except Exception:  # noqa: BLE001 - a display problem must never stop training
            log.warning("could not send the live training view", exc_info=True)
