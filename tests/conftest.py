"""Shared pytest set-up: the pack alias and ComfyUI in library mode (``dev/devkit``)."""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from devkit.comfy_env import start

start("cpu")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """Keep each phase's report on the item (``item.rep_setup``, ``rep_call``, ``rep_teardown``)
    for the fixtures that print a server's log when a test failed."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
