/*
 * reset -- prints "resetting" and asks the i8042 to pulse the reset line (command 0xFE to port 0x64).
 * A VMM that ends the run on reset (QEMU -no-reboot) prints nothing more. If the guest still runs two
 * seconds later it prints "reset did not happen" and exits 1.
 */

.include "rt.inc"

.equ I8042_STATUS_IBF, 0x02                 /* input buffer full: the controller is not ready for a command */

.text
.code64
.globl guest_main
guest_main:
    PUTS "resetting\n"
    movw $I8042_CMD_PORT, %dx
    movl $1000, %ecx
1:  inb %dx, %al                            /* bounded wait for IBF clear, as a driver would */
    testb $I8042_STATUS_IBF, %al
    jz 2f
    decl %ecx
    jnz 1b
2:  movb $I8042_RESET, %al
    outb %al, %dx
    movl $2000, %edi                        /* the VMM may act asynchronously: give it time */
    call rt_wait_irq_timeout
    PUTS "reset did not happen\n"
    movl $EXIT_FAIL, %eax
    ret
