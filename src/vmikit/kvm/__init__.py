"""Typed binding to Linux's /dev/kvm: structures, ioctl numbers, system/VM/vCPU handles.

Nothing above ``vmikit.engine`` imports this package directly.
"""
