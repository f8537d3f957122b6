"""End-to-end fixtures: one real ComfyUI server (``main.py --cpu``) for the whole session.

The pack is installed as a symlinked folder in an extra ``custom_nodes`` dir (see
``dev/devkit/server.py``). When a test that used the server fails, the tail of the server log
is printed with the failure.
"""
from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest

from devkit.server import ComfyServer

LOG_TAIL_CHARS = 8000



@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComfyServer]:
    """The session's ComfyUI server; stopped by its PID at the end of the session."""
    server = ComfyServer(workdir=tmp_path_factory.mktemp("comfy_server"))
    try:
        server.start()
        print(f"\nComfyUI up on {server.url} in {server.startup_s:.1f}s (log: {server.log_path})",
              file=sys.stderr)
        yield server
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def _server_log_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    """After a failed test that used ``comfy_server``, print the server's log tail."""
    yield
    if "comfy_server" not in request.fixturenames:
        return
    report = getattr(request.node, "rep_call", None)
    if report is None or not report.failed:
        return
    server: ComfyServer = request.getfixturevalue("comfy_server")
    print(f"\n----- ComfyUI server log tail ({server.log_path}) -----\n"
          f"{server.log_tail(LOG_TAIL_CHARS)}\n----- end of server log -----")
