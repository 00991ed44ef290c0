"""Run the public kvm-unit-tests x86 suite under QEMU-KVM and under vmikit, and compare."""
