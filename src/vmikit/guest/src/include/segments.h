/*
 * The runtime's flat GDT, shared by boot.S (the BSP) and ap_boot.S (the APs): its selectors, its
 * descriptors and the reload of every data segment register from it. Assembly only.
 */
#ifndef VMIKIT_SEGMENTS_H
#define VMIKIT_SEGMENTS_H

#define SEL_CODE64  0x08
#define SEL_DATA    0x10

#define DESC_CODE64 0x00AF9A000000FFFF /* 64-bit code, DPL 0 (L=1, D=0) */
#define DESC_DATA   0x00CF92000000FFFF /* flat 4 GiB data, read/write */

/* DS, ES, SS, FS and GS from SEL_DATA (clobbers %ax); the same bytes in 32- and 64-bit code. */
.macro load_data_segments
	movw $SEL_DATA, %ax
	movw %ax, %ds
	movw %ax, %es
	movw %ax, %ss
	movw %ax, %fs
	movw %ax, %gs
.endm

#endif
