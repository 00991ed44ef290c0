"""Interface evolution: every guest version under every hypervisor version (`vmikit compat`).

A "version" is a spec fixture (vmikit.abi.history): a guest of that version is built against
the vmi_spec.h it generates, a hypervisor of that version is a ROM + Hypervisor made from it.
"""
