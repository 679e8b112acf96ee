/* The floor of a DM's startup on this host: what a VMM written in C spends to reach KVM_RUN with the same KVM
 * set-up kvmdm's DM does for the demo guest (daemon/vmm.py, kvmcore/x86.py): /dev/kvm, the supported CPUID,
 * a VM with the identity map and TSS addresses, in-kernel irqchip and PIT, 128 MiB of anonymous guest RAM advised
 * for huge pages, the multiboot ELF's segments copied in plus a page of boot tables at 0xE0000 and one of boot
 * information, one vCPU with CPUID (hypervisor bit), two MSRs, FPU, LAPIC LINT0/LINT1, multiboot sregs and regs.
 * No jail, no devices, no threads: this is the part of the DM's CPU time no language makes go away.
 *
 *   vmm_floor KERNEL.elf   ->  one line of JSON: CPU and minor faults of this process up to the first KVM_RUN,
 *                              then the first exit's reason and port (the guest ran to its first port access).
 * Built by bench/vmm_floor.py with cc -O2.
 */
#define _GNU_SOURCE
#include <elf.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define RAM_SIZE (128UL << 20)
#define IDENTITY_MAP_ADDR 0xFEFFC000UL
#define TSS_ADDR 0xFEFFD000UL
#define TABLES_ADDR 0xE0000UL
#define MBI_ADDR 0x9000UL
#define MAX_CPUID 256

static void die(const char *what) {
    fprintf(stderr, "vmm_floor: %s: %s\n", what, strerror(errno));
    exit(1);
}

static long xioctl(int fd, unsigned long req, void *arg, const char *what) {
    long r = ioctl(fd, req, arg);
    if (r < 0)
        die(what);
    return r;
}

static void seg(struct kvm_segment *s, uint16_t sel, int code) {
    memset(s, 0, sizeof(*s));
    s->base = 0;
    s->limit = 0xFFFFFFFF;
    s->selector = sel;
    s->type = code ? 0xB : 0x3;
    s->present = 1;
    s->dpl = 0;
    s->db = 1;
    s->s = 1;
    s->g = 1;
}

static double ms(struct timeval tv) { return tv.tv_sec * 1e3 + tv.tv_usec / 1e3; }

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: vmm_floor KERNEL.elf\n");
        return 2;
    }
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);

    int kfd = open(argv[1], O_RDONLY | O_CLOEXEC);
    if (kfd < 0)
        die("open kernel");
    struct stat st;
    if (fstat(kfd, &st) < 0)
        die("stat kernel");
    uint8_t *elf = malloc(st.st_size);
    if (!elf || read(kfd, elf, st.st_size) != st.st_size)
        die("read kernel");
    close(kfd);
    Elf32_Ehdr *eh = (Elf32_Ehdr *)elf;
    if (st.st_size < (off_t)sizeof(*eh) || memcmp(eh->e_ident, ELFMAG, SELFMAG) || eh->e_ident[EI_CLASS] != ELFCLASS32) {
        fprintf(stderr, "vmm_floor: %s is not an ELF32 file\n", argv[1]);
        return 1;
    }

    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0)
        die("open /dev/kvm");
    struct kvm_cpuid2 *cpuid = calloc(1, sizeof(*cpuid) + MAX_CPUID * sizeof(struct kvm_cpuid_entry2));
    cpuid->nent = MAX_CPUID;
    xioctl(kvm, KVM_GET_SUPPORTED_CPUID, cpuid, "KVM_GET_SUPPORTED_CPUID");
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0)
        die("KVM_CREATE_VM");
    uint64_t idmap = IDENTITY_MAP_ADDR;
    xioctl(vm, KVM_SET_IDENTITY_MAP_ADDR, &idmap, "KVM_SET_IDENTITY_MAP_ADDR");
    if (ioctl(vm, KVM_SET_TSS_ADDR, TSS_ADDR) < 0)
        die("KVM_SET_TSS_ADDR");
    xioctl(vm, KVM_CREATE_IRQCHIP, NULL, "KVM_CREATE_IRQCHIP");
    struct kvm_pit_config pit = {.flags = KVM_PIT_SPEAKER_DUMMY};
    xioctl(vm, KVM_CREATE_PIT2, &pit, "KVM_CREATE_PIT2");

    /* 2 MiB-aligned host address, as the DM maps it (THP). */
    uint8_t *raw = mmap(NULL, RAM_SIZE + (2UL << 20), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (raw == MAP_FAILED)
        die("mmap guest RAM");
    uint8_t *ram = (uint8_t *)(((uintptr_t)raw + (2UL << 20) - 1) & ~((2UL << 20) - 1));
    madvise(ram, RAM_SIZE, MADV_HUGEPAGE);
    struct kvm_userspace_memory_region region = {
        .slot = 0, .guest_phys_addr = 0, .memory_size = RAM_SIZE, .userspace_addr = (uintptr_t)ram};
    xioctl(vm, KVM_SET_USER_MEMORY_REGION, &region, "KVM_SET_USER_MEMORY_REGION");

    for (int i = 0; i < eh->e_phnum; i++) {
        uint64_t off = (uint64_t)eh->e_phoff + (uint64_t)i * eh->e_phentsize;
        if (eh->e_phentsize < sizeof(Elf32_Phdr) || off + sizeof(Elf32_Phdr) > (uint64_t)st.st_size) {
            fprintf(stderr, "vmm_floor: a program header lies outside the file\n");
            return 1;
        }
        Elf32_Phdr *ph = (Elf32_Phdr *)(elf + off);
        if (ph->p_type != PT_LOAD)
            continue;
        if ((uint64_t)ph->p_paddr + ph->p_memsz > RAM_SIZE || (uint64_t)ph->p_offset + ph->p_filesz > (uint64_t)st.st_size) {
            fprintf(stderr, "vmm_floor: a segment lies outside RAM or the file\n");
            return 1;
        }
        memcpy(ram + ph->p_paddr, elf + ph->p_offset, ph->p_filesz);
        memset(ram + ph->p_paddr + ph->p_filesz, 0, ph->p_memsz - ph->p_filesz);
    }
    memset(ram + TABLES_ADDR, 0x5A, 4096); /* stands for the ACPI tables */
    uint32_t mbi[2] = {0x1 /* mem_lower/upper valid */, 0};
    memcpy(ram + MBI_ADDR, mbi, sizeof(mbi));

    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    if (vcpu < 0)
        die("KVM_CREATE_VCPU");
    int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    if (run_size < 0)
        die("KVM_GET_VCPU_MMAP_SIZE");
    struct kvm_run *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED)
        die("mmap kvm_run");
    for (unsigned i = 0; i < cpuid->nent; i++)
        if (cpuid->entries[i].function == 1)
            cpuid->entries[i].ecx |= 1U << 31;
    xioctl(vcpu, KVM_SET_CPUID2, cpuid, "KVM_SET_CPUID2");
    struct {
        struct kvm_msrs hdr;
        struct kvm_msr_entry e[2];
    } msrs = {.hdr = {.nmsrs = 2}, .e = {{.index = 0x1A0, .data = 1}, {.index = 0x2FF, .data = (1 << 11) | 6}}};
    xioctl(vcpu, KVM_SET_MSRS, &msrs, "KVM_SET_MSRS");
    struct kvm_fpu fpu = {.fcw = 0x37F, .mxcsr = 0x1F80};
    xioctl(vcpu, KVM_SET_FPU, &fpu, "KVM_SET_FPU");
    struct kvm_lapic_state lapic;
    xioctl(vcpu, KVM_GET_LAPIC, &lapic, "KVM_GET_LAPIC");
    uint32_t *lvt0 = (uint32_t *)(lapic.regs + 0x350), *lvt1 = (uint32_t *)(lapic.regs + 0x360);
    *lvt0 = (*lvt0 & ~0x700U & ~(1U << 16)) | (7U << 8);
    *lvt1 = (*lvt1 & ~0x700U & ~(1U << 16)) | (4U << 8);
    xioctl(vcpu, KVM_SET_LAPIC, &lapic, "KVM_SET_LAPIC");
    struct kvm_sregs sregs;
    xioctl(vcpu, KVM_GET_SREGS, &sregs, "KVM_GET_SREGS");
    seg(&sregs.cs, 0x10, 1);
    seg(&sregs.ds, 0x18, 0);
    sregs.es = sregs.fs = sregs.gs = sregs.ss = sregs.ds;
    sregs.cr0 = 0x11; /* PE | ET */
    sregs.cr4 = 0;
    sregs.efer = 0;
    xioctl(vcpu, KVM_SET_SREGS, &sregs, "KVM_SET_SREGS");
    struct kvm_regs regs = {.rip = eh->e_entry, .rflags = 0x2, .rax = 0x2BADB002, .rbx = MBI_ADDR};
    xioctl(vcpu, KVM_SET_REGS, &regs, "KVM_SET_REGS");

    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    struct timespec t1;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    if (ioctl(vcpu, KVM_RUN, 0) < 0 && errno != EINTR)
        die("KVM_RUN");
    int port = run->exit_reason == KVM_EXIT_IO ? run->io.port : -1;
    printf("{\"cpu_ms\": %.3f, \"minor_faults\": %ld, \"main_to_kvm_run_ms\": %.3f, \"first_exit_reason\": %u, "
           "\"first_exit_port\": %d}\n",
           ms(ru.ru_utime) + ms(ru.ru_stime), ru.ru_minflt,
           (t1.tv_sec - t0.tv_sec) * 1e3 + (t1.tv_nsec - t0.tv_nsec) / 1e6, run->exit_reason, port);
    return 0;
}
