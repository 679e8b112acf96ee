"""JailConfig validation: every refusal path, each before anything about the process changes."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from daemon.jail import JailConfig, JailConfigError, Rlimits, enter_jail

Make = Callable[..., JailConfig]


def test_defaults_are_the_production_jail(make_config: Make) -> None:
    cfg = make_config()
    assert cfg.seccomp == "dm" and cfg.pid_ns and not cfg.allow_net_ns
    assert cfg.rlimits.core == 0 and cfg.rlimits.fsize == 0
    cfg.validate_host()


@pytest.mark.parametrize("field", ["uid", "gid"])
def test_root_ids_are_refused(make_config: Make, field: str) -> None:
    with pytest.raises(JailConfigError, match="root"):
        make_config(**{field: 0})


@pytest.mark.parametrize("bad", [-1, 0xFFFFFFFF, 1 << 32, True, "65534", 1.5])
@pytest.mark.parametrize("field", ["uid", "gid"])
def test_out_of_range_or_non_int_ids_are_refused(make_config: Make, field: str, bad: object) -> None:
    with pytest.raises(JailConfigError):
        make_config(**{field: bad})


def test_relative_root_dir_is_refused() -> None:
    with pytest.raises(JailConfigError, match="absolute"):
        JailConfig(root_dir=Path("jail"), uid=65534, gid=65534)


@pytest.mark.parametrize("fds", [[-1], [3, 3], [True]])
def test_bad_keep_fds_are_refused(make_config: Make, fds: list[int]) -> None:
    with pytest.raises(JailConfigError, match="keep_fds"):
        make_config(keep_fds=fds)


def test_nofile_limit_must_exceed_the_largest_kept_fd(make_config: Make) -> None:
    with pytest.raises(JailConfigError, match="RLIMIT_NOFILE"):
        make_config(keep_fds=[64], rlimits=Rlimits(nofile=64))
    make_config(keep_fds=[63], rlimits=Rlimits(nofile=64))


def test_nproc_must_leave_room_for_keeper_and_dm(make_config: Make) -> None:
    with pytest.raises(JailConfigError, match="RLIMIT_NPROC"):
        make_config(rlimits=Rlimits(nproc=1))
    make_config(rlimits=Rlimits(nproc=1), pid_ns=False)
    make_config(rlimits=Rlimits(nproc=1), pid_ns_ready=True)  # no keeper: the DM is the uid's only task


def test_a_ready_pid_namespace_without_pid_ns_is_refused(make_config: Make) -> None:
    with pytest.raises(JailConfigError, match="pid_ns_ready without pid_ns"):
        make_config(pid_ns=False, pid_ns_ready=True)


def test_a_ready_pid_namespace_is_refused_unless_the_process_is_its_pid_1(make_config: Make) -> None:
    # The tests run in the host's pid namespace, where no process but init is pid 1: nothing was made for us.
    cfg = make_config(pid_ns_ready=True)
    with pytest.raises(JailConfigError, match=f"this process is pid {os.getpid()}, not pid 1"):
        cfg.validate_host()
    with pytest.raises(JailConfigError, match="not pid 1"):
        enter_jail(cfg)  # refused in step 0, before anything changed


def test_negative_rlimit_is_refused(make_config: Make) -> None:
    with pytest.raises(JailConfigError, match="RLIMIT_CORE"):
        make_config(rlimits=Rlimits(core=-1))


@pytest.mark.parametrize("name", ["nope", "keeper"])
def test_unknown_or_non_dm_seccomp_policy_is_refused(make_config: Make, name: str) -> None:
    with pytest.raises(JailConfigError, match="seccomp"):
        make_config(seccomp=name)


def test_cgroup_limits_need_a_cgroup_and_a_valid_format(make_config: Make, tmp_path: Path) -> None:
    with pytest.raises(JailConfigError, match="without a cgroup"):
        make_config(cgroup_memory_max=1 << 30)
    with pytest.raises(JailConfigError, match="cpu_max"):
        make_config(cgroup=tmp_path, cgroup_cpu_max="fast")
    with pytest.raises(JailConfigError, match="positive"):
        make_config(cgroup=tmp_path, cgroup_memory_max=0)
    with pytest.raises(JailConfigError, match="absolute"):
        make_config(cgroup=Path("kvmdm"))
    make_config(cgroup=tmp_path, cgroup_cpu_max="max 100000", cgroup_memory_max=1 << 30)


def test_tiny_tmpfs_and_bad_hostname_are_refused(make_config: Make) -> None:
    with pytest.raises(JailConfigError, match="tmpfs"):
        make_config(tmpfs_size=100)
    with pytest.raises(JailConfigError, match="hostname"):
        make_config(hostname="x" * 65)


def test_missing_root_dir_is_refused(make_config: Make, tmp_path: Path) -> None:
    with pytest.raises(JailConfigError, match="No such file"):
        make_config(root_dir=tmp_path / "missing").validate_host()


def test_root_dir_that_is_a_file_or_symlink_is_refused(make_config: Make, tmp_path: Path, jail_root: Path) -> None:
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(JailConfigError, match="not a directory"):
        make_config(root_dir=f).validate_host()
    link = tmp_path / "link"
    link.symlink_to(jail_root)
    with pytest.raises(JailConfigError, match="not a directory"):
        make_config(root_dir=link).validate_host()


def test_non_empty_root_dir_is_refused(make_config: Make, jail_root: Path) -> None:
    (jail_root / "x").write_text("")
    with pytest.raises(JailConfigError, match="not empty"):
        make_config().validate_host()


def test_world_writable_root_dir_is_refused(make_config: Make, jail_root: Path) -> None:
    os.chmod(jail_root, 0o777)
    with pytest.raises(JailConfigError, match="writable"):
        make_config().validate_host()


@pytest.mark.root
def test_root_dir_not_owned_by_root_is_refused(make_config: Make, jail_root: Path) -> None:
    os.chown(jail_root, 65534, 65534)
    with pytest.raises(JailConfigError, match="owned by uid 65534"):
        make_config().validate_host()


def test_kept_fd_that_is_not_open_is_refused(make_config: Make) -> None:
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(JailConfigError, match="not open"):
        make_config(keep_fds=[r]).validate_host()


def test_kept_directory_fd_is_refused(make_config: Make, tmp_path: Path) -> None:
    d = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(JailConfigError, match="directory"):
            make_config(keep_fds=[d]).validate_host()
    finally:
        os.close(d)


@pytest.mark.root
def test_enter_jail_refuses_a_multithreaded_process(make_config: Make) -> None:
    # In a fork: if the check were missing, the process running it would end up jailed.
    cfg = make_config()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        outcome = b"jailed"
        try:
            stop = threading.Event()
            threading.Thread(target=stop.wait, daemon=True).start()
            try:
                enter_jail(cfg)
            except JailConfigError as e:
                outcome = str(e).encode()
            stop.set()
            os.write(w, outcome)
        finally:
            os._exit(0)
    os.close(w)
    got = os.read(r, 4096)
    os.close(r)
    os.waitpid(pid, 0)
    assert b"single-threaded" in got
