"""`vmikit bench`: what each VMI call costs, side by side, against native and a C baseline (docs/bench.md)."""

from vmikit.bench.runner import BenchConfig, run_bench

__all__ = ["BenchConfig", "run_bench"]
