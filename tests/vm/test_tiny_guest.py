# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""End-to-end tests of the tiny real guest (tiny_guest.py): real kernel, real QEMU, real qemu-ga.

Run: .venv/bin/pytest tests/vm -v
Cache: $VMSNAP_GUEST_CACHE or ~/.cache/vmsnap.qemu/guest; the first run downloads ~33 MB of .debs.
"""

from __future__ import annotations

import gzip
import os
import subprocess
import time
from pathlib import Path

import pytest
from conftest import BOOT_TIMEOUT, cache_dir
from tiny_guest import GuestImage, GuestVM, build_tiny_guest


def _qemu_img_check(disk: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["qemu-img", "check", "-f", "qcow2", str(disk)], capture_output=True, text=True, check=False, timeout=60
    )


def _newc_members(initrd: Path) -> set[str]:
    """Member names of a gzip'd cpio "newc" archive (parsed here: no host cpio needed)."""
    data = gzip.decompress(initrd.read_bytes())
    names: set[str] = set()
    pos = 0
    while True:
        header = data[pos : pos + 110]
        assert header[:6] == b"070701", f"bad newc magic at {pos}"
        fields = [int(header[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        filesize, namesize = fields[6], fields[11]
        name = data[pos + 110 : pos + 110 + namesize - 1].decode()
        if name == "TRAILER!!!":
            return names
        names.add(name)
        pos = (pos + 110 + namesize + 3) & ~3
        pos = (pos + filesize + 3) & ~3


def test_build_is_cached_and_complete(guest_image: GuestImage) -> None:
    assert guest_image.kernel.is_file() and guest_image.kernel.stat().st_size > 5_000_000
    assert guest_image.initrd.is_file() and guest_image.initrd.stat().st_size > 1_000_000
    mtimes = (guest_image.kernel.stat().st_mtime_ns, guest_image.initrd.stat().st_mtime_ns)
    again = build_tiny_guest(cache_dir())
    assert again == guest_image
    assert (again.kernel.stat().st_mtime_ns, again.initrd.stat().st_mtime_ns) == mtimes  # reused, not rebuilt
    members = _newc_members(guest_image.initrd)
    for name in ("init", "bin/busybox", "bin/sh", "usr/sbin/qemu-ga", "lib64/ld-linux-x86-64.so.2"):
        assert name in members, name
    for module in ("virtio_pci", "virtio_blk", "virtio_console"):
        assert f"lib/modules/{module}.ko" in members, module
    assert any(n.startswith("lib/x86_64-linux-gnu/libglib-2.0.so") for n in members)


def test_shell_runs_commands_and_reports_status(vm: GuestVM) -> None:
    assert vm.pid > 0
    assert vm.qmp_socket.exists() and vm.qga_socket.exists()
    assert vm.run("echo hello") == (0, "hello\n")
    rc, out = vm.run("echo oops >&2; exit 7")
    assert (rc, out) == (7, "oops\n")
    rc, out = vm.run("grep ' /mnt/data ' /proc/mounts")
    assert rc == 0 and out.startswith("/dev/vda /mnt/data ext4 rw"), out
    assert vm.poweroff() == 0


def test_write_and_read_back(vm: GuestVM) -> None:
    rc, out = vm.run("echo payload-v1 > /mnt/data/hello.txt && sync && echo 3 > /proc/sys/vm/drop_caches")
    assert rc == 0, out
    assert vm.run("cat /mnt/data/hello.txt") == (0, "payload-v1\n")
    rc, out = vm.run("dd if=/dev/urandom of=/mnt/data/blob bs=64k count=16 2>/dev/null && md5sum /mnt/data/blob")
    assert rc == 0, out
    digest = out.split()[0]
    assert vm.run("sync; echo 3 > /proc/sys/vm/drop_caches; md5sum /mnt/data/blob") == (
        0,
        f"{digest}  /mnt/data/blob\n",
    )
    assert vm.poweroff() == 0


def test_agent_ping_and_fsfreeze(vm: GuestVM) -> None:
    assert vm.agent("guest-ping") == {"return": {}}
    assert vm.agent("guest-fsfreeze-status") == {"return": "thawed"}
    frozen = vm.agent("guest-fsfreeze-freeze")
    assert frozen == {"return": 1}, frozen  # exactly /dev/vda on /mnt/data
    assert vm.agent("guest-fsfreeze-status") == {"return": "frozen"}
    assert vm.agent("guest-fsfreeze-thaw") == {"return": 1}
    assert vm.agent("guest-fsfreeze-status") == {"return": "thawed"}
    rc, out = vm.run("echo after-thaw > /mnt/data/t && cat /mnt/data/t")
    assert (rc, out) == (0, "after-thaw\n")
    assert vm.poweroff() == 0


def test_clean_poweroff_leaves_clean_disk(vm: GuestVM, disk: Path, tmp_path: Path) -> None:
    rc, out = vm.run("echo persisted > /mnt/data/persist.txt")
    assert rc == 0, out
    pid = vm.pid
    started = time.monotonic()
    assert vm.poweroff(timeout=30) == 0
    assert time.monotonic() - started < 30
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # QEMU is gone (reaped by poweroff's wait)
    check = _qemu_img_check(disk)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "No errors were found on the image." in check.stdout
    # the file really reached the image: read it from the host with e2fsprogs
    raw = tmp_path / "data.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(disk), str(raw)], check=True, timeout=60)
    fsck = subprocess.run(["e2fsck", "-fn", str(raw)], capture_output=True, text=True, check=False, timeout=60)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    cat = subprocess.run(
        ["debugfs", "-R", "cat /persist.txt", str(raw)], capture_output=True, text=True, check=True, timeout=60
    )
    assert cat.stdout == "persisted\n"


def test_exit_kills_a_running_guest(guest_image: GuestImage, disk: Path, tmp_path: Path) -> None:
    with GuestVM(guest_image, [disk], tmp_path / "vm") as guest:
        guest.wait_ready(BOOT_TIMEOUT)
        pid = guest.pid
        os.kill(pid, 0)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
