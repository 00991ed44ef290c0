"""Shared fixtures. A test that needs something absent skips with a reason, except in CI."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from helpers import require


@pytest.fixture(scope="session")
def kvm() -> str:
    require(os.access("/dev/kvm", os.R_OK | os.W_OK),
            "/dev/kvm is missing or not accessible (KVM tests need hardware virtualization)")
    return "/dev/kvm"


@pytest.fixture(scope="session")
def qemu() -> str:
    path = shutil.which("qemu-system-x86_64")
    require(path is not None, "qemu-system-x86_64 not installed (apt-get install qemu-system-x86)")
    assert path is not None
    return path


@pytest.fixture(scope="session", autouse=True)
def guest_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private guest cache for the session, so tests build exactly what is in this tree."""
    path = tmp_path_factory.mktemp("guest-cache")
    os.environ["VMIKIT_CACHE_DIR"] = str(path)
    return path
