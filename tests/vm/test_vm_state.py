# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""vmsnap.qemu.qmp_vm_state and external checkpoints with RAM, against a real running Linux guest, through ansible.

A state is saved, QEMU quits, a fresh QEMU is started with -incoming defer, the state is restored, and the same
guest goes on: its shell answers, its tmpfs (RAM only) holds what it held. Every refusal of a restore is checked
with the waiting QEMU still alive afterwards.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import typing as t
from pathlib import Path

import pytest
from conftest import BOOT_TIMEOUT, REPO, guest_ok, read_fresh, run_module
from tiny_guest import GuestImage, GuestVM, make_ext4_qcow2

sys.path.insert(0, os.environ.get("ANSIBLE_COLLECTIONS_PATH", str(REPO / "build" / "src")).split(os.pathsep)[0])
from ansible_collections.vmsnap.qemu.plugins.module_utils._qmp import QmpClient, QmpConnectionError  # noqa: E402

STATE = "vmsnap.qemu.qmp_vm_state"
LIVE = "vmsnap.qemu.qmp_live_snapshot"
MEMORY_MIB = 128


def blank_qcow2(path: Path, size: str = "8M") -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True, timeout=60)
    return path


def boot(image: GuestImage, disks: list[Path], work: Path, memory_mib: int = MEMORY_MIB) -> GuestVM:
    guest = GuestVM(image, disks, work, memory_mib=memory_mib).start()
    guest.wait_ready(BOOT_TIMEOUT)
    return guest


def waiting(image: GuestImage, disks: list[Path], work: Path, memory_mib: int = MEMORY_MIB) -> GuestVM:
    """A fresh QEMU with the guest's command line plus -incoming defer: it waits for a state."""
    guest = GuestVM(image, disks, work, memory_mib=memory_mib, extra_args=["-incoming", "defer"]).start()
    deadline = time.monotonic() + 30
    while True:
        assert guest.returncode is None and time.monotonic() < deadline, "the waiting QEMU did not start"
        # The socket file appears at bind(), a moment before QEMU listens: until then a connection is refused.
        with contextlib.suppress(QmpConnectionError):
            assert vm_status(guest) == "inmigrate"
            return guest
        time.sleep(0.05)


def vm_status(guest: GuestVM) -> str:
    with QmpClient(str(guest.qmp_socket)) as qmp:
        return str(qmp.execute("query-status")["status"])


def quit_vm(guest: GuestVM) -> None:
    with QmpClient(str(guest.qmp_socket)) as qmp:
        qmp.execute("quit")
    guest._proc.wait(timeout=30)  # noqa: SLF001 - the fixture's own process
    guest.close()


def suspended(image: GuestImage, disks: list[Path], tmp_path: Path) -> Path:
    """Boot the guest, save its state with after=quit; returns the state file once QEMU has exited."""
    state = tmp_path / "vm.vmstate"
    guest = boot(image, disks, tmp_path / "vm")
    try:
        saved = run_module(STATE, socket=str(guest.qmp_socket), path=str(state), after="quit")
        assert not saved["failed"] and saved["vm_status"] is None, saved
        guest._proc.wait(timeout=30)  # noqa: SLF001 - QEMU quit by itself
    finally:
        guest.close()
    return state


def restored_guest(guest: GuestVM) -> GuestVM:
    guest.attach_restored(timeout=30)
    return guest


def checksum(guest: GuestVM, path: str) -> str:
    return guest_ok(guest, f"md5sum {path}").split()[0]


def fill_tmpfs(guest: GuestVM, mib: int = 16) -> str:
    """Random data that lives only in the guest's RAM."""
    guest_ok(guest, f"dd if=/dev/urandom of=/run/blob bs=1M count={mib} 2>/dev/null")
    return checksum(guest, "/run/blob")


def four_runs(module: str, expect_change: bool = True, **args: t.Any) -> dict[str, t.Any]:
    """Check mode, real run, repeat (unchanged), repeat in check mode. Returns the real run's result."""
    checked = run_module(module, check=True, diff=True, **args)
    assert not checked["failed"], checked
    assert checked["changed"] is expect_change, checked
    real = run_module(module, **args)
    assert not real["failed"], real
    assert real["changed"] is expect_change, real
    for check in (False, True):
        again = run_module(module, check=check, **args)
        assert not again["failed"], again
        assert again["changed"] is False, again
    return real


@pytest.fixture
def two_disks(tmp_path: Path) -> list[Path]:
    return [make_ext4_qcow2(tmp_path / "data.qcow2", size_mib=64), blank_qcow2(tmp_path / "extra.qcow2")]


@pytest.mark.parametrize(("live", "compress"), [(True, False), (False, True)])
def test_saved_quit_restored_guest_goes_on(
    guest_image: GuestImage, two_disks: list[Path], tmp_path: Path, live: bool, compress: bool
) -> None:
    state = tmp_path / "states" / "vm.vmstate"
    state.parent.mkdir()
    guest = boot(guest_image, two_disks, tmp_path / "vm")
    try:
        blob = fill_tmpfs(guest)
        guest_ok(guest, "echo 'shell state before' > /run/in-ram.txt")
        before_disk = checksum(guest, "/run/blob")
        assert before_disk == blob
        checked = run_module(STATE, check=True, diff=True, socket=str(guest.qmp_socket), path=str(state))
        assert checked["changed"] and not checked["failed"], checked
        assert not state.exists() and list(state.parent.iterdir()) == []
        saved = run_module(STATE, socket=str(guest.qmp_socket), path=str(state), live=live, compress=compress)
        assert not saved["failed"] and saved["changed"], saved
        assert saved["vm_status"] == "running"
        assert state.is_file() and (state.stat().st_mode & 0o777) == 0o600
        sidecar_file = Path(str(state) + ".json")
        assert (sidecar_file.stat().st_mode & 0o777) == 0o600
        sidecar = saved["sidecar"]
        assert sidecar["size"] == state.stat().st_size == saved["size"]
        assert sidecar["ram_size"] == MEMORY_MIB * 1024 * 1024
        assert sidecar["compression"] == ("gzip" if compress else None) and sidecar["live"] is live
        assert [disk["file"] for disk in sidecar["disks"]] == [str(disk) for disk in two_disks]
        assert sidecar["cmdline"][0].endswith("qemu-system-x86_64")
        assert sidecar["machine"].startswith("pc-q35-")
        assert state.read_bytes()[: 2 if compress else 4] == (b"\x1f\x8b" if compress else b"QEVM")
        assert sorted(p.name for p in state.parent.iterdir()) == ["vm.vmstate", "vm.vmstate.json"]
        if live:
            assert 0 < saved["downtime_ms"] < 2000, saved  # the guest ran on while its RAM was written
        else:
            assert saved["downtime_ms"] >= 0 and saved["elapsed_ms"] > 0
        # The guest still runs after the save, and a repeat changes nothing.
        assert guest_ok(guest, "echo alive") == "alive\n"
        for check in (False, True):
            again = run_module(STATE, check=check, socket=str(guest.qmp_socket), path=str(state))
            assert not again["failed"] and not again["changed"], again
        # What the guest does after the save is not in the state.
        guest_ok(guest, "echo 'shell state after' > /run/in-ram.txt; dd if=/dev/urandom of=/run/blob bs=1M count=1")
        quit_vm(guest)

        guest = waiting(guest_image, two_disks, tmp_path / "vm")
        restored = four_runs(STATE, socket=str(guest.qmp_socket), path=str(state), state="restored")
        assert restored["vm_status"] == "running"
        restored_guest(guest)
        assert guest_ok(guest, "echo alive") == "alive\n"
        assert guest_ok(guest, "cat /run/in-ram.txt") == "shell state before\n"
        assert checksum(guest, "/run/blob") == blob
        assert guest.poweroff() == 0
    finally:
        guest.close()


def test_saved_after_quit_suspends_to_disk_and_absent_removes_both(
    guest_image: GuestImage, disk: Path, tmp_path: Path
) -> None:
    state = tmp_path / "suspended.vmstate"
    guest = boot(guest_image, [disk], tmp_path / "vm")
    try:
        blob = fill_tmpfs(guest, 4)
        saved = run_module(STATE, socket=str(guest.qmp_socket), path=str(state), after="quit")
        assert not saved["failed"] and saved["changed"] and saved["vm_status"] is None, saved
        guest._proc.wait(timeout=30)  # noqa: SLF001 - QEMU quit by itself
        guest.close()
        guest = waiting(guest_image, [disk], tmp_path / "vm")
        paused = run_module(STATE, socket=str(guest.qmp_socket), path=str(state), state="restored", after="paused")
        assert not paused["failed"] and paused["changed"] and paused["vm_status"] == "paused", paused
        # A second restored into the same QEMU: the state is in; only the run state is brought to `after`.
        resumed = run_module(STATE, socket=str(guest.qmp_socket), path=str(state), state="restored")
        assert not resumed["failed"] and resumed["changed"] and resumed["vm_status"] == "running", resumed
        assert "already restored" in resumed["msg"]
        restored_guest(guest)
        assert checksum(guest, "/run/blob") == blob
    finally:
        guest.close()
    four_runs(STATE, path=str(state), state="absent")
    assert not state.exists() and not Path(str(state) + ".json").exists()


@pytest.fixture(scope="module")
def saved_two_disks(guest_image: GuestImage, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """One state of a two-disk guest (QEMU quit), shared by the refusal cases: each copies the state file."""
    folder = tmp_path_factory.mktemp("saved-two-disks")
    disks = [make_ext4_qcow2(folder / "data.qcow2", size_mib=64), blank_qcow2(folder / "extra.qcow2")]
    return suspended(guest_image, disks, folder), disks


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("a disk fewer", "of the saved VM is missing in the waiting QEMU"),
        ("a disk more", "that the saved VM did not have"),
        ("two disks swapped", "saved with"),
        ("other RAM size", "RAM size: saved 134217728 bytes, the waiting QEMU has 268435456 bytes"),
        ("a damaged file", "is damaged or was replaced"),
        ("a truncated file", "is damaged or was replaced"),
        ("no sidecar", "has no sidecar"),
    ],
)
def test_restore_refusals_keep_the_waiting_qemu_alive(
    guest_image: GuestImage, saved_two_disks: tuple[Path, list[Path]], tmp_path: Path, case: str, expected: str
) -> None:
    saved, two_disks = saved_two_disks
    state = tmp_path / saved.name
    shutil.copyfile(saved, state)
    shutil.copyfile(str(saved) + ".json", str(state) + ".json")
    disks, memory = list(two_disks), MEMORY_MIB
    if case == "a disk fewer":
        disks = disks[:1]
    elif case == "a disk more":
        disks.append(blank_qcow2(tmp_path / "third.qcow2"))
    elif case == "two disks swapped":
        disks.reverse()
    elif case == "other RAM size":
        memory = 2 * MEMORY_MIB
    elif case == "a damaged file":
        with open(state, "r+b") as damaged:
            damaged.seek(state.stat().st_size // 2)
            byte = damaged.read(1)
            damaged.seek(-1, os.SEEK_CUR)
            damaged.write(bytes([byte[0] ^ 0xFF]))
    elif case == "a truncated file":
        os.truncate(state, state.stat().st_size // 2)
    elif case == "no sidecar":
        Path(str(state) + ".json").unlink()
    before = [hashlib.sha256(path.read_bytes()).hexdigest() for path in (state, *two_disks)]
    guest = waiting(guest_image, disks, tmp_path / "vm", memory_mib=memory)
    try:
        refused = run_module(STATE, socket=str(guest.qmp_socket), path=str(state), state="restored")
        assert refused["failed"] and not refused["changed"], refused
        assert expected in refused["msg"], refused["msg"]
        time.sleep(0.5)  # QEMU 7.2 exits ~0.2 s after a load it cannot use: it must not have been given one
        assert guest.returncode is None, "the waiting QEMU exited"
        assert vm_status(guest) == "inmigrate"
    finally:
        guest.close()
    assert [hashlib.sha256(path.read_bytes()).hexdigest() for path in (state, *two_disks)] == before


def test_full_file_system_is_refused_before_the_save(guest_image: GuestImage, disk: Path, tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(small)], check=True, timeout=30)
    guest = boot(guest_image, [disk], tmp_path / "vm")
    try:
        refused = run_module(STATE, socket=str(guest.qmp_socket), path=str(small / "vm.vmstate"))
        assert refused["failed"] and not refused["changed"], refused
        assert "Not enough space for the state file" in refused["msg"], refused["msg"]
        assert refused["needed_bytes"] > MEMORY_MIB * 1024 * 1024 and refused["free_bytes"] <= 16 * 1024 * 1024
        assert list(small.iterdir()) == []
        assert vm_status(guest) == "running"
        assert guest_ok(guest, "echo alive") == "alive\n"
        with QmpClient(str(guest.qmp_socket)) as qmp:
            caps = {c["capability"]: c["state"] for c in qmp.execute("query-migrate-capabilities")}
        assert caps["background-snapshot"] is False
    finally:
        guest.close()
        subprocess.run(["umount", str(small)], check=False, timeout=30)


def test_bad_input(guest_image: GuestImage, disk: Path, tmp_path: Path) -> None:
    guest = boot(guest_image, [disk], tmp_path / "vm")
    try:
        sock = str(guest.qmp_socket)
        cases = [
            ({"socket": sock, "path": "relative.vmstate"}, "is relative"),
            ({"socket": sock, "path": "json:{}"}, "pseudo-path"),
            ({"socket": sock, "path": str(tmp_path / "missing" / "x.vmstate")}, "does not exist"),
            ({"socket": sock, "path": str(tmp_path)}, "is a folder"),
            ({"socket": sock, "path": str(disk)}, "has no sidecar"),
            ({"socket": sock, "path": str(tmp_path / "x.vmstate"), "state": "restored"}, "does not exist"),
            ({"socket": sock, "path": str(disk), "state": "absent"}, "not a QEMU state stream"),
            ({"socket": sock, "path": str(tmp_path / "x"), "state": "restored", "after": "quit"}, "after=quit"),
            ({"socket": str(tmp_path / "nope.sock"), "path": str(tmp_path / "x.vmstate")}, "does not exist"),
            ({"path": str(tmp_path / "x.vmstate")}, "socket"),
            ({"socket": sock, "path": str(tmp_path / "x.vmstate"), "timeout": 0}, "positive"),
        ]
        image_before = disk.read_bytes()
        for args, message in cases:
            failed = run_module(STATE, **args)
            assert failed["failed"] and not failed["changed"], (args, failed)
            assert message in failed["msg"], (args, failed["msg"])
        # The running VM cannot be restored into.
        (tmp_path / "x.vmstate").write_bytes(b"QEVM")
        failed = run_module(STATE, socket=sock, path=str(tmp_path / "x.vmstate"), state="restored")
        assert failed["failed"] and "has no sidecar" in failed["msg"], failed
        assert vm_status(guest) == "running"
    finally:
        guest.close()
    assert disk.read_bytes() == image_before


@pytest.mark.parametrize("moment", ["while QEMU writes", "while the module compresses"])
def test_killed_live_save_leaves_nothing_complete_and_the_next_run_succeeds(
    guest_image: GuestImage, disk: Path, tmp_path: Path, moment: str
) -> None:
    state = tmp_path / "states" / "vm.vmstate"
    state.parent.mkdir()
    guest = boot(guest_image, [disk], tmp_path / "vm", memory_mib=384)
    try:
        # Enough random RAM that writing it takes a while (a tmpfs of its own: /run is small).
        guest_ok(guest, "mkdir /fill && mount -t tmpfs -o size=200m tmpfs /fill")
        guest_ok(guest, "dd if=/dev/urandom of=/fill/blob bs=1M count=160 2>/dev/null")
        env = dict(os.environ, ANSIBLE_LOCALHOST_WARNING="0")
        env.setdefault("ANSIBLE_COLLECTIONS_PATH", str(REPO / "build" / "src"))
        ansible = REPO / ".venv" / "bin" / "ansible"
        args = f'{{"socket": "{guest.qmp_socket}", "path": "{state}", "compress": true}}'
        proc = subprocess.Popen(
            [str(ansible), "localhost", "-c", "local", "-m", STATE, "-a", args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 120
        while not any(started_writing(p) for p in state.parent.iterdir()):
            assert proc.poll() is None and time.monotonic() < deadline, "the save never started"
            time.sleep(0.002)
        if moment == "while QEMU writes":
            time.sleep(0.05)
        else:  # the gzip copy is a second temporary file beside the first
            while sum(".vmsnap-tmp-" in p.name for p in state.parent.iterdir()) < 2:
                assert proc.poll() is None and time.monotonic() < deadline, "the compression never started"
                time.sleep(0.002)
        modules = [pid for pid in descendants(proc.pid) if b"AnsiballZ_qmp_vm_state" in cmdline(pid)]
        assert modules, "the module process was not found"
        for pid in modules:  # the module runs in a session of its own, under ansible's
            os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=60)
        assert not any(pid_alive(pid) for pid in modules)
        # The VM runs on, and nothing at the state file's name looks complete.
        assert vm_status(guest) == "running"
        assert not state.exists() and not Path(str(state) + ".json").exists()
        assert all(p.name.startswith(".vm.vmstate.vmsnap-tmp-") for p in state.parent.iterdir())
        again = run_module(STATE, socket=str(guest.qmp_socket), path=str(state), compress=True)
        assert not again["failed"] and again["changed"], again
        assert sorted(p.name for p in state.parent.iterdir()) == ["vm.vmstate", "vm.vmstate.json"]
        with QmpClient(str(guest.qmp_socket)) as qmp:
            caps = {c["capability"]: c["state"] for c in qmp.execute("query-migrate-capabilities")}
        assert caps["background-snapshot"] is False
        assert guest_ok(guest, "echo alive") == "alive\n"
    finally:
        guest.close()


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def descendants(root: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, frontier = [], [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent]
        found += children
        frontier += children
    return found


def started_writing(path: Path) -> bool:
    """A temporary state file that QEMU has begun to write (its space is reserved, so its size says nothing)."""
    if ".vmsnap-tmp-" not in path.name:
        return False
    try:
        with open(path, "rb") as temp:
            return temp.read(4) == b"QEVM"
    except OSError:
        return False


COUNTER_LOOP = (
    "( i=0; while [ ! -e /run/stop ]; do i=$((i+1)); printf 'VMSNAPCOUNT%08d\\n' $i > /run/count; "
    "printf 'VMSNAPCOUNT%08d\\n' $i | dd of=/dev/vdb bs=512 count=1 conv=sync,fsync 2>/dev/null; done ) "
    "</dev/null >/dev/null 2>&1 &"
)
COUNT = re.compile(rb"VMSNAPCOUNT(\d{8})\n")


def disk_count(image: Path) -> int:
    """The counter in the first sector of the raw counter disk, read offline (shared lock: QEMU may hold it)."""
    raw = subprocess.run(
        ["qemu-io", "-r", "-U", "-f", "qcow2", "-c", "read -v 0 32", str(image)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    text = b"".join(bytes.fromhex("".join(line.split(":", 1)[1].split()[:16])) for line in raw.splitlines()[:2])
    match = COUNT.match(text)
    assert match, f"no counter in {image}: {text!r}"
    return int(match.group(1))


def count_in_guest(guest: GuestVM) -> int:
    return int(guest_ok(guest, "cat /run/count")[len("VMSNAPCOUNT") :])


def ram_count(state_file: Path) -> int:
    """The newest counter value anywhere in the saved RAM (older copies linger in freed pages)."""
    return max(int(value) for value in COUNT.findall(state_file.read_bytes()))


def test_external_checkpoint_with_ram_rolls_back_disks_and_ram_of_one_instant(
    guest_image: GuestImage, two_disks: list[Path], tmp_path: Path
) -> None:
    data, counter = two_disks
    guest = boot(guest_image, two_disks, tmp_path / "vm")
    try:
        guest_ok(guest, "echo before > /mnt/data/before.txt; sync")
        blob = fill_tmpfs(guest)
        guest_ok(guest, COUNTER_LOOP)
        time.sleep(1.0)
        ckpt = run_module(
            LIVE, socket=str(guest.qmp_socket), name="ckpt", mode="external", vmstate=True, overlay_dir=str(tmp_path)
        )
        assert not ckpt["failed"] and ckpt["changed"], ckpt
        assert 0 < ckpt["downtime_ms"] < 2000, ckpt
        state = Path(ckpt["vmstate_file"])
        assert state == tmp_path / "data.vmsnap-ckpt.vmstate" and state.is_file()
        assert ckpt["vmstate"]["with_overlays"] and ckpt["base_images"] == {
            "disk0": str(data),
            "disk1": str(counter),
        }
        overlays = [Path(device["overlay"]) for device in ckpt["devices"]]
        assert [p.name for p in overlays] == ["data.vmsnap-ckpt.qcow2", "extra.vmsnap-ckpt.qcow2"]
        # Disks and RAM of the same instant: the counter on the base disk and in the saved RAM agree.
        on_disk, in_ram = disk_count(counter), ram_count(state)
        assert on_disk > 5, "the counter loop did not run"
        assert in_ram - on_disk in (0, 1), f"disk counter {on_disk}, RAM counter {in_ram}"
        # Repeats change nothing; the checkpoint with RAM is complete.
        for check in (False, True):
            again = run_module(
                LIVE, check=check, socket=str(guest.qmp_socket), name="ckpt", mode="external", vmstate=True
            )
            assert not again["failed"] and not again["changed"], again
        # The "upgrade": new files and a changed tmpfs.
        guest_ok(guest, "echo broken > /mnt/data/after.txt; sync; dd if=/dev/urandom of=/run/blob bs=1M count=2")
        quit_vm(guest)

        # Roll back: drop the overlays, restore into a QEMU on the base images, new overlays, then run.
        for overlay in overlays:
            overlay.unlink()
        guest = waiting(guest_image, two_disks, tmp_path / "vm")
        paused = run_module(STATE, socket=str(guest.qmp_socket), path=str(state), state="restored", after="paused")
        assert not paused["failed"] and paused["vm_status"] == "paused", paused
        renewed = run_module(
            LIVE, socket=str(guest.qmp_socket), name="ckpt", mode="external", overlay_dir=str(tmp_path)
        )
        assert not renewed["failed"] and renewed["changed"], renewed
        assert [Path(device["overlay"]) for device in renewed["devices"]] == overlays
        resumed = run_module(STATE, socket=str(guest.qmp_socket), path=str(state), state="restored")
        assert not resumed["failed"] and resumed["vm_status"] == "running", resumed
        restored_guest(guest)
        # The counter goes on from the checkpoint's value (not from 0). Its loop may be in the middle of a step (an
        # fsynced write) when the guest runs again: wait for its next step before stopping it.
        assert count_in_guest(guest) >= on_disk
        deadline = time.monotonic() + 20
        while count_in_guest(guest) <= in_ram:
            assert time.monotonic() < deadline, f"the counter did not go on from {in_ram} after the restore"
            time.sleep(0.2)
        guest_ok(guest, "touch /run/stop; sleep 1")
        assert checksum(guest, "/run/blob") == blob
        assert read_fresh(guest, "/mnt/data/before.txt") == "before\n"
        rc, out = guest.run("cat /mnt/data/after.txt")
        assert rc != 0, out
        # The counter resumed from the checkpoint's value, on disk as in RAM.
        assert count_in_guest(guest) > in_ram

        # The checkpoint is still usable: the base images were not written since.
        assert disk_count(counter) == on_disk
        # Release: the new overlays are merged back (keeping what the guest wrote since), the state file goes.
        guest_ok(guest, "echo kept > /mnt/data/kept.txt; sync")
        released = run_module(
            LIVE, socket=str(guest.qmp_socket), name="ckpt", mode="external", state="absent", overlay_dir=str(tmp_path)
        )
        assert not released["failed"] and released["changed"], released
        assert not state.exists() and not Path(str(state) + ".json").exists()
        assert not any(overlay.exists() for overlay in overlays)
        assert read_fresh(guest, "/mnt/data/kept.txt") == "kept\n"
        assert guest.poweroff() == 0
    finally:
        guest.close()


def test_a_state_qemu_cannot_load_is_reported_with_what_qemu_did(
    guest_image: GuestImage, disk: Path, tmp_path: Path
) -> None:
    """A file damaged before its sidecar was written (so the checksum cannot catch it): QEMU 7.2 exits."""
    state = suspended(guest_image, [disk], tmp_path)
    os.truncate(state, state.stat().st_size // 2)
    sidecar_file = Path(str(state) + ".json")
    record = json.loads(sidecar_file.read_text())
    record.update(size=state.stat().st_size, sha256=hashlib.sha256(state.read_bytes()).hexdigest())
    sidecar_file.write_text(json.dumps(record))
    guest = waiting(guest_image, [disk], tmp_path / "vm")
    try:
        failed = run_module(STATE, socket=str(guest.qmp_socket), path=str(state), state="restored")
        assert failed["failed"] and failed["changed"], failed
        assert "QEMU exited while loading the state" in failed["msg"], failed["msg"]
        assert failed["qemu_exited"] is True
        guest._proc.wait(timeout=30)  # noqa: SLF001
        assert guest.returncode != 0
    finally:
        guest.close()


def test_guest_ram_in_a_regular_file_cannot_be_saved_live(tmp_path: Path) -> None:
    """QEMU refuses a background snapshot of file-backed RAM; the task says so and that live=false works."""
    sock = tmp_path / "qmp.sock"
    ram = tmp_path / "guest-ram"
    qemu = subprocess.Popen(
        ["qemu-system-x86_64", "-accel", "tcg", "-M", "q35", "-m", "64", "-nodefaults", "-display", "none",
         "-object", f"memory-backend-file,id=ram0,size=64M,mem-path={ram},share=on", "-machine", "memory-backend=ram0",
         "-qmp", f"unix:{sock},server=on,wait=off"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert qemu.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        state = tmp_path / "vm.vmstate"
        refused = run_module(STATE, socket=str(sock), path=str(state))
        assert refused["failed"] and not refused["changed"], refused
        assert "cannot take a background snapshot" in refused["msg"] and "live=false works" in refused["msg"]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["guest-ram", "qmp.sock"]
        plain = run_module(STATE, socket=str(sock), path=str(state), live=False)
        assert not plain["failed"] and plain["changed"] and plain["vm_status"] == "running", plain
    finally:
        qemu.kill()
        qemu.wait(timeout=30)
