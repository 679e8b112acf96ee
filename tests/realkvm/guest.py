"""The Linux guest of the realkvm tests: Debian's cloud kernel, unmodified, with the busybox initramfs of
tests.fixtures.linux_guest plus iperf3, and one /test.sh that exercises every kvmdm device with Linux's own
drivers. What it does is chosen on the kernel command line (``lane.mode=``), so one initramfs serves every test:

* ``full``: nproc, /dev/hwrng, hvc0, then per disk (vda, vdb): md5 of what the host wrote at MiB 1, and a
  pattern written to MiB 0 with O_SYNC, caches dropped, read back; per nic (eth0, eth1: 10.77.N.15/24): ping
  and iperf3 both ways against the peer at 10.77.N.1. Results are ``CHK key=value`` lines; the host asserts them.
* ``reboot``: the first boot marks vda and reboots (``reboot -f``: ACPI reset register, then the PC's fallbacks);
  the second boot finds the mark and powers off.

Then the init prints ``GUEST-EXIT rc=N`` and powers off (ACPI S5).
"""

from __future__ import annotations

from pathlib import Path

from tests.fixtures.linux_guest import build_linux_guest, require_linux_guest

MIB = 1 << 20
NICS = ("eth0", "eth1")
DISKS = ("vda", "vdb")
IPERF_SECONDS = 2
BINARIES = ("iperf3",)

SCRIPT = r"""
set -o pipefail
mode=$(sed -n 's/.*lane\.mode=\([a-z]*\).*/\1/p' /proc/cmdline)
echo "CHK mode=$mode"
case "$mode" in
full)
  echo "CHK nproc=$(nproc)"
  echo "CHK hwrng=$(cat /sys/class/misc/hw_random/rng_current 2>&1)"
  echo "CHK hwrng_bytes=$(dd if=/dev/hwrng bs=64 count=1 2>/dev/null | wc -c)"
  echo "hello from hvc0" > /dev/hvc0; echo "CHK hvc0_write=$?"
  for d in @DISKS@; do
    echo "CHK ${d}_host_md5=$(dd if=/dev/$d bs=65536 skip=16 count=16 2>/dev/null | md5sum | cut -d' ' -f1)"
    yes "kvmdm lane $d pattern" | head -c 1048576 > /tmp/p
    dd if=/tmp/p of=/dev/$d bs=65536 conv=fsync 2>/tmp/dd; echo "CHK ${d}_write=$?"; grep -v records /tmp/dd
    sync; echo 3 > /proc/sys/vm/drop_caches
    echo "CHK ${d}_write_md5=$(md5sum < /tmp/p | cut -d' ' -f1)"
    echo "CHK ${d}_read_md5=$(dd if=/dev/$d bs=65536 count=16 2>/dev/null | md5sum | cut -d' ' -f1)"
  done
  i=0
  for n in @NICS@; do
    ip link set $n up && ip addr add 10.77.$i.15/24 dev $n
    ping -c 3 -W 10 10.77.$i.1 > /tmp/ping 2>&1; echo "CHK ${n}_ping=$?"; tail -2 /tmp/ping
    iperf3 -c 10.77.$i.1 -t @SECS@ -f m > /tmp/ip 2>&1; echo "CHK ${n}_iperf_tx=$?"; tail -4 /tmp/ip
    iperf3 -R -c 10.77.$i.1 -t @SECS@ -f m > /tmp/ip 2>&1; echo "CHK ${n}_iperf_rx=$?"; tail -4 /tmp/ip
    i=$((i+1))
  done
  ;;
reboot)
  if [ "$(dd if=/dev/vda bs=8 count=1 2>/dev/null)" = "REBOOTED" ]; then
    echo "CHK boot=second"
  else
    echo "CHK boot=first"
    printf REBOOTED | dd of=/dev/vda conv=fsync 2>/dev/null; sync
    reboot -f
    sleep 30
  fi
  ;;
esac
""".replace("@DISKS@", " ".join(DISKS)).replace("@NICS@", " ".join(NICS)).replace("@SECS@", str(IPERF_SECONDS))


def build(out_dir: Path) -> tuple[Path, Path]:
    """(vmlinuz, initrd.gz) for the tests (cached: the lane builds them on the host before L1 boots)."""
    return build_linux_guest(out_dir, SCRIPT, BINARIES)


def require(out_dir: Path) -> tuple[Path, Path]:
    return require_linux_guest(out_dir, SCRIPT, BINARIES)


def checks(console: str) -> dict[str, str]:
    """The guest's ``CHK key=value`` results (the last value of a key wins)."""
    out: dict[str, str] = {}
    for line in console.splitlines():
        idx = line.find("CHK ")
        if idx >= 0:
            key, _, value = line[idx + 4:].strip().partition("=")
            out[key] = value
    return out


def host_pattern(seed: int) -> bytes:
    """1 MiB the host writes at MiB 1 of a disk image before boot (the guest reports its md5)."""
    import random

    return random.Random(seed).randbytes(MIB)


def make_image(path: Path, seed: int, mib: int = 8) -> bytes:
    with open(path, "wb") as f:
        f.truncate(mib * MIB)
        f.seek(MIB)
        data = host_pattern(seed)
        f.write(data)
    return data


def expected_write(disk: str) -> bytes:
    line = f"kvmdm lane {disk} pattern\n".encode()
    return (line * (MIB // len(line) + 1))[:MIB]
