"""Fuzzing the hypercall surface: a hostile guest (guests/fuzz.c) under a watching host.

    from vmikit.fuzz import FuzzConfig, run_fuzz

    report = run_fuzz(FuzzConfig(calls=20000, seed=7))
    assert report.ok, report.failures

``vmikit fuzz`` is the command-line face of the same thing (vmikit/fuzz/cli.py).
"""

from vmikit.fuzz.runner import FuzzConfig, FuzzReport, Offence, run_fuzz

__all__ = ["FuzzConfig", "FuzzReport", "Offence", "run_fuzz"]
