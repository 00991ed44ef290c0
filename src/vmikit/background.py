"""A helper thread that lives for one ``with`` block: the watchdogs and progress pollers."""

from __future__ import annotations

import threading
from typing import Self


class Background:
    """Runs ``_loop`` on a daemon thread from ``__enter__`` until ``__exit__`` sets ``_done``
    (which ``_loop`` waits on) and joins it."""

    def __init__(self, name: str) -> None:
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def _loop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
