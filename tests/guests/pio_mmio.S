/*
 * pio_mmio -- port-I/O and MMIO round trips through QEMU's pc-testdev (hw/misc/pc-testdev.c):
 *   - port 0xe0..0xe3: one 4-byte little-endian register; an access of n bytes at 0xe0 + k reads or
 *     replaces bytes k..k+n-1 of it;
 *   - 0xff000000..0xff00ffff: 64 KiB of scratch memory, zero at reset, accessed like RAM (8-byte accesses
 *     included);
 * and reads of an unclaimed port (0x2f8, no COM2 on the platform), which must return all-ones.
 * One line per check ("PASS <name>" / "FAIL <name> got=<hex> want=<hex>"), then a summary; exit code 0
 * if every check passed, else 1.
 */

.include "rt.inc"

.equ UNCLAIMED_PORT, 0x2f8

.text
.code64
.globl guest_main
guest_main:
    pushq %rbx

    /* ---- port I/O on the 4-byte register ---- */
    movw $TESTDEV_PORT, %dx
    movl $0x12345678, %eax
    outl %eax, %dx
    inl %dx, %eax
    CHECK "pio-dword", 0x12345678

    movw $TESTDEV_PORT, %dx
    xorl %eax, %eax
    inb %dx, %al
    CHECK "pio-byte-0", 0x78
    movw $(TESTDEV_PORT + 3), %dx
    xorl %eax, %eax
    inb %dx, %al
    CHECK "pio-byte-3", 0x12
    movw $TESTDEV_PORT, %dx
    xorl %eax, %eax
    inw %dx, %ax
    CHECK "pio-word-0", 0x5678
    movw $(TESTDEV_PORT + 2), %dx
    xorl %eax, %eax
    inw %dx, %ax
    CHECK "pio-word-2", 0x1234

    movw $(TESTDEV_PORT + 1), %dx
    movb $0xab, %al
    outb %al, %dx
    movw $TESTDEV_PORT, %dx
    inl %dx, %eax
    CHECK "pio-byte-write-1", 0x1234ab78
    movw $(TESTDEV_PORT + 2), %dx
    movw $0xcdef, %ax
    outw %ax, %dx
    movw $TESTDEV_PORT, %dx
    inl %dx, %eax
    CHECK "pio-word-write-2", 0xcdefab78
    movw $TESTDEV_PORT, %dx
    xorl %eax, %eax
    outl %eax, %dx
    inl %dx, %eax
    CHECK "pio-dword-zero", 0

    /* ---- unclaimed port: reads float high ---- */
    movw $UNCLAIMED_PORT, %dx
    xorl %eax, %eax
    inb %dx, %al
    CHECK "pio-unclaimed-byte", 0xff
    movw $UNCLAIMED_PORT, %dx
    xorl %eax, %eax
    inw %dx, %ax
    CHECK "pio-unclaimed-word", 0xffff
    movw $UNCLAIMED_PORT, %dx
    inl %dx, %eax
    CHECK "pio-unclaimed-dword", 0xffffffff

    /* ---- MMIO scratch window ---- */
    movl $TESTDEV_MMIO, %ebx
    movq 0x100(%rbx), %rax
    CHECK "mmio-initially-zero", 0

    movb $0x5a, (%rbx)
    movzbl (%rbx), %eax
    CHECK "mmio-byte", 0x5a
    movw $0xbeef, 0x10(%rbx)
    movzwl 0x10(%rbx), %eax
    CHECK "mmio-word", 0xbeef
    movl $0xdeadbeef, 0x20(%rbx)
    movl 0x20(%rbx), %eax
    CHECK "mmio-dword", 0xdeadbeef
    movabsq $0x0123456789abcdef, %rax
    movq %rax, 0x30(%rbx)
    movq 0x30(%rbx), %rax
    CHECK "mmio-qword", 0x0123456789abcdef

    /* narrower reads of the qword, and a byte written into the dword */
    movzbl 0x37(%rbx), %eax
    CHECK "mmio-qword-byte-7", 0x01
    movzwl 0x32(%rbx), %eax
    CHECK "mmio-qword-word-2", 0x89ab
    movl 0x34(%rbx), %eax
    CHECK "mmio-qword-dword-4", 0x01234567
    movb $0x11, 0x21(%rbx)
    movl 0x20(%rbx), %eax
    CHECK "mmio-byte-into-dword", 0xdead11ef

    /* the middle and the very end of the window */
    movl $0xcafef00d, 0x8000(%rbx)
    movl 0x8000(%rbx), %eax
    CHECK "mmio-dword-0x8000", 0xcafef00d
    movabsq $0x8877665544332211, %rax
    movq %rax, (TESTDEV_MMIO_SIZE - 8)(%rbx)
    movq (TESTDEV_MMIO_SIZE - 8)(%rbx), %rax
    CHECK "mmio-qword-last", 0x8877665544332211
    movl (TESTDEV_MMIO_SIZE - 4)(%rbx), %eax
    CHECK "mmio-dword-last", 0x88776655
    movzwl (TESTDEV_MMIO_SIZE - 2)(%rbx), %eax
    CHECK "mmio-word-last", 0x8877
    movzbl (TESTDEV_MMIO_SIZE - 1)(%rbx), %eax
    CHECK "mmio-byte-last", 0x88
    movb $0x99, (TESTDEV_MMIO_SIZE - 1)(%rbx)
    movq (TESTDEV_MMIO_SIZE - 8)(%rbx), %rax
    CHECK "mmio-byte-last-write", 0x9977665544332211

    /* writes elsewhere left an untouched location alone */
    movq 0x100(%rbx), %rax
    CHECK "mmio-untouched-still-zero", 0

    PUTS "pio_mmio: "
    movq rt_check_failures(%rip), %rdi
    call rt_putdec
    PUTS " failed\n"
    xorl %eax, %eax
    cmpq $0, rt_check_failures(%rip)
    setne %al                               /* EXIT_OK or EXIT_FAIL */
    popq %rbx
    ret
