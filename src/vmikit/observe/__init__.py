"""Seeing inside a run: a trace-event timeline (trace.py, summary.py, plot.py) and a gdb stub (gdbstub.py)."""
