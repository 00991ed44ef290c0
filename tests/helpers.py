"""Helpers for tests: requirement checks and the CLI in a child process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

REQUIRE_ALL = os.environ.get("VMIKIT_REQUIRE_ALL") == "1"


def require(condition: bool, reason: str) -> None:
    """Skip with a reason, except in CI (VMIKIT_REQUIRE_ALL=1, set by .ci/run), where it fails."""
    if condition:
        return
    if REQUIRE_ALL:
        pytest.fail(f"required in CI but missing: {reason}")
    pytest.skip(reason)


def vmikit(*args: str, timeout: float = 120, **kw: object) -> subprocess.CompletedProcess[str]:
    """Run the real CLI in a child process (exit statuses and output as a user sees them)."""
    return subprocess.run([sys.executable, "-m", "vmikit", *args], capture_output=True, text=True,
                          timeout=timeout, **kw)  # type: ignore[call-overload]
