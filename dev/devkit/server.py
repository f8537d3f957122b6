"""Run the REAL ComfyUI server (``main.py``) headless on CPU, with this pack installed, for e2e tests.

The pack is installed the way users install it: a folder in a ``custom_nodes`` directory. Here that
folder is a symlink to the repository root named ``comfyui-concept-attention``, inside a temporary
directory that a generated ``extra_model_paths.yaml`` names under ``custom_nodes:`` (ComfyUI has no
``--custom-node-dir``). The test-only pack ``concept_test_nodes`` (tiny random models) sits beside it.

Everything the server writes goes to a temporary tree; ``--base-directory`` points there too, so the
ComfyUI checkout's own ``models/`` and ``custom_nodes/`` are neither read nor written.

    server = ComfyServer().start()
    try:
        result = server.run(workflows.tiny_txt2img("sd15", "a cat", seed=1))
        assert result.ok, result.describe()
        images = server.output_images(result)
    finally:
        server.stop()

``COMFYUI_PATH`` selects another ComfyUI checkout (see ``comfy_env.comfy_root``).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
import websocket  # the websocket-client package

from .comfy_env import comfy_root
from .pack import REPO_ROOT

PACK_FOLDER_NAME = "comfyui-concept-attention"
TEST_PACK_DIR = Path(__file__).resolve().parent / "custom_nodes" / "concept_test_nodes"
MODEL_FOLDERS = ("concepts", "embeddings", "loras", "nested_adapters")
STARTUP_TIMEOUT_S = 180.0  # generous: a loaded 2-core machine imports ComfyUI slowly


class ComfyServerError(RuntimeError):
    """The server failed to start, rejected a prompt, or died; the message carries the details."""


class PromptRejected(ComfyServerError):
    """``/prompt`` answered 400: validation failed. ``body`` is the server's JSON (error, node_errors)."""

    def __init__(self, message: str, status_code: int, body: dict[str, Any]):
        super().__init__(message)
        self.status_code = status_code
        self.body = body

    @property
    def node_errors(self) -> dict[str, Any]:
        return self.body.get("node_errors") or {}


@dataclass
class PromptResult:
    """What happened to one queued prompt, as seen on the websocket (plus ``/history``)."""

    prompt_id: str
    status: str = "pending"  # "success" | "error" | "interrupted" | "pending"
    error_message: str | None = None
    error_type: str | None = None
    error_node_id: str | None = None
    error_node_type: str | None = None
    traceback: str | None = None
    progress: list[dict[str, Any]] = field(default_factory=list)  # "progress" events: value, max, node
    executed_nodes: list[str] = field(default_factory=list)  # "executing" node ids, in order
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # every json event seen
    history: dict[str, Any] | None = None
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "success"

    @property
    def done(self) -> bool:
        return self.status != "pending"

    def describe(self) -> str:
        """One readable paragraph, for assertion messages."""
        if self.ok:
            return f"prompt {self.prompt_id}: success in {self.elapsed_s:.2f}s"
        text = (f"prompt {self.prompt_id}: {self.status}"
                f" at node {self.error_node_id} ({self.error_node_type})")
        if self.error_message:
            text += f": {self.error_type}: {self.error_message}"
        if self.traceback:
            text += "\n" + self.traceback
        return text


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def format_node_errors(body: dict[str, Any]) -> str:
    """Turn a /prompt 400 body ({"error": {...}, "node_errors": {...}}) into readable lines."""
    lines = []
    error = body.get("error")
    if isinstance(error, dict):
        lines.append(f"{error.get('type')}: {error.get('message')} {error.get('details') or ''}".rstrip())
    elif error:
        lines.append(str(error))
    for node_id, info in (body.get("node_errors") or {}).items():
        for err in info.get("errors", []):
            lines.append(f"node {node_id} ({info.get('class_type')}): {err.get('type')}: "
                         f"{err.get('message')} {err.get('details') or ''}".rstrip())
    return "\n".join(lines) or json.dumps(body)


class ComfyServer:
    """One ComfyUI ``main.py`` process on 127.0.0.1 and a websocket client following it."""

    def __init__(self, workdir: str | os.PathLike[str] | None = None, port: int | None = None,
                 extra_args: list[str] | None = None, startup_timeout: float = STARTUP_TIMEOUT_S):
        self.comfy_root = comfy_root()
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="comfy-e2e-")).resolve()
        self.port = port
        self.extra_args = list(extra_args or [])
        self.startup_timeout = startup_timeout
        self.client_id = uuid.uuid4().hex

        self.base_dir = self.workdir / "base"  # --base-directory: default models/, custom_nodes/
        self.custom_nodes_dir = self.workdir / "custom_nodes"  # named in the yaml
        self.models_dir = self.workdir / "models"  # named in the yaml
        self.model_dirs = {name: self.models_dir / name for name in MODEL_FOLDERS}
        self.input_dir = self.workdir / "input"
        self.output_dir = self.workdir / "output"
        self.temp_root = self.workdir / "tmp"  # ComfyUI appends "temp" to --temp-directory
        self.user_dir = self.workdir / "user"
        self.yaml_path = self.workdir / "extra_model_paths.yaml"
        self.log_path = self.workdir / "server.log"

        self.process: subprocess.Popen[bytes] | None = None
        self.startup_s: float | None = None
        self._log_file = None
        self._ws: websocket.WebSocket | None = None
        self._results: dict[str, PromptResult] = {}

    # ------------------------------------------------------------------ paths
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def concepts_dir(self) -> Path:
        return self.model_dirs["concepts"]

    @property
    def embeddings_dir(self) -> Path:
        return self.model_dirs["embeddings"]

    @property
    def loras_dir(self) -> Path:
        return self.model_dirs["loras"]

    @property
    def temp_dir(self) -> Path:
        return self.temp_root / "temp"

    def _prepare_tree(self) -> None:
        for path in (self.base_dir / "custom_nodes", self.custom_nodes_dir, self.input_dir,
                     self.output_dir, self.temp_root, self.user_dir, *self.model_dirs.values()):
            path.mkdir(parents=True, exist_ok=True)
        for name, target in ((PACK_FOLDER_NAME, REPO_ROOT), (TEST_PACK_DIR.name, TEST_PACK_DIR)):
            link = self.custom_nodes_dir / name
            if not link.is_symlink():
                link.symlink_to(target, target_is_directory=True)
        entries = {"custom_nodes": self.custom_nodes_dir, **self.model_dirs}
        lines = ["concept_attention_tests:"]
        lines += [f"    {key}: {json.dumps(str(path))}" for key, path in entries.items()]
        self.yaml_path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def command(self) -> list[str]:
        return [
            sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
            "--base-directory", str(self.base_dir),
            "--extra-model-paths-config", str(self.yaml_path),
            "--output-directory", str(self.output_dir), "--input-directory", str(self.input_dir),
            "--temp-directory", str(self.temp_root), "--user-directory", str(self.user_dir),
            "--database-url", "sqlite:///:memory:", "--disable-auto-launch",
            *self.extra_args,
        ]

    # -------------------------------------------------------------- lifecycle
    def start(self) -> "ComfyServer":
        """Start ``main.py`` and block until it answers HTTP and the websocket is connected."""
        if self.process is not None:
            raise ComfyServerError("server already started")
        self._prepare_tree()
        attempts = 1 if self.port else 3  # a free port can be taken between probe and bind
        for attempt in range(attempts):
            if not self.port or attempt:
                self.port = free_port()
            try:
                self._spawn_and_wait()
                return self
            except ComfyServerError:
                in_use = "address already in use" in self.log_text().lower()
                self._kill_process()
                if not in_use or attempt == attempts - 1:
                    raise
        return self  # unreachable

    def _spawn_and_wait(self) -> None:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TRANSFORMERS_OFFLINE", "1")
        self._log_file = open(self.log_path, "ab")
        started = time.monotonic()
        self.process = subprocess.Popen(
            self.command(), cwd=self.comfy_root, env=env, stdin=subprocess.DEVNULL,
            stdout=self._log_file, stderr=subprocess.STDOUT)
        deadline = started + self.startup_timeout
        while True:
            code = self.process.poll()
            if code is not None:
                raise ComfyServerError(
                    f"ComfyUI exited with code {code} during start-up; log tail:\n{self.log_tail()}")
            try:
                if requests.get(f"{self.url}/system_stats", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise ComfyServerError(
                    f"ComfyUI did not answer on {self.url} within {self.startup_timeout:.0f}s; "
                    f"log tail:\n{self.log_tail()}")
            time.sleep(0.2)
        self._ws = websocket.create_connection(f"ws://127.0.0.1:{self.port}/ws?clientId={self.client_id}",
                                               timeout=10)
        self.startup_s = time.monotonic() - started

    def stop(self, timeout: float = 15.0) -> int | None:
        """Close the websocket and end the server process by its PID (SIGTERM, wait, SIGKILL)."""
        if self._ws is not None:
            try:
                self._ws.close()
            except Exception:  # noqa: BLE001 - closing a dead socket is fine
                pass
            self._ws = None
        code = self._kill_process(timeout)
        return code

    def _kill_process(self, timeout: float = 15.0) -> int | None:
        proc, self.process = self.process, None
        code = None
        if proc is not None:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(timeout)
            code = proc.returncode
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        return code

    def cleanup(self) -> None:
        """Stop, then delete the temporary tree if this object created it."""
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -------------------------------------------------------------------- log
    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, chars: int = 8000) -> str:
        return self.log_text()[-chars:]

    # ------------------------------------------------------------------- HTTP
    def _get(self, path: str) -> Any:
        response = requests.get(f"{self.url}{path}", timeout=30)
        response.raise_for_status()
        return response.json()

    def object_info(self, node_class: str | None = None) -> dict[str, Any]:
        return self._get(f"/object_info/{node_class}" if node_class else "/object_info")

    def system_stats(self) -> dict[str, Any]:
        return self._get("/system_stats")

    def history(self, prompt_id: str) -> dict[str, Any] | None:
        """The history entry of one prompt (outputs, status), or None if it has none yet."""
        return self._get(f"/history/{prompt_id}").get(prompt_id)

    def queue(self, prompt: dict[str, Any]) -> str:
        """POST /prompt; returns the prompt id. Raises PromptRejected (node_errors as text) on a 400."""
        if not self.is_running():
            raise ComfyServerError(f"server is not running; log tail:\n{self.log_tail()}")
        # Serialised here, NaN and infinity allowed: what any client may send (requests refuses them).
        body_text = json.dumps({"prompt": prompt, "client_id": self.client_id}, allow_nan=True)
        response = requests.post(f"{self.url}/prompt", data=body_text.encode("utf-8"), timeout=30,
                                 headers={"Content-Type": "application/json"})
        if response.status_code != 200:
            try:
                body = response.json()
            except ValueError:
                body = {"error": response.text}
            raise PromptRejected(f"/prompt rejected the prompt (HTTP {response.status_code}):\n"
                                 f"{format_node_errors(body)}", response.status_code, body)
        prompt_id = response.json()["prompt_id"]
        self._results.setdefault(prompt_id, PromptResult(prompt_id))
        return prompt_id

    def interrupt(self, prompt_id: str | None = None) -> None:
        body = {"prompt_id": prompt_id} if prompt_id else {}
        requests.post(f"{self.url}/interrupt", json=body, timeout=30).raise_for_status()

    # -------------------------------------------------------------- websocket
    def _dispatch(self, kind: str, data: dict[str, Any]) -> None:
        prompt_id = data.get("prompt_id") if isinstance(data, dict) else None
        if not prompt_id:
            return  # "status" and other queue-wide messages
        result = self._results.setdefault(prompt_id, PromptResult(prompt_id))
        result.events.append((kind, data))
        if kind == "progress":
            result.progress.append({"value": data.get("value"), "max": data.get("max"),
                                    "node": data.get("node")})
        elif kind == "executing":
            if data.get("node") is None:
                if result.status == "pending":
                    result.status = "success"
            else:
                result.executed_nodes.append(str(data["node"]))
        elif kind == "execution_success":
            result.status = "success"
        elif kind in ("execution_error", "execution_interrupted"):
            result.status = "error" if kind == "execution_error" else "interrupted"
            result.error_node_id = data.get("node_id")
            result.error_node_type = data.get("node_type")
            result.error_message = data.get("exception_message", kind)
            result.error_type = data.get("exception_type")
            tb = data.get("traceback")
            result.traceback = "".join(tb) if isinstance(tb, list) else tb

    def _finished(self, prompt_id: str) -> bool:
        result = self._results[prompt_id]
        return any(kind == "executing" and data.get("node") is None for kind, data in result.events)

    def _receive_one(self, prompt_id: str) -> None:
        """Read and dispatch one websocket message (or return after a 1 s lull)."""
        if self._ws is None:
            raise ComfyServerError("not connected; call start() first")
        self._ws.settimeout(1.0)
        try:
            message = self._ws.recv()
        except websocket.WebSocketTimeoutException:
            if not self.is_running():
                raise ComfyServerError(f"ComfyUI died while running {prompt_id}; "
                                       f"log tail:\n{self.log_tail()}") from None
            return
        except (websocket.WebSocketException, OSError) as exc:
            raise ComfyServerError(f"websocket failed ({exc!r}) while running {prompt_id}; "
                                   f"log tail:\n{self.log_tail()}") from exc
        if isinstance(message, bytes):
            return  # binary preview images
        payload = json.loads(message)
        self._dispatch(payload.get("type", ""), payload.get("data") or {})

    def wait(self, prompt_id: str, timeout: float = 120.0) -> PromptResult:
        """Follow the websocket until the prompt ends (``executing`` with node None)."""
        result = self._results.setdefault(prompt_id, PromptResult(prompt_id))
        started = time.monotonic()
        deadline = started + timeout
        while not self._finished(prompt_id):
            if time.monotonic() > deadline:
                raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f}s; "
                                   f"log tail:\n{self.log_tail()}")
            self._receive_one(prompt_id)
        result.elapsed_s = time.monotonic() - started
        return result

    def wait_for_progress(self, prompt_id: str, min_value: int = 1, timeout: float = 120.0) -> None:
        """Follow the websocket until the prompt reports progress >= ``min_value`` (to act mid-run)."""
        result = self._results.setdefault(prompt_id, PromptResult(prompt_id))
        deadline = time.monotonic() + timeout
        while not any((p["value"] or 0) >= min_value for p in result.progress):
            if self._finished(prompt_id):
                raise ComfyServerError(f"prompt {prompt_id} ended before progress {min_value}: "
                                       f"{result.describe()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"prompt {prompt_id} reported no progress {min_value} within "
                                   f"{timeout:.0f}s; log tail:\n{self.log_tail()}")
            self._receive_one(prompt_id)

    def run(self, prompt: dict[str, Any], timeout: float = 120.0) -> PromptResult:
        """Queue a prompt, wait for it, attach its /history entry."""
        started = time.monotonic()
        prompt_id = self.queue(prompt)
        result = self.wait(prompt_id, timeout)
        result.history = self.history(prompt_id)
        result.elapsed_s = time.monotonic() - started
        return result

    def output_images(self, result: PromptResult) -> list[Path]:
        """Files that the prompt's output nodes saved (SaveImage → output dir, PreviewImage → temp)."""
        history = result.history if result.history is not None else self.history(result.prompt_id)
        roots = {"output": self.output_dir, "temp": self.temp_dir, "input": self.input_dir}
        paths = []
        for node_output in (history or {}).get("outputs", {}).values():
            for image in node_output.get("images", []):
                root = roots.get(image.get("type", "output"), self.output_dir)
                paths.append(root / image.get("subfolder", "") / image["filename"])
        return paths
