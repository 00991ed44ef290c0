"""The VMI interface definition: the spec file and everything derived from it."""

from vmikit.abi.callid import CallId
from vmikit.abi.spec import load_spec, spec_path

__all__ = ["CallId", "load_spec", "spec_path"]
