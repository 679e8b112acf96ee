/*
 * triple -- prints "tripling", then (through the SYS_TRIPLE_FAULT service) loads a zero-limit IDT and
 * executes ud2: #UD, #GP and #DF all fail to deliver, so the CPU shuts down (SDM Vol. 3A 6.15,
 * interrupt 8). QEMU -no-reboot exits; KVM reports KVM_EXIT_SHUTDOWN. Nothing more is printed unless
 * the VMM carries on, in which case "triple fault did not happen" and exit code 1.
 */

.include "rt.inc"

.text
.code64
.globl guest_main
guest_main:
    PUTS "tripling\n"
    movl $SYS_TRIPLE_FAULT, %eax
    SERVICE
    PUTS "triple fault did not happen\n"
    movl $EXIT_FAIL, %eax
    ret
