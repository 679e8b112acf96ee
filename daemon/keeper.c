/* The pid-namespace keeper of a jailed process, after its exec (daemon/jail.py, step 10; daemon/keeper.py builds
 * and opens this file).
 *
 * Why a separate program: the keeper used to be the Python process the jail forked, so it kept a copy of a whole
 * interpreter (3.6 MiB of pages per guest that only it mapped, and every page the DM wrote afterwards was copied
 * once more). This program maps a few KiB. It runs with no libc (-nostdlib -static): nothing runs before main
 * that the keeper's seccomp filter, loaded before the exec and inherited by it, would have to allow.
 *
 * What it inherits across execveat: the blocked signal mask (every forwarded signal and SIGCHLD, so nothing that
 * arrived in between is lost: it is pending), its one child (the DM, pid 1 of the new namespace), the write end
 * of the "locked" pipe, no_new_privs, the unprivileged ids and the filter. The parent passes, in the environment,
 * KVMDM_KEEPER=<child pid>:<locked fd>; argv is the DM's, so ps and the daemon see the same command line as before.
 *
 * Its whole life: not dumpable again (execve resets it), close the locked pipe (the DM goes on only then), and
 * then forward every forwarded signal to the child, wait for it, and exit with its status, re-raising its fatal
 * signal on itself so the parent's waitpid sees exactly how the DM died (the Python keeper, jail._keeper, does the
 * same and is the reference when this program cannot be built).
 */

#define SYS_close 3
#define SYS_rt_sigaction 13
#define SYS_rt_sigprocmask 14
#define SYS_getpid 39
#define SYS_exit_group 231
#define SYS_kill 62
#define SYS_wait4 61
#define SYS_prctl 157
#define SYS_rt_sigtimedwait 128

#define PR_SET_DUMPABLE 4
#define WNOHANG 1
#define SIG_UNBLOCK 1
#define SIGKILL 9
#define SIGCHLD 17
#define SIGSTOP 19
#define EINTR 4
#ifndef KEEPER_WAITS
#error "build with -DKEEPER_WAITS=<signal mask> (daemon/keeper.py)"
#endif

static long sys6(long n, long a, long b, long c, long d, long e)
{
    long ret;
    register long r10 __asm__("r10") = d;
    register long r8 __asm__("r8") = e;
    __asm__ volatile("syscall" : "=a"(ret) : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8)
                     : "rcx", "r11", "memory");
    return ret;
}

static __attribute__((noreturn)) void die(int status)
{
    for (;;)
        sys6(SYS_exit_group, status, 0, 0, 0, 0);
}

/* "KVMDM_KEEPER=" then decimal, ':' and decimal; anything else is -1 */
static int parse(const char *s, long *child, long *locked)
{
    static const char key[] = "KVMDM_KEEPER=";
    for (int i = 0; key[i]; i++)
        if (s[i] != key[i])
            return -1;
    s += sizeof key - 1;
    long v[2] = {0, 0};
    for (int k = 0; k < 2; k++) {
        if (*s < '0' || *s > '9')
            return -1;
        for (; *s >= '0' && *s <= '9'; s++) {
            v[k] = v[k] * 10 + (*s - '0');
            if (v[k] > 0x7fffffff)
                return -1;
        }
        if (*s != (k == 0 ? ':' : '\0'))
            return -1;
        s++;
    }
    *child = v[0];
    *locked = v[1];
    return 0;
}

struct ksigaction {
    void *handler;
    unsigned long flags;
    void *restorer;
    unsigned long mask;
};

__attribute__((used)) void keeper_main(long *sp)
{
    long argc = sp[0];
    char **envp = (char **)(sp + 1 + argc + 1);
    long child = -1, locked = -1;
    for (; *envp; envp++)
        if (parse(*envp, &child, &locked) == 0)
            break;
    if (child <= 0 || locked < 0)
        die(1);
    sys6(SYS_prctl, PR_SET_DUMPABLE, 0, 0, 0, 0);
    sys6(SYS_close, locked, 0, 0, 0, 0); /* the DM reads EOF: its keeper is locked down */

    /* jail._KEEPER_WAITS, passed by daemon/keeper.py at build time; the parent blocked them before its fork. */
    unsigned long waits = KEEPER_WAITS;
    long me = sys6(SYS_getpid, 0, 0, 0, 0, 0);
    for (;;) {
        unsigned char info[128];
        long sig = sys6(SYS_rt_sigtimedwait, (long)&waits, (long)info, 0, 8, 0);
        if (sig == -EINTR)
            continue;
        if (sig < 0)
            die(1);
        if (sig != SIGCHLD) {
            sys6(SYS_kill, child, sig, 0, 0, 0);
            continue;
        }
        int wstatus = 0;
        long pid = sys6(SYS_wait4, child, (long)&wstatus, WNOHANG, 0, 0);
        if (pid != child)
            continue;
        int termsig = wstatus & 0x7f;
        if (termsig == 0)
            die((wstatus >> 8) & 0xff);
        if (termsig == 0x7f)
            continue; /* stopped: not an exit (wait4 without WUNTRACED does not report it anyway) */
        if (termsig != SIGKILL && termsig != SIGSTOP) {
            struct ksigaction dfl = {0, 0, 0, 0};
            sys6(SYS_rt_sigaction, termsig, (long)&dfl, 0, 8, 0);
        }
        unsigned long one = 1UL << (termsig - 1);
        sys6(SYS_rt_sigprocmask, SIG_UNBLOCK, (long)&one, 0, 8, 0);
        sys6(SYS_kill, me, termsig, 0, 0, 0);
        die(128 + termsig); /* the signal did not end us (it cannot fail to, but never return into nothing) */
    }
}

__asm__(".globl _start\n"
        "_start:\n"
        "  mov %rsp, %rdi\n"
        "  and $-16, %rsp\n"
        "  call keeper_main\n"
        "  hlt\n");
