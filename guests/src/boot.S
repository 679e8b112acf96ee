/*
 * boot.S -- the CPL0 part of the kvmdm test-guest runtime.
 *
 * Loaded by a Multiboot v1 loader (Multiboot spec 0.6.96, section 3.1: header; 3.2: machine state) from
 * the ELF program headers. It switches to long mode with the first 4 GiB identity-mapped by 2 MiB pages
 * that are user-accessible, installs a GDT with a TSS and an IDT, and drops to CPL3 with IOPL=3 and IF=0
 * in rt_user_entry (rt.S), which calls the guest's `guest_main`.
 *
 * Why so little runs at CPL0: on the project's KVM hosts (kvm_pvm) CPL0 code runs in KVM's instruction
 * emulator at a few million instructions per second while CPL3 code runs natively. The emulator lacks
 * some instructions, so this file uses only plain integer instructions (no int3, xsave, cmpxchg16b, SSE).
 */

.include "rt.inc"

.equ MB_HEADER_MAGIC,   0x1BADB002
.equ MB_FLAGS,          0x00000003  /* bit 0: page-align modules, bit 1: memory info; bit 16 clear: use ELF */
.equ MB_BOOT_MAGIC,     0x2BADB002

.equ SEL_KCODE,         0x08
.equ SEL_KDATA,         0x10
.equ SEL_UDATA,         0x18
.equ SEL_UCODE,         0x20
.equ SEL_TSS,           0x28
.equ USER_RFLAGS,       0x3002      /* IOPL=3 (bits 12-13), reserved bit 1; IF clear */

.equ PTE_P,             0x001
.equ PTE_RW,            0x002
.equ PTE_US,            0x004
.equ PTE_PCD,           0x010
.equ PTE_PS,            0x080
.equ UNCACHED_FROM_PDE, 1536        /* PD index of 0xC000_0000: the MMIO hole is mapped uncached */

.equ CR0_PE,            0x00000001
.equ CR0_PG,            0x80000000
.equ CR4_PAE,           0x00000020
.equ MSR_EFER,          0xC0000080
.equ EFER_LME,          0x00000100

.equ TSS_RSP0,          4
.equ TSS_IOMAP_BASE,    102
.equ TSS_IOPB_OFFSET,   104         /* the bitmap follows the 104-byte TSS */
.equ TSS_SIZE,          104 + 8192 + 1

/* Interrupt frame built by isr_common (offsets from rsp after the register pushes). */
.equ FRAME_RAX,         14 * 8
.equ FRAME_VECTOR,      15 * 8
.equ FRAME_ERROR,       16 * 8
.equ FRAME_RIP,         17 * 8
.equ FRAME_CS,          18 * 8

/* ---------------------------------------------------------------------------------------------------- */
/* Multiboot header (spec 3.1.1): must lie, 4-byte aligned, in the first 8 KiB of the file. */
.section .multiboot, "a"
.align 4
.long MB_HEADER_MAGIC
.long MB_FLAGS
.long -(MB_HEADER_MAGIC + MB_FLAGS)

/* ---------------------------------------------------------------------------------------------------- */
.text
.code32
.globl _start
_start:
    /* Spec 3.2: EAX = boot magic, EBX = physical address of the info structure, paging off, IF clear. */
    cli
    cld
    movl %eax, rt_boot_magic
    movl %ebx, rt_mbi_phys
    lgdt gdt_pointer                        /* the 10-byte pointer's first 6 bytes are the 32-bit form */
    movw $SEL_KDATA, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    movl $kstack_top, %esp

    /* Page tables: zero PML4 + PDPT (the loader zeroes .bss per the ELF rules; do not depend on it). */
    movl $pml4, %edi
    movl $(2 * 4096 / 4), %ecx
    xorl %eax, %eax
    rep stosl
    movl $pdpt, %eax
    orl $(PTE_P | PTE_RW | PTE_US), %eax
    movl %eax, pml4
    /* PDPT[0..3] -> the four page directories. */
    movl $pd, %eax
    orl $(PTE_P | PTE_RW | PTE_US), %eax
    xorl %ecx, %ecx
1:  movl %eax, pdpt(, %ecx, 8)
    movl $0, pdpt + 4(, %ecx, 8)
    addl $4096, %eax
    incl %ecx
    cmpl $4, %ecx
    jb 1b
    /* 2048 2 MiB pages cover 0..4 GiB; U/S everywhere so CPL3 reaches RAM, LAPIC, IOAPIC, test MMIO. */
    xorl %ecx, %ecx
2:  movl %ecx, %eax
    shll $21, %eax
    orl $(PTE_P | PTE_RW | PTE_US | PTE_PS), %eax
    cmpl $UNCACHED_FROM_PDE, %ecx
    jb 3f
    orl $PTE_PCD, %eax
3:  movl %eax, pd(, %ecx, 8)
    movl $0, pd + 4(, %ecx, 8)
    incl %ecx
    cmpl $2048, %ecx
    jb 2b

    /* TSS (SDM Vol. 3A 8.7): RSP0 for interrupts taken at CPL3, and an I/O permission bitmap that
     * allows every port. IOPL=3 alone would make port I/O legal at CPL3, but kvm_pvm runs CPL3 on
     * hardware ring 3 with IOPL forced to 0 and emulates the faulting IN/OUT, so its check falls through
     * to the bitmap (SDM Vol. 1 19.5.2). The bitmap ends with an all-ones byte (SDM Vol. 1 19.5.2). */
    movl $tss, %edi
    movl $((TSS_SIZE + 3) / 4), %ecx
    xorl %eax, %eax
    rep stosl
    movl $kstack_top, tss + TSS_RSP0
    movw $TSS_IOPB_OFFSET, tss + TSS_IOMAP_BASE
    movb $0xff, tss + TSS_IOPB_OFFSET + 8192

    /* 64-bit TSS descriptor (SDM Vol. 3A 8.2.3): base split over three fields, type 0x9 (available). */
    movl $tss, %eax
    movl %eax, %edx
    shll $16, %edx
    orl $(TSS_SIZE - 1), %edx
    movl %edx, gdt_tss
    movl %eax, %edx
    shrl $16, %edx
    andl $0xff, %edx
    orl $0x8900, %edx
    movl %eax, %ecx
    andl $0xff000000, %ecx
    orl %ecx, %edx
    movl %edx, gdt_tss + 4

    /* Long mode (SDM Vol. 3A 10.8.5): PAE, CR3, EFER.LME, then paging; the far jump enters 64-bit mode. */
    movl $pml4, %eax
    movl %eax, %cr3
    movl %cr4, %eax
    orl $CR4_PAE, %eax
    movl %eax, %cr4
    movl $MSR_EFER, %ecx
    rdmsr
    orl $EFER_LME, %eax
    wrmsr
    movl %cr0, %eax
    orl $(CR0_PG | CR0_PE), %eax
    movl %eax, %cr0
    ljmp $SEL_KCODE, $long_entry

.code64
long_entry:
    movw $SEL_KDATA, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    movl $kstack_top, %esp

    /* IDT: 256 DPL0 interrupt gates to the 16-byte stubs below (CPL3 enters through #UD, see rt.inc). */
    lea idt(%rip), %rdi
    movl $isr_stubs, %esi
    xorl %ecx, %ecx
4:  movl %ecx, %eax
    shll $4, %eax
    addl %esi, %eax                         /* eax = handler address (< 4 GiB) */
    movl %eax, %edx
    andl $0xffff, %edx
    orl $(SEL_KCODE << 16), %edx
    movl %edx, (%rdi)
    andl $0xffff0000, %eax
    orl $0x8e00, %eax                       /* present, DPL0, 64-bit interrupt gate (IF cleared on entry) */
    movl %eax, 4(%rdi)
    movq $0, 8(%rdi)
    addq $16, %rdi
    incl %ecx
    cmpl $256, %ecx
    jb 4b
    lidt idt_pointer(%rip)
    movw $SEL_TSS, %ax
    ltr %ax

    /* Mask both 8259s: every guest uses the IOAPIC (platform contract). */
    movb $0xff, %al
    outb %al, $PIC1_DATA
    outb %al, $PIC2_DATA

    /* iretq to CPL3: SS, RSP, RFLAGS, CS, RIP. */
    movl $(SEL_UDATA | 3), %eax
    pushq %rax
    movl $ustack_top, %eax
    pushq %rax
    pushq $USER_RFLAGS
    movl $(SEL_UCODE | 3), %eax
    pushq %rax
    movl $rt_user_entry, %eax
    pushq %rax
    iretq

/* ---------------------------------------------------------------------------------------------------- */
/* Interrupt stubs: stub n lives at isr_stubs + 16 * n and pushes (error code or 0, vector). */
.align 16
isr_stubs:
.set vector, 0
.rept 256
    .align 16
    .if (vector == 8) || ((vector >= 10) && (vector <= 14)) || (vector == 17) || (vector == 21) || (vector == 29) || (vector == 30)
    /* the CPU pushed an error code (SDM Vol. 3A table 6-1) */
    .else
    pushq $0
    .endif
    pushq $vector
    jmp isr_common
    .set vector, vector + 1
.endr

isr_common:
    pushq %rax
    pushq %rbx
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %rbp
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    cld
    movq FRAME_VECTOR(%rsp), %rdi
    andl $0xff, %edi                        /* `pushq $imm8` sign-extended vectors >= 0x80 */
    cmpl $VEC_UD, %edi
    je invalid_opcode
    cmpl $32, %edi
    jb exception
    cmpl $VEC_SPURIOUS, %edi
    je isr_return                           /* spurious LAPIC interrupts take no EOI (SDM 11.9) */

    /* External / LAPIC interrupt: count it, call the guest's hook, EOI the LAPIC. */
    lea rt_irq_counts(%rip), %rax
    incq (%rax, %rdi, 8)
    movl $guest_irq_hook, %eax              /* weak: 0 when the guest defines none */
    testl %eax, %eax
    jz 6f
    call *%rax                              /* hook(rdi = vector), runs at CPL0 */
6:  movl $(LAPIC_BASE + LAPIC_EOI), %eax
    movl $0, (%rax)

isr_return:
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rbp
    popq %rdi
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rbx
    popq %rax
    addq $16, %rsp                          /* vector, error code */
    iretq

/* #UD: a runtime service call if it came from CPL3 at `ud2; .word SERVICE_SIGNATURE` (rt.inc). */
invalid_opcode:
    testb $3, FRAME_CS(%rsp)
    jz exception
    movq FRAME_RIP(%rsp), %rax
    cmpw $0x0b0f, (%rax)                    /* ud2 */
    jne exception
    cmpw $SERVICE_SIGNATURE, 2(%rax)
    jne exception
    addq $SERVICE_LENGTH, FRAME_RIP(%rsp)   /* resume after the signature */

/* Service number in eax; the result goes back in eax. */
service:
    movq FRAME_RAX(%rsp), %rax
    cmpq $SYS_WAIT_IRQ, %rax
    je sys_wait_irq
    cmpq $SYS_HALT, %rax
    je sys_halt
    cmpq $SYS_TRIPLE_FAULT, %rax
    je sys_triple_fault
    movq $-1, FRAME_RAX(%rsp)
    jmp isr_return

sys_wait_irq:
    /* The STI shadow covers HLT, so an interrupt already pending wakes it: no lost wake-up. The
     * interrupt nests on this stack (same CPL, no stack switch). */
    sti
    hlt
    cli
    movq $0, FRAME_RAX(%rsp)
    jmp isr_return

sys_halt:
    cli
7:  hlt
    jmp 7b

sys_triple_fault:
    /* With a zero-limit IDT the #UD cannot be delivered (#GP), nor can the #GP (#DF), nor the #DF:
     * a triple fault, i.e. a shutdown (SDM Vol. 3A 6.15, interrupt 8). */
    lidt null_idt_pointer(%rip)
    ud2
    jmp sys_halt

exception:
    PUTS "EXCEPTION "
    movq FRAME_VECTOR(%rsp), %rdi
    andl $0xff, %edi
    call rt_putdec
    PUTS " rip="
    movq FRAME_RIP(%rsp), %rdi
    call rt_puthex
    PUTS " err="
    movq FRAME_ERROR(%rsp), %rdi
    call rt_puthex
    PUTS "\n"
    movb $EXIT_EXCEPTION, %al
    movw $DEBUG_EXIT_PORT, %dx
    outb %al, %dx
    jmp sys_halt

.weak guest_irq_hook

/* ---------------------------------------------------------------------------------------------------- */
.data
.align 16
gdt:
    .quad 0                                 /* null */
    .quad 0x00af9a000000ffff                /* 0x08 kernel code: 64-bit, DPL0 */
    .quad 0x00cf92000000ffff                /* 0x10 kernel data */
    .quad 0x00cff2000000ffff                /* 0x18 user data, DPL3 */
    .quad 0x00affa000000ffff                /* 0x20 user code: 64-bit, DPL3 */
gdt_tss:
    .quad 0, 0                              /* 0x28 TSS (16 bytes), filled in at boot */
gdt_end:

.align 8
gdt_pointer:
    .word gdt_end - gdt - 1
    .long gdt, 0
idt_pointer:
    .word 256 * 16 - 1
    .long idt, 0
null_idt_pointer:
    .word 0
    .long 0, 0

.globl rt_boot_magic, rt_mbi_phys
rt_boot_magic:
    .long 0
rt_mbi_phys:
    .long 0

/* ---------------------------------------------------------------------------------------------------- */
.bss
.align 4096
pml4:
    .skip 4096
pdpt:
    .skip 4096
pd:
    .skip 4 * 4096
idt:
    .skip 256 * 16
.align 16
tss:
    .skip TSS_SIZE
.globl rt_irq_counts
rt_irq_counts:                              /* per-vector interrupt counts, readable at CPL3 */
    .skip 256 * 8
.align 16
kstack:
    .skip 16384
kstack_top:
.align 16
ustack:
    .skip 65536
ustack_top:
