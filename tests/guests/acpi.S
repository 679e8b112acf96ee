/*
 * acpi -- finds the platform's ACPI tables the way an OS does and powers the machine off through them:
 *   RSDP ("RSD PTR " on a 16-byte boundary in 0xE0000-0xFFFFF, ACPI 6.5 §5.2.5.1, checksum over 20 bytes),
 *   RSDT -> FACP (FADT): PM1a_CNT_BLK (offset 64) and PM_TMR_BLK (offset 76), FADT -> DSDT (offset 40),
 *   the \_S5 package in the DSDT (NameOp "_S5_" PackageOp PkgLength NumElements, first element = SLP_TYPa),
 *   the PM timer advancing, then SLP_TYPa | SLP_EN written to PM1a_CNT (§4.8.3.2.1).
 * Prints what it found (ports and SLP_TYP, not addresses: those differ between firmware). Under QEMU the tables
 * are SeaBIOS's copy of QEMU's; under kvmdm they are kvmcore.acpi's. If the machine still runs 2 s after the
 * write it prints "poweroff did not happen" and exits 1.
 */

.include "rt.inc"

.equ BIOS_AREA,        0xe0000
.equ BIOS_AREA_END,    0x100000
.equ SIG_RSDP,         0x2052545020445352   /* "RSD PTR " */
.equ SIG_RSDT,         0x54445352           /* "RSDT" */
.equ SIG_FACP,         0x50434146           /* "FACP" */
.equ SIG_DSDT,         0x54445344           /* "DSDT" */
.equ NAME_S5,          0x5f35535f           /* "_S5_" */
.equ SDT_HEADER,       36
.equ FADT_DSDT,        40
.equ FADT_PM1A_CNT,    64
.equ FADT_PM_TMR,      76
.equ AML_PACKAGE_OP,   0x12
.equ AML_ZERO_OP,      0x00
.equ AML_ONE_OP,       0x01
.equ AML_BYTE_PREFIX,  0x0a
.equ SLP_TYP_SHIFT,    10
.equ SLP_EN,           0x2000
.equ PM_TICKS_1MS,     3580                 /* 3.579545 MHz */

.text
.code64
.globl guest_main
guest_main:
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15

    /* ---- RSDP ---- */
    movabsq $SIG_RSDP, %rax
    movl $BIOS_AREA, %ebx
1:  cmpq %rax, (%rbx)
    je 2f
    addq $16, %rbx
    cmpq $BIOS_AREA_END, %rbx
    jb 1b
    PUTS "FAIL no RSDP in the BIOS area\n"
    jmp fail
2:  xorl %eax, %eax
    xorl %ecx, %ecx
3:  addb (%rbx, %rcx), %al
    incl %ecx
    cmpl $20, %ecx
    jb 3b
    testb %al, %al
    jz 4f
    PUTS "FAIL RSDP checksum\n"
    jmp fail
4:  PUTS "RSDP found\n"

    /* ---- RSDT -> FADT ---- */
    movl 16(%rbx), %r12d
    cmpl $SIG_RSDT, (%r12)
    je 5f
    PUTS "FAIL RSDP does not point at an RSDT\n"
    jmp fail
5:  movl 4(%r12), %ecx                       /* length */
    leaq SDT_HEADER(%r12), %rsi
    leaq (%r12, %rcx), %rdi
6:  cmpq %rdi, %rsi
    jae 7f
    movl (%rsi), %r13d
    cmpl $SIG_FACP, (%r13)
    je 8f
    addq $4, %rsi
    jmp 6b
7:  PUTS "FAIL no FACP in the RSDT\n"
    jmp fail
8:  PUTS "FADT found PM1a_CNT_BLK="
    movl FADT_PM1A_CNT(%r13), %edi
    call rt_puthex
    PUTS " PM_TMR_BLK="
    movl FADT_PM_TMR(%r13), %edi
    call rt_puthex
    PUTS "\n"

    /* ---- DSDT: \_S5 ---- */
    movl FADT_DSDT(%r13), %r14d
    cmpl $SIG_DSDT, (%r14)
    je 9f
    PUTS "FAIL FADT does not point at a DSDT\n"
    jmp fail
9:  movl 4(%r14), %ecx
    leaq SDT_HEADER(%r14), %rsi
    leaq -8(%r14, %rcx), %rdi                /* room for the bytes read after the name */
10: cmpq %rdi, %rsi
    jae 11f
    cmpl $NAME_S5, (%rsi)
    je 12f
    incq %rsi
    jmp 10b
11: PUTS "FAIL no _S5_ in the DSDT\n"
    jmp fail
12: cmpb $AML_PACKAGE_OP, 4(%rsi)
    jne 13f
    testb $0xc0, 5(%rsi)                     /* a one-byte PkgLength (a 4-element package is short) */
    jnz 13f
    movzbl 7(%rsi), %eax                     /* first element: SLP_TYPa */
    cmpb $AML_ZERO_OP, %al
    je 14f
    cmpb $AML_ONE_OP, %al
    je 14f
    cmpb $AML_BYTE_PREFIX, %al
    jne 13f
    movzbl 8(%rsi), %eax
    jmp 14f
13: PUTS "FAIL _S5_ is not a package this guest can read\n"
    jmp fail
14: movl %eax, %r15d
    PUTS "S5 SLP_TYPa="
    movl %r15d, %edi
    call rt_putdec
    PUTS "\n"

    /* ---- PM timer: advances by at least 1 ms worth of ticks (bounded spin) ---- */
    movl FADT_PM_TMR(%r13), %edx
    inl %dx, %eax
    movl %eax, %ebx
    movl $50000000, %ecx
15: inl %dx, %eax
    subl %ebx, %eax
    andl $0xffffff, %eax                     /* a 24-bit timer wraps there; a 32-bit one is a superset */
    cmpl $PM_TICKS_1MS, %eax
    jae 16f
    decl %ecx
    jnz 15b
    PUTS "FAIL PM timer does not advance\n"
    jmp fail
16: PUTS "PM timer advances\n"

    /* ---- S5 ---- */
    PUTS "powering off through PM1a_CNT\n"
    movl FADT_PM1A_CNT(%r13), %edx
    movl %r15d, %eax
    shll $SLP_TYP_SHIFT, %eax
    orl $SLP_EN, %eax
    outw %ax, %dx
    movl $2000, %edi
    call rt_wait_irq_timeout
    PUTS "poweroff did not happen\n"
fail:
    movl $EXIT_FAIL, %eax
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    ret
