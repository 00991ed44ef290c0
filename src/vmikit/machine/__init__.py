"""The x86 board: layout, multiboot loader, ports, the vCPU loop."""
