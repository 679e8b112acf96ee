/*
 * bare_iopl -- KVMDM_STANDALONE: built without the test-guest runtime (no TSS, no IDT of its own).
 *
 * The shape of a hobby kernel that QEMU runs and kvmdm once triple-faulted on (issue 9, finding 2): a 32-bit
 * multiboot entry that builds its own GDT and page tables, enters long mode, iretq's to CPL3 with
 * RFLAGS.IOPL=3 and does port I/O from there. It never loads TR, so port I/O at CPL3 depends on the TR
 * the loader left: architecturally IOPL=3 alone makes it legal (SDM Vol. 1 19.5.1), but kvm_pvm emulates the
 * faulting IN/OUT and raises #GP when port / 8 exceeds the TR limit, so a 104-byte TR (limit 0x67) faults
 * ports >= 0x340 (#GP, no IDT: triple fault) where the reset-state TR QEMU's guests get (limit 0xFFFF) passes.
 *
 * It touches ports across the range: COM1 (0x3F8), PCI config (0xCF8/0xCFC, reads the host bridge's
 * vendor/device id), the pc-testdev port (0xE0), an unclaimed port (0x80), then exits through isa-debug-exit
 * (0x501) with code 0 after printing what it saw.
 */

.equ COM1,        0x3F8
.equ DEBUG_EXIT,  0x501

.section .multiboot, "a"
.align 4
.long 0x1BADB002
.long 0x00000003
.long -(0x1BADB002 + 0x00000003)

.text
.code32
.globl _start
_start:
    cli
    lgdt gdt_pointer
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movl $kstack_top, %esp
    /* PML4[0] -> PDPT, PDPT[0] -> PD, PD[0..511]: 1 GiB of user-accessible 2 MiB pages. */
    movl $(pdpt + 7), pml4
    movl $(pd + 7), pdpt
    xorl %ecx, %ecx
1:  movl %ecx, %eax
    shll $21, %eax
    orl $0x87, %eax                 /* present, writable, user, 2 MiB */
    movl %eax, pd(, %ecx, 8)
    incl %ecx
    cmpl $512, %ecx
    jb 1b
    movl $pml4, %eax
    movl %eax, %cr3
    movl %cr4, %eax
    orl $0x20, %eax                 /* PAE */
    movl %eax, %cr4
    movl $0xC0000080, %ecx          /* EFER.LME */
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl %cr0, %eax
    orl $0x80000001, %eax           /* PG | PE */
    movl %eax, %cr0
    ljmp $0x08, $long_mode

.code64
long_mode:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %ss
    movl $(0x18 | 3), %eax          /* SS: user data */
    pushq %rax
    movl $ustack_top, %eax
    pushq %rax
    pushq $0x3002                   /* RFLAGS: IOPL=3, IF=0 */
    movl $(0x20 | 3), %eax          /* CS: user code */
    pushq %rax
    movl $user_main, %eax
    pushq %rax
    iretq

/* ---------------------------------------------------------------------------------------- CPL3 from here */
user_main:
    leaq msg_hello(%rip), %rsi
    call puts
    movw %cs, %ax
    andl $3, %eax
    addb $'0', %al
    call putc
    movb $'\n', %al
    call putc

    /* PCI config mechanism #1: bus 0, device 0, function 0, register 0 -> vendor | device << 16. */
    movl $0x80000000, %eax
    movw $0xCF8, %dx
    outl %eax, %dx
    movw $0xCFC, %dx
    inl %dx, %eax
    movl %eax, %ebx
    leaq msg_pci(%rip), %rsi
    call puts
    movl %ebx, %eax
    call puthex32
    movb $'\n', %al
    call putc

    /* An unclaimed port, then pc-testdev's port (0xE0 reads back what was written). */
    movb $0x55, %al
    outb %al, $0x80
    movl $0x12345678, %eax
    outl %eax, $0xE0
    xorl %eax, %eax
    inl $0xE0, %eax
    movl %eax, %ebx
    leaq msg_testdev(%rip), %rsi
    call puts
    movl %ebx, %eax
    call puthex32
    movb $'\n', %al
    call putc

    leaq msg_done(%rip), %rsi
    call puts
    movw $DEBUG_EXIT, %dx
    xorl %eax, %eax
    outb %al, %dx
2:  jmp 2b

/* putc: AL -> COM1, waiting for THR empty (LSR bit 5). Clobbers DX, CL. */
putc:
    movb %al, %cl
    movw $(COM1 + 5), %dx
3:  inb %dx, %al
    testb $0x20, %al
    jz 3b
    movw $COM1, %dx
    movb %cl, %al
    outb %al, %dx
    ret

/* puts: NUL-terminated string at RSI. */
puts:
    lodsb
    testb %al, %al
    jz 4f
    call putc
    jmp puts
4:  ret

/* puthex32: EAX as 8 hex digits. */
puthex32:
    movl %eax, %r8d
    movl $8, %r9d
5:  roll $4, %r8d
    movl %r8d, %eax
    andl $0xF, %eax
    leaq hexdigits(%rip), %rsi
    movb (%rsi, %rax), %al
    call putc
    decl %r9d
    jnz 5b
    ret

.section .rodata
hexdigits:   .ascii "0123456789abcdef"
msg_hello:   .asciz "bare_iopl: running at CPL "
msg_pci:     .asciz "bare_iopl: pci 00:00.0 id "
msg_testdev: .asciz "bare_iopl: testdev 0xe0 "
msg_done:    .asciz "bare_iopl: done\n"

.data
.align 8
gdt:
    .quad 0
    .quad 0x00AF9A000000FFFF        /* 0x08 kernel code, 64-bit */
    .quad 0x00CF92000000FFFF        /* 0x10 kernel data */
    .quad 0x00CFF2000000FFFF        /* 0x18 user data (DPL3) */
    .quad 0x00AFFA000000FFFF        /* 0x20 user code, 64-bit (DPL3) */
gdt_end:
gdt_pointer:
    .word gdt_end - gdt - 1
    .long gdt

.bss
.align 4096
pml4: .skip 4096
pdpt: .skip 4096
pd:   .skip 4096
      .skip 4096
kstack_top:
      .skip 4096
ustack_top:
