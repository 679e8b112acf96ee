/*
 * virtio.S -- a small polling virtio 1.x driver core over PCI for the test guests (CPL3; runs under QEMU with
 * SeaBIOS, which assigns BARs, and under kvmdm, which pre-assigns them: nothing here assumes an address).
 *
 *   vio_pci_find(edi = modern device ID, esi = transitional device ID, rdx = struct vio_dev *) -> eax
 *       Scans bus 0 through configuration mechanism #1 for vendor 0x1af4 with either device ID, accepts the
 *       first function that exposes the modern vendor capabilities (common, notify, ISR, device cfg), enables
 *       memory decoding and bus mastering. 0 = found, 1 = no such function.
 *   vio_init(rdi = dev, rsi = wanted feature bits) -> eax
 *       §3.1.1 steps 1-6: reset, ACKNOWLEDGE, DRIVER, accept offered & wanted, FEATURES_OK, re-read.
 *       0 = ok, 1 = VERSION_1 not offered, 2 = FEATURES_OK refused, 3 = reset never completed.
 *   vio_queue_setup(rdi = dev, esi = queue index, rdx = VQ_AREA_SIZE area, 4 KiB aligned) -> eax
 *       §3.1.1 step 7 / §4.1.5.1.3: size = min(queue max, VQ_MAX_SIZE), rings in the area, queue_enable.
 *       0 = ok, 1 = the queue does not exist.
 *   vio_driver_ok(rdi = dev) -> eax = device status read back after setting DRIVER_OK (step 8).
 *   vio_add(rdi = vq, rsi = struct vio_sg[], edx = count) -> eax = head descriptor index, or -1 if count is
 *       0 or larger than the queue. Makes the chain available (§2.7.13) without notifying.
 *   vio_kick(rdi = vq): notify the device of queue vq (§4.1.5.2: write the queue index to its notify address),
 *       unless the device asked not to be notified (VIRTQ_USED_F_NO_NOTIFY in the used ring's flags, §2.7.10)
 *       and vio_kick_always is 0.
 *   vio_get(rdi = vq) -> rax = head index of the next used element, or -1 if there is none; edx = used length.
 *   vio_wait(rdi = vq, rsi = timeout in TSC ticks, 0 = VIO_TIMEOUT_TSC) -> like vio_get, -1 on timeout.
 *   vio_cfg_read64(rdi = dev, esi = device cfg offset) -> rax, read as two 32-bit halves under the
 *       config_generation protocol (§2.5.1, §4.1.3.1: fields wider than 32 bits may not be read atomically).
 *   vio_pci_read32(edi = cfg address, esi = register) -> eax; vio_pci_write16(edi, esi, edx = value).
 *
 * No interrupts: the avail ring asks the device not to interrupt (VIRTQ_AVAIL_F_NO_INTERRUPT) and completions
 * are polled from the used ring. Descriptors are allocated round-robin, so a driver keeps fewer than
 * VQ_SIZE descriptors in flight and recycles buffers roughly in order (true of every guest here).
 * Common-configuration accesses use each field's natural width, 64-bit queue addresses as two 32-bit writes
 * (§4.1.3.1), which both QEMU and kvmdm's transport (devices/virtio_pci.py) accept.
 */

.include "rt.inc"

.text
.code64

/* vio_pci_read32(edi = PCI_CONFIG_ENABLE | devfn << 8, esi = register offset) -> eax */
.globl vio_pci_read32
vio_pci_read32:
    movl %esi, %eax
    andl $0xfc, %eax
    orl %edi, %eax
    movw $PCI_CONFIG_ADDRESS, %dx
    outl %eax, %dx
    movw $PCI_CONFIG_DATA, %dx
    inl %dx, %eax
    ret

/* vio_pci_write16(edi = function, esi = register offset (even), edx = value) */
.globl vio_pci_write16
vio_pci_write16:
    movl %edx, %ecx
    movl %esi, %eax
    andl $0xfc, %eax
    orl %edi, %eax
    movw $PCI_CONFIG_ADDRESS, %dx
    outl %eax, %dx
    movl %esi, %edx
    andl $2, %edx
    addl $PCI_CONFIG_DATA, %edx
    movl %ecx, %eax
    outw %ax, %dx
    ret

/* vio_pci_find(edi = modern ID, esi = transitional ID, rdx = dev) -> eax = 0 found, 1 not found */
.globl vio_pci_find
vio_pci_find:
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movl %edi, %r12d
    movl %esi, %r13d
    movq %rdx, %r14
    xorl %ebx, %ebx                         /* devfn: device << 3 | function */
1:  cmpl $256, %ebx
    jae 8f
    movl %ebx, %r15d
    shll $8, %r15d
    orl $PCI_CONFIG_ENABLE, %r15d
    movl %r15d, %edi
    xorl %esi, %esi
    call vio_pci_read32
    cmpw $0xffff, %ax                       /* PCI 3.0 §6.1: no function answers */
    je 5f
    cmpw $VIRTIO_PCI_VENDOR, %ax
    jne 4f
    shrl $16, %eax
    cmpl %r12d, %eax
    je 2f
    cmpl %r13d, %eax
    jne 4f
2:  movl %r15d, VDEV_CFGADDR(%r14)
    movq %r14, %rdi
    call vio_pci_setup                      /* a transitional device without modern caps is skipped */
    testl %eax, %eax
    jz 9f
4:  testl $7, %ebx                          /* function 0 says whether functions 1-7 exist */
    jnz 6f
    movl %r15d, %edi
    movl $PCI_HEADER_DWORD, %esi
    call vio_pci_read32
    testl $PCI_HEADER_MULTIFN, %eax
    jnz 6f
    addl $8, %ebx
    jmp 1b
5:  testl $7, %ebx
    jnz 6f
    addl $8, %ebx                           /* no function 0: no device in this slot */
    jmp 1b
6:  incl %ebx
    jmp 1b
8:  movl $1, %eax
    jmp 10f
9:  xorl %eax, %eax
10: popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    ret

/* vio_bar_address(edi = function, esi = BAR index) -> rax = address of a memory BAR below 4 GiB, else 0
 * (an I/O BAR, an unassigned one, an index past BAR5, or one above the guest's 4 GiB identity map). */
vio_bar_address:
    cmpl $5, %esi
    ja 8f
    pushq %rbx
    pushq %r12
    pushq %r13
    movl %edi, %ebx
    leal PCI_BAR0(, %rsi, 4), %r12d
    movl %ebx, %edi
    movl %r12d, %esi
    call vio_pci_read32
    testl $1, %eax                          /* PCI 3.0 §6.2.5.1: bit 0 set = I/O space */
    jnz 7f
    movl %eax, %r13d
    andl $0xfffffff0, %r13d
    andl $6, %eax
    cmpl $4, %eax                           /* type 10b: 64-bit, the next BAR holds the upper half */
    jne 2f
    cmpl $(PCI_BAR0 + 20), %r12d
    jae 7f
    movl %ebx, %edi
    leal 4(%r12), %esi
    call vio_pci_read32
    testl %eax, %eax
    jnz 7f                                  /* above 4 GiB: outside the identity map */
2:  movl %r13d, %eax
    popq %r13
    popq %r12
    popq %rbx
    ret
7:  popq %r13
    popq %r12
    popq %rbx
8:  xorl %eax, %eax
    ret

/* vio_pci_setup(rdi = dev with VDEV_CFGADDR set) -> eax = 0 if every modern structure was found. Walks the
 * capability list for virtio vendor capabilities (§4.1.4), keeping the first of each type (§4.1.4.1:
 * "the driver SHOULD use the first instance"), then enables memory space and bus mastering. */
vio_pci_setup:
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rdi, %rbx
    movl VDEV_CFGADDR(%rbx), %r12d
    xorl %eax, %eax
    movq %rax, VDEV_COMMON(%rbx)
    movq %rax, VDEV_NOTIFY(%rbx)
    movq %rax, VDEV_ISR(%rbx)
    movq %rax, VDEV_DEVCFG(%rbx)
    movl %eax, VDEV_NOTIFY_MULT(%rbx)
    movl %r12d, %edi
    movl $PCI_COMMAND, %esi
    call vio_pci_read32
    testl $PCI_STATUS_CAP_LIST, %eax
    jz 8f
    movl %r12d, %edi
    movl $PCI_CAP_PTR, %esi
    call vio_pci_read32
    movzbl %al, %r13d
    andl $0xfc, %r13d
    movl $PCI_CAP_LIMIT, %r14d
1:  testl %r13d, %r13d
    jz 6f
    decl %r14d
    js 6f
    movl %r12d, %edi
    movl %r13d, %esi
    call vio_pci_read32                     /* id, next, len, cfg_type */
    cmpb $PCI_CAP_ID_VNDR, %al
    jne 5f
    shrl $24, %eax
    movl %eax, %r15d                        /* cfg_type */
    cmpl $VIRTIO_PCI_CAP_DEVICE_CFG, %r15d
    ja 5f                                   /* PCI_CFG (5) and unknown types: not used */
    testl %r15d, %r15d
    jz 5f
    movl %r12d, %edi
    leal 4(%r13), %esi
    call vio_pci_read32                     /* bar, id, padding */
    movzbl %al, %esi
    movl %r12d, %edi
    call vio_bar_address
    testq %rax, %rax
    jz 5f
    pushq %rax
    movl %r12d, %edi
    leal 8(%r13), %esi
    call vio_pci_read32                     /* offset within the BAR */
    popq %rcx
    addq %rax, %rcx                         /* rcx = address of the structure */
    lea type_slot(%rip), %rdx
    movzbl -1(%rdx, %r15), %eax             /* offset of the vio_dev field for this cfg_type */
    cmpq $0, (%rbx, %rax)
    jne 5f                                  /* not the first of its type */
    movq %rcx, (%rbx, %rax)
    cmpl $VIRTIO_PCI_CAP_NOTIFY_CFG, %r15d
    jne 5f
    movl %r12d, %edi
    leal 16(%r13), %esi
    call vio_pci_read32                     /* struct virtio_pci_notify_cap: notify_off_multiplier */
    movl %eax, VDEV_NOTIFY_MULT(%rbx)
5:  movl %r12d, %edi
    movl %r13d, %esi
    call vio_pci_read32
    shrl $8, %eax
    movzbl %al, %r13d
    andl $0xfc, %r13d
    jmp 1b
6:  cmpq $0, VDEV_COMMON(%rbx)
    je 8f
    cmpq $0, VDEV_NOTIFY(%rbx)
    je 8f
    cmpq $0, VDEV_ISR(%rbx)
    je 8f
    cmpq $0, VDEV_DEVCFG(%rbx)
    je 8f
    movl %r12d, %edi
    movl $PCI_COMMAND, %esi
    call vio_pci_read32
    movl %eax, %edx
    orl $(PCI_CMD_MEMORY | PCI_CMD_MASTER), %edx
    andl $0xffff, %edx
    movl %r12d, %edi
    movl $PCI_COMMAND, %esi
    call vio_pci_write16
    xorl %eax, %eax
    jmp 9f
8:  movl $1, %eax
9:  popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    ret

/* vio_init(rdi = dev, rsi = wanted features) -> eax (see the header) */
.globl vio_init
vio_init:
    movq VDEV_COMMON(%rdi), %rcx
    movb $0, VIO_CC_STATUS(%rcx)            /* §2.4: reset */
    movl $0x100000, %r8d
1:  movzbl VIO_CC_STATUS(%rcx), %eax        /* §4.1.4.3.2: wait until device_status reads 0 */
    testl %eax, %eax
    jz 2f
    decl %r8d
    jnz 1b
    movl $3, %eax
    ret
2:  movb $VIO_S_ACKNOWLEDGE, VIO_CC_STATUS(%rcx)
    movb $(VIO_S_ACKNOWLEDGE | VIO_S_DRIVER), VIO_CC_STATUS(%rcx)
    movl $0, VIO_CC_DFSELECT(%rcx)
    movl VIO_CC_DF(%rcx), %eax
    movl $1, VIO_CC_DFSELECT(%rcx)
    movl VIO_CC_DF(%rcx), %edx
    shlq $32, %rdx
    orq %rax, %rdx
    movq %rdx, VDEV_OFFERED(%rdi)
    andq %rsi, %rdx                         /* §2.2.1: accept only offered bits */
    btq $VIRTIO_F_VERSION_1, %rdx
    jc 3f
    movb $(VIO_S_ACKNOWLEDGE | VIO_S_DRIVER | VIO_S_FAILED), VIO_CC_STATUS(%rcx)
    movl $1, %eax
    ret
3:  movq %rdx, VDEV_FEATURES(%rdi)
    movl $0, VIO_CC_GFSELECT(%rcx)
    movl %edx, VIO_CC_GF(%rcx)
    movl $1, VIO_CC_GFSELECT(%rcx)
    shrq $32, %rdx
    movl %edx, VIO_CC_GF(%rcx)
    movb $(VIO_S_ACKNOWLEDGE | VIO_S_DRIVER | VIO_S_FEATURES_OK), VIO_CC_STATUS(%rcx)
    movzbl VIO_CC_STATUS(%rcx), %eax        /* §3.1.1 step 6: re-read FEATURES_OK */
    testl $VIO_S_FEATURES_OK, %eax
    jnz 4f
    movb $(VIO_S_ACKNOWLEDGE | VIO_S_DRIVER | VIO_S_FAILED), VIO_CC_STATUS(%rcx)
    movl $2, %eax
    ret
4:  xorl %eax, %eax
    ret

/* vio_queue_setup(rdi = dev, esi = queue index, rdx = area) -> eax = 0 ok, 1 no such queue */
.globl vio_queue_setup
vio_queue_setup:
    pushq %rbx
    pushq %r12
    pushq %r13
    movq %rdi, %rbx
    movl %esi, %r12d
    movq %rdx, %r13
    movq %r13, %rdi                         /* the area starts clean: rings are all zero (§2.7) */
    movl $(VQ_AREA_SIZE / 8), %ecx
    xorl %eax, %eax
    rep stosq
    movq VDEV_COMMON(%rbx), %rcx
    movw %r12w, VIO_CC_Q_SELECT(%rcx)
    movzwl VIO_CC_Q_SIZE(%rcx), %eax        /* the maximum until written; 0 = unavailable */
    testl %eax, %eax
    jz 8f
    cmpl $VQ_MAX_SIZE, %eax
    jbe 1f
    movl $VQ_MAX_SIZE, %eax                 /* both powers of two (§2.7): the minimum is one too */
1:  movw %ax, VIO_CC_Q_SIZE(%rcx)
    movw %ax, VQ_SIZE(%r13)
    movw %r12w, VQ_INDEX(%r13)
    movq %rbx, VQ_DEV(%r13)
    lea VQ_DESC_PAGE(%r13), %rax
    movl %eax, VIO_CC_Q_DESC(%rcx)
    shrq $32, %rax
    movl %eax, VIO_CC_Q_DESC + 4(%rcx)
    lea VQ_AVAIL_PAGE(%r13), %rax
    movl %eax, VIO_CC_Q_DRIVER(%rcx)
    shrq $32, %rax
    movl %eax, VIO_CC_Q_DRIVER + 4(%rcx)
    lea VQ_USED_PAGE(%r13), %rax
    movl %eax, VIO_CC_Q_DEVICE(%rcx)
    shrq $32, %rax
    movl %eax, VIO_CC_Q_DEVICE + 4(%rcx)
    movw $VIRTQ_AVAIL_F_NO_INTERRUPT, VQ_AVAIL_PAGE(%r13)   /* we poll (§2.7.7) */
    movzwl VIO_CC_Q_NOFF(%rcx), %eax        /* §4.1.4.4: base + queue_notify_off * multiplier */
    imull VDEV_NOTIFY_MULT(%rbx), %eax
    addq VDEV_NOTIFY(%rbx), %rax
    movq %rax, VQ_NOTIFY(%r13)
    movw $1, VIO_CC_Q_ENABLE(%rcx)
    xorl %eax, %eax
    jmp 9f
8:  movl $1, %eax
9:  popq %r13
    popq %r12
    popq %rbx
    ret

/* vio_driver_ok(rdi = dev) -> eax = device status read back */
.globl vio_driver_ok
vio_driver_ok:
    movq VDEV_COMMON(%rdi), %rcx
    movb $(VIO_S_ACKNOWLEDGE | VIO_S_DRIVER | VIO_S_FEATURES_OK | VIO_S_DRIVER_OK), VIO_CC_STATUS(%rcx)
    movzbl VIO_CC_STATUS(%rcx), %eax
    ret

/* vio_add(rdi = vq, rsi = sg array, edx = count) -> eax = head, or -1 */
.globl vio_add
vio_add:
    pushq %rbx
    movzwl VQ_SIZE(%rdi), %r8d
    testl %edx, %edx
    jz 8f
    cmpl %r8d, %edx
    ja 8f
    movzwl VQ_NEXT_DESC(%rdi), %eax         /* head */
    leal (%rax, %rdx), %ecx
    cmpl %r8d, %ecx
    jbe 1f
    xorl %eax, %eax                         /* the chain would run off the table: start over at 0 */
1:  movl %eax, %r9d                         /* current descriptor */
    lea VQ_DESC_PAGE(%rdi), %r10
    movl %edx, %r11d                        /* remaining */
2:  movl %r9d, %ecx
    shll $4, %ecx
    lea (%r10, %rcx), %rbx                  /* struct virtq_desc {le64 addr; le32 len; le16 flags, next} */
    movq SG_ADDR(%rsi), %rcx
    movq %rcx, (%rbx)
    movl SG_LEN(%rsi), %ecx
    movl %ecx, 8(%rbx)
    movl SG_FLAGS(%rsi), %ecx
    incl %r9d
    decl %r11d
    jz 3f
    orl $VIRTQ_DESC_F_NEXT, %ecx
    movw %cx, 12(%rbx)
    movw %r9w, 14(%rbx)
    addq $SG_SIZE, %rsi
    jmp 2b
3:  movw %cx, 12(%rbx)
    movw $0, 14(%rbx)
    cmpl %r8d, %r9d
    jb 4f
    xorl %r9d, %r9d
4:  movw %r9w, VQ_NEXT_DESC(%rdi)
    /* §2.7.13: ring[idx % size] = head, then (x86 keeps stores in order: no fence needed) idx + 1 */
    lea VQ_AVAIL_PAGE(%rdi), %r10
    movzwl VQ_AVAIL_IDX(%rdi), %ecx
    leal -1(%r8), %r11d
    andl %ecx, %r11d
    movw %ax, 4(%r10, %r11, 2)
    incl %ecx
    movw %cx, VQ_AVAIL_IDX(%rdi)
    movw %cx, 2(%r10)
    popq %rbx
    ret
8:  movl $-1, %eax
    popq %rbx
    ret

/* vio_kick(rdi = vq) */
.globl vio_kick
vio_kick:
    mfence                                  /* §2.7.13.4: idx visible before the notification, and before the
                                               flags read below (the device's store-load pairing, §2.7.10) */
    cmpb $0, vio_kick_always(%rip)
    jne 2f                                  /* a guest option: notify even so (tests count one exit per kick) */
    testw $VIRTQ_USED_F_NO_NOTIFY, VQ_USED_PAGE(%rdi)
    jnz 1f                                  /* §2.7.10.1: flags 1: the driver SHOULD NOT send a notification */
2:
    movq VQ_NOTIFY(%rdi), %rdx
    movzwl VQ_INDEX(%rdi), %eax
    movw %ax, (%rdx)                        /* §4.1.5.2: the 16-bit queue index */
1:  ret

/* vio_get(rdi = vq) -> rax = used id or -1, edx = used length */
.globl vio_get
vio_get:
    lea VQ_USED_PAGE(%rdi), %r8
    movzwl VQ_LAST_USED(%rdi), %ecx
    movzwl 2(%r8), %eax                     /* used->idx, written by the device */
    cmpw %ax, %cx
    je 8f
    movzwl VQ_SIZE(%rdi), %eax
    decl %eax
    andl %ecx, %eax
    lea 4(%r8, %rax, 8), %r9                /* struct virtq_used_elem {le32 id; le32 len} */
    movl (%r9), %eax
    movl 4(%r9), %edx
    incl %ecx
    movw %cx, VQ_LAST_USED(%rdi)
    ret
8:  movq $-1, %rax
    xorl %edx, %edx
    ret

/* vio_wait(rdi = vq, rsi = timeout in TSC ticks or 0) -> rax = used id or -1, edx = length */
.globl vio_wait
vio_wait:
    pushq %rbx
    pushq %r12
    pushq %r13
    movq %rdi, %rbx
    movq %rsi, %r12
    testq %r12, %r12
    jnz 1f
    movabsq $VIO_TIMEOUT_TSC, %r12
1:  rdtsc
    shlq $32, %rdx
    orq %rax, %rdx
    movq %rdx, %r13
2:  movq %rbx, %rdi
    call vio_get
    cmpq $-1, %rax
    jne 9f
    pause
    rdtsc
    shlq $32, %rdx
    orq %rax, %rdx
    subq %r13, %rdx
    cmpq %r12, %rdx
    jb 2b
    movq $-1, %rax
    xorl %edx, %edx
9:  popq %r13
    popq %r12
    popq %rbx
    ret

/* vio_cfg_read64(rdi = dev, esi = offset) -> rax */
.globl vio_cfg_read64
vio_cfg_read64:
    movq VDEV_COMMON(%rdi), %rcx
    movq VDEV_DEVCFG(%rdi), %r8
    movl %esi, %esi
1:  movzbl VIO_CC_CFGGEN(%rcx), %r9d
    movl (%r8, %rsi), %eax
    movl 4(%r8, %rsi), %edx
    movzbl VIO_CC_CFGGEN(%rcx), %r10d
    cmpl %r9d, %r10d
    jne 1b
    shlq $32, %rdx
    orq %rdx, %rax
    ret

.data
/* Non-zero: vio_kick notifies even when the device set VIRTQ_USED_F_NO_NOTIFY (guests set it from `kickall=1`). */
.globl vio_kick_always
vio_kick_always:
    .byte 0

.section .rodata
/* vio_dev field for cfg_type 1..4 (common, notify, ISR, device). */
type_slot:
    .byte VDEV_COMMON, VDEV_NOTIFY, VDEV_ISR, VDEV_DEVCFG
