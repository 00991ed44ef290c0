"""Handler tables: each family module registers its handlers by spec name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from vmikit.hypervisor.context import CallContext

# A handler takes the context and the three argument registers and returns its result
# values (a tuple, possibly empty), or raises HypercallError.
Handler = Callable[[CallContext, int, int, int], tuple[int, ...]]


@dataclass
class FamilyHandlers:
    family: str
    handlers: dict[str, Handler] = field(default_factory=dict)

    def call(self, name: str) -> Callable[[Handler], Handler]:
        def register(fn: Handler) -> Handler:
            if name in self.handlers:
                raise ValueError(f"{self.family}.{name} registered twice")
            self.handlers[name] = fn
            return fn

        return register
