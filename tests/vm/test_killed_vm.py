# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""SIGKILL of QEMU itself (not of the module) while a task works on it: during an internal snapshot with RAM and a
disk-only one, the overlay transaction of an external snapshot, an external merge (block-commit), a state save, an
external checkpoint with RAM and a live backup.

Each test runs the module as its own process against a real QEMU (no guest OS; its RAM is a /dev/shm file filled
with non-zero bytes so that saving it takes a while), watches what QEMU does to the files, and kills QEMU at a
seeded moment inside that window ($VMSNAP_KILL_SEED, default 11; the moment is printed). Steps that take QEMU only
milliseconds are cut by freezing QEMU (SIGSTOP) the moment a file changes, then killing it. Afterwards: the task
failed and says the VM died, every image passes `qemu-img check` (leaked clusters are repaired and reported), the
chain reads offline what was written before the kill, nothing half-written is presented as a finished state file
or backup, the offline modules finish the job, and a new QEMU on the same disks runs the task to its end.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import typing as t
from pathlib import Path

import pytest
from conftest import REPO
from fleet import NoOsVM, backing_file, snapshot_names

SEED = int(os.environ.get("VMSNAP_KILL_SEED", "11"))
OLD, NEW, FILL = 0xAA, 0xCC, 0x5C
MIB = 1024 * 1024
RAM_MIB = 256
COLLECTION = Path(os.environ.get("ANSIBLE_COLLECTIONS_PATH", str(REPO / "build" / "src")).split(os.pathsep)[0])
MODULES = COLLECTION / "ansible_collections" / "vmsnap" / "qemu" / "plugins" / "modules"


class RamVM(NoOsVM):
    """A VM without a guest OS whose RAM is a /dev/shm file full of non-zero bytes: a save writes all of it."""

    def __init__(self, folder: Path, name: str, disks: int = 1) -> None:
        super().__init__(folder, name, disks=disks, memory_mib=RAM_MIB)
        self.ram = Path(f"/dev/shm/vmkills-{os.getpid()}-{name}-{time.monotonic_ns()}")

    def start(self, extra: t.Sequence[str] = ()) -> RamVM:
        if not self.ram.exists():
            block = bytes(range(1, 256)) * 4112
            with open(self.ram, "wb") as ram:
                for dummy in range(RAM_MIB * MIB // len(block)):
                    ram.write(block)
                ram.truncate(RAM_MIB * MIB)
        backend = f"memory-backend-file,id=ram0,size={RAM_MIB}M,mem-path={self.ram},share=on"
        super().start(["-object", backend, "-machine", "memory-backend=ram0", *extra])
        return self

    def flush(self, drive: str = "drive0") -> None:
        out = self.qemu_io(drive, "flush")
        assert "error" not in out.lower(), out

    def write_at(self, pattern: int, offset: int, length: int, drive: str = "drive0") -> None:
        out = self.qemu_io(drive, f"write -P {pattern:#x} {offset} {length}")
        assert "error" not in out.lower() and "failed" not in out.lower(), out

    def gone(self) -> bool:
        return not Path(f"/proc/{self.pid}").exists() or "Z" in _proc_state(self.pid)

    def cleanup(self) -> None:
        self.kill()
        self.ram.unlink(missing_ok=True)


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "gone"


_MODULES: list[subprocess.Popen[str]] = []


@pytest.fixture
def vms(tmp_path: Path) -> t.Iterator[list[RamVM]]:
    """The test's VMs; every QEMU still running at the end is killed and its RAM file removed, and so is a module
    process that a failed test left behind."""
    made: list[RamVM] = []
    yield made
    while _MODULES:
        proc = _MODULES.pop()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    for vm in made:
        vm.cleanup()


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> random.Random:
    return random.Random(f"{SEED}-{request.node.name}")


def started(vms: list[RamVM], folder: Path, size: str = "16M") -> RamVM:
    """A running VM (kept in vms, so the fixture cleans it up even when it fails to start), its disk holding OLD."""
    vm = RamVM(folder, "vm")
    vms.append(vm)
    return vm.create_disks(OLD, size=size).start()


def start_module(module: str, args: dict[str, t.Any], folder: Path) -> subprocess.Popen[str]:
    """python MODULE ARGS_FILE: the module in a process of its own, as ansible runs it."""
    args_file = folder / f"args-{module}-{time.monotonic_ns()}.json"
    args_file.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": args}))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(COLLECTION), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.Popen(
        [sys.executable, str(MODULES / f"{module}.py"), str(args_file)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _MODULES.append(proc)
    return proc


def result_of(proc: subprocess.Popen[str]) -> dict[str, t.Any]:
    out, err = proc.communicate(timeout=120)
    start = out.find("{")
    assert start >= 0, f"no result from the module (rc {proc.returncode}):\n{out}\n{err}"
    result = t.cast("dict[str, t.Any]", json.loads(out[start:]))
    result["failed"] = bool(result.get("failed"))
    return result


def run(module: str, args: dict[str, t.Any], folder: Path) -> dict[str, t.Any]:
    return result_of(start_module(module, args, folder))


def ok(module: str, args: dict[str, t.Any], folder: Path) -> dict[str, t.Any]:
    result = run(module, args, folder)
    assert not result["failed"], result
    return result


def kill_when(
    vm: RamVM,
    proc: subprocess.Popen[str],
    ready: t.Callable[[], bool],
    what: str,
    delay: float,
    freeze: bool = False,
    may_finish: bool = False,
) -> None:
    """Once ready() holds (QEMU is doing the work), wait `delay` seconds and SIGKILL QEMU.

    freeze: SIGSTOP QEMU the moment ready() holds (for steps that take QEMU only a few milliseconds), then SIGKILL.
    may_finish: the task may have ended within the delay (QEMU is killed all the same).
    """
    deadline = time.monotonic() + 60
    pid = vm.pid
    while not ready():
        assert proc.poll() is None, f"the task ended before {what}: {proc.communicate()}"
        assert time.monotonic() < deadline, f"never saw {what}"
        time.sleep(0.001)
    if freeze:
        os.kill(pid, signal.SIGSTOP)
    time.sleep(delay)
    assert may_finish or proc.poll() is None, f"the task ended within {delay:.3f} s of {what}: {proc.communicate()}"
    print(f"[seed {SEED}] SIGKILL of QEMU pid {pid}{' (frozen)' if freeze else ''} {delay * 1000:.0f} ms after {what}")
    os.kill(pid, signal.SIGKILL)
    while not vm.gone():
        time.sleep(0.01)


def assert_died(result: dict[str, t.Any]) -> None:
    """The task failed, and says the VM died (not a bare timeout, not success)."""
    assert result["failed"], result
    assert "QEMU" in result["msg"] and "died" in result["msg"], result["msg"]
    assert "timeout" not in result["msg"].lower() and "within" not in result["msg"], result["msg"]


def check(image: Path, overcounted: bool = False) -> list[str]:
    """qemu-img check passes; leaked clusters (rc 3) are repaired and returned as a note, corruption fails.

    overcounted: an internal snapshot cut short after QEMU had raised the refcounts of the active layer's clusters
    and before it wrote the snapshot table leaves them counted twice but used once: qemu-img reports leaks plus
    OFLAG_COPIED "errors" on exactly those clusters (refcount 2). Only that pattern is accepted, and repaired with
    -r all (the counts go back to 1 and the flags then agree); the data is read back afterwards by the caller.
    """
    proc = subprocess.run(["qemu-img", "check", str(image)], capture_output=True, text=True, check=False, timeout=60)
    text = proc.stdout + proc.stderr
    if proc.returncode == 0:
        return []
    errors = [line for line in text.splitlines() if line.startswith("ERROR")]
    copied_only = bool(errors) and all(
        line.startswith("ERROR OFLAG_COPIED") and line.endswith(" refcount=2") for line in errors
    )
    assert proc.returncode == 3 or (overcounted and proc.returncode == 2 and copied_only), (
        f"qemu-img check {image}: rc {proc.returncode}\n{text}"
    )
    mode = "leaks" if proc.returncode == 3 else "all"
    subprocess.run(["qemu-img", "check", "-r", mode, str(image)], check=True, capture_output=True, timeout=60)
    again = subprocess.run(["qemu-img", "check", str(image)], capture_output=True, text=True, check=False, timeout=60)
    assert again.returncode == 0, again.stdout
    leaks = sum(line.startswith("Leaked cluster") for line in text.splitlines())
    note = (
        f"{image.name}: {leaks} leaked clusters"
        + (f" and {len(errors)} OFLAG_COPIED errors of clusters counted twice" if errors else "")
        + f" repaired (-r {mode})"
    )
    print(note)
    return [note]


def reads(image: Path, pattern: int, offset: int = 0, length: int = MIB) -> bool:
    """What the chain of image holds there, read offline."""
    proc = subprocess.run(
        ["qemu-io", "-r", "-U", "-c", f"read -P {pattern:#x} {offset} {length}", str(image)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    return proc.returncode == 0 and "verification failed" not in proc.stdout.lower()


def size_grew(path: Path, start: int, by: int) -> t.Callable[[], bool]:
    return lambda: path.exists() and path.stat().st_size >= start + by


def test_killed_during_internal_snapshot_with_ram(vms: list[RamVM], tmp_path: Path, rng: random.Random) -> None:
    """snapshot-save writes the RAM into the disk; QEMU dies part-way. The disk stays consistent and holds what
    the guest had flushed, a half-made snapshot (if any) is removed offline, and a new QEMU takes the snapshot."""
    vm = started(vms, tmp_path, "64M")
    disk = vm.disks[0]
    vm.write_at(NEW, 0, MIB)
    vm.flush()
    args = dict(socket=str(vm.qmp), name="before", mode="internal", vmstate=True)
    proc = start_module("qmp_live_snapshot", args, tmp_path)
    written = rng.randint(8, 128)  # MiB of the 256 MiB of RAM: QEMU is frozen the moment it is there, then killed
    kill_when(vm, proc, size_grew(disk, disk.stat().st_size, written * MIB), f"{written} MiB of RAM state", 0.0, True)
    result = result_of(proc)
    assert_died(result)
    assert result["changed"] is True  # the disk may have been written: never reported as untouched

    check(disk)
    assert reads(disk, NEW)
    # Offline, the half-made snapshot goes (qemu-img records a snapshot only once its RAM is written whole).
    ok("qcow2_snapshot", dict(paths=[str(disk)], name="before", state="absent"), tmp_path)
    assert "before" not in snapshot_names(disk)
    assert check(disk) == [] and reads(disk, NEW)

    vm.start()
    again = ok("qmp_live_snapshot", args, tmp_path)
    assert again["changed"] and snapshot_names(disk) == ["before"]
    assert not ok("qmp_live_snapshot", args, tmp_path)["changed"]


@pytest.mark.parametrize("moment", ["writing", "after"])
def test_killed_during_disk_only_internal_snapshot(
    vms: list[RamVM], tmp_path: Path, rng: random.Random, moment: str
) -> None:
    """blockdev-snapshot-internal-sync takes QEMU milliseconds: QEMU is frozen and killed the moment the disk file
    grows (the snapshot's tables being written), or killed a few ms later (the task may have finished). The disk
    stays consistent, reads what was flushed, and holds the snapshot whole or not at all; the task converges."""
    vm = started(vms, tmp_path, "64M")
    disk = vm.disks[0]
    vm.write_at(NEW, 0, MIB)
    vm.flush()
    args = dict(socket=str(vm.qmp), name="disk-only", mode="internal", vmstate=False)
    proc = start_module("qmp_live_snapshot", args, tmp_path)
    grown = size_grew(disk, disk.stat().st_size, 1)
    if moment == "writing":
        kill_when(vm, proc, grown, "the disk file grew", 0.0, freeze=True)
    else:
        kill_when(vm, proc, grown, "the disk file grew", rng.uniform(0.001, 0.01), may_finish=True)
    result = result_of(proc)
    print(f"snapshots {snapshot_names(disk)}; task: {result.get('msg', 'ok')}")
    repaired = check(disk, overcounted=True)
    if result["failed"]:
        assert_died(result)
        assert result["changed"] is True and "qemu-img check -r all repairs them" in result["msg"]
    else:
        assert moment == "after" and snapshot_names(disk) == ["disk-only"]
    if repaired:  # only a snapshot cut short leaves counts behind
        assert result["failed"] and snapshot_names(disk) == []

    assert reads(disk, NEW)
    had = snapshot_names(disk) == ["disk-only"]
    vm.start()
    again = ok("qmp_live_snapshot", args, tmp_path)
    assert again["changed"] is not had and snapshot_names(disk) == ["disk-only"]
    assert not ok("qmp_live_snapshot", args, tmp_path)["changed"]


@pytest.mark.parametrize("moment", ["claimed", "formatting", "after"])
def test_killed_during_external_snapshot(vms: list[RamVM], tmp_path: Path, rng: random.Random, moment: str) -> None:
    """QEMU frozen and killed the moment the task has claimed its overlay file (the transaction on its way), the
    moment QEMU begins to format it, or killed a few ms later (the snapshot may be complete, even the task; on a
    loaded host the freeze can come that late too). The removal of unfinished overlays is also proven without
    timing in tests/unit/plugins/module_utils/test_live_qemu_died.py.
    The disk reads what was flushed before; an overlay QEMU had not finished creating is removed by the task, one
    it finished is named in the message and committed offline; a new QEMU takes the snapshot again."""
    vm = started(vms, tmp_path, "64M")
    disk = vm.disks[0]
    overlay = disk.with_name("disk0.vmsnap-ext.qcow2")
    vm.write_at(NEW, 0, MIB)
    vm.flush()
    args = dict(socket=str(vm.qmp), name="ext", mode="external")
    proc = start_module("qmp_live_snapshot", args, tmp_path)
    if moment == "claimed":
        kill_when(vm, proc, overlay.exists, "the overlay file was claimed", 0.0, freeze=True)
    elif moment == "formatting":
        kill_when(vm, proc, size_grew(overlay, 0, 1), "QEMU began to format the overlay", 0.0, freeze=True)
    else:
        delay = rng.uniform(0.001, 0.01)
        kill_when(vm, proc, size_grew(overlay, 0, 1), "QEMU began to format the overlay", delay, may_finish=True)
    result = result_of(proc)
    print(f"overlay {'kept' if overlay.exists() else 'removed'}; task: {result.get('msg', 'ok')}")
    if result["failed"]:
        assert_died(result)
        assert result["changed"] is True
        if overlay.exists():
            assert f"overlay files {overlay} " in result["msg"] and "qcow2_chain state=committed" in result["msg"]
        else:
            assert f"QEMU had not finished creating {overlay}, " in result["msg"]
    else:  # QEMU answered the transaction before it froze or died (a loaded host can be late): it was taken
        assert overlay.exists()

    check(disk)
    assert reads(disk, NEW)
    if overlay.exists():
        assert backing_file(overlay) == str(disk)
        check(overlay)
        assert reads(overlay, NEW)
        ok("qcow2_chain", dict(path=str(overlay), state="committed"), tmp_path)
    assert not overlay.exists() and reads(disk, NEW) and check(disk) == []

    vm.start()
    again = ok("qmp_live_snapshot", args, tmp_path)
    assert again["changed"] and backing_file(overlay) == str(disk)


def test_killed_during_external_merge(vms: list[RamVM], tmp_path: Path, rng: random.Random) -> None:
    """block-commit of a 96 MiB overlay into the disk; QEMU dies part-way. The overlay chain still reads everything
    written before the kill; qcow2_chain committed finishes the merge offline and a new QEMU starts on the disk."""
    vm = started(vms, tmp_path, "128M")
    disk = vm.disks[0]
    overlay = disk.with_name("disk0.vmsnap-ext.qcow2")
    args = dict(socket=str(vm.qmp), name="ext", mode="external")
    assert ok("qmp_live_snapshot", args, tmp_path)["changed"]
    vm.write_at(NEW, 0, MIB)
    vm.write_at(FILL, 16 * MIB, 96 * MIB)
    vm.flush()
    proc = start_module("qmp_live_snapshot", dict(args, state="absent"), tmp_path)
    merged = rng.randint(4, 32)  # MiB of 96: QEMU is frozen the moment they are in the base, then killed
    kill_when(vm, proc, size_grew(disk, disk.stat().st_size, merged * MIB), f"{merged} MiB were merged", 0.0, True)
    result = result_of(proc)
    assert_died(result)
    assert result["changed"] is True
    assert f"qcow2_chain path={overlay} state=committed" in result["msg"], result["msg"]

    for image in (disk, overlay):
        check(image)
    assert backing_file(overlay) == str(disk)
    assert reads(overlay, NEW) and reads(overlay, FILL, 16 * MIB, 96 * MIB)

    ok("qcow2_chain", dict(path=str(overlay), state="committed"), tmp_path)
    assert not overlay.exists()
    assert reads(disk, NEW) and reads(disk, FILL, 16 * MIB, 96 * MIB) and check(disk) == []
    vm.start()
    assert vm.active_file() == disk and vm.reads(NEW)


def test_killed_during_state_save(vms: list[RamVM], tmp_path: Path, rng: random.Random) -> None:
    """A live state save; QEMU dies while writing the RAM. No state file and no sidecar appear at the path (the
    temporary file is gone), the disk is consistent, and a new QEMU's state is saved by the same task."""
    vm = started(vms, tmp_path)
    states = tmp_path / "states"
    states.mkdir()
    state = states / "vm.vmstate"
    args = dict(socket=str(vm.qmp), path=str(state))
    proc = start_module("qmp_vm_state", args, tmp_path)
    kill_when(vm, proc, lambda: _writing_state(states), "QEMU began the state file", rng.uniform(0, 0.2))
    result = result_of(proc)
    assert_died(result)
    assert f"nothing was saved at {state}" in result["msg"], result["msg"]
    assert sorted(p.name for p in states.iterdir()) == []  # nothing half-written, no temporary file left
    check(vm.disks[0])
    assert reads(vm.disks[0], OLD)

    vm.start()
    saved = ok("qmp_vm_state", args, tmp_path)
    assert saved["changed"] and sorted(p.name for p in states.iterdir()) == ["vm.vmstate", "vm.vmstate.json"]
    assert state.stat().st_size > RAM_MIB * MIB  # all of the RAM


def _writing_state(folder: Path) -> bool:
    """A temporary state file that QEMU has begun to write (its space is reserved, so its size says nothing)."""
    for path in folder.iterdir():
        try:
            with open(path, "rb") as temp:
                if temp.read(4) == b"QEVM":
                    return True
        except OSError:
            continue
    return False


def test_killed_during_external_checkpoint_with_ram(vms: list[RamVM], tmp_path: Path, rng: random.Random) -> None:
    """External checkpoint with RAM: the overlays are taken in the pause, then QEMU dies while it writes the RAM.
    The task says the overlays were taken and the VM died; no state file is presented as valid; the overlay is
    committed offline and the checkpoint is taken again on a new QEMU."""
    vm = started(vms, tmp_path, "64M")
    disk = vm.disks[0]
    overlay = disk.with_name("disk0.vmsnap-cp.qcow2")
    state = disk.with_name("disk0.vmsnap-cp.vmstate")
    vm.write_at(NEW, 0, MIB)
    vm.flush()
    args = dict(socket=str(vm.qmp), name="cp", mode="external", vmstate=True)
    proc = start_module("qmp_live_snapshot", args, tmp_path)
    kill_when(vm, proc, lambda: _writing_state(vm.folder), "QEMU began the state file", rng.uniform(0, 0.2))
    result = result_of(proc)
    assert_died(result)
    assert result["changed"] is True and f"overlay files {overlay} may hold guest writes" in result["msg"]
    assert "qcow2_chain state=committed" in result["msg"] and f"nothing was saved at {state}" in result["msg"]
    assert not state.exists() and not Path(f"{state}.json").exists()
    assert not [p.name for p in vm.folder.iterdir() if ".vmsnap-tmp-" in p.name]

    for image in (disk, overlay):
        check(image)
    assert backing_file(overlay) == str(disk) and reads(overlay, NEW)
    ok("qcow2_chain", dict(path=str(overlay), state="committed"), tmp_path)
    assert not overlay.exists() and reads(disk, NEW)

    vm.start()
    again = ok("qmp_live_snapshot", args, tmp_path)
    assert again["changed"] and state.exists() and Path(f"{state}.json").exists()
    assert backing_file(overlay) == str(disk)


def test_killed_during_live_backup(vms: list[RamVM], tmp_path: Path, rng: random.Random) -> None:
    """A live full backup of a disk with 96 MiB of data; QEMU dies while it copies. No backup is recorded or left
    looking complete, the disk is consistent and keeps its data, and the next run on a new QEMU takes a full backup
    that restores the data."""
    vm = started(vms, tmp_path, "128M")
    disk = vm.disks[0]
    vm.write_at(FILL, 16 * MIB, 96 * MIB)
    vm.flush()
    dest = tmp_path / "backups"
    dest.mkdir()
    args = dict(socket=str(vm.qmp), dest_dir=str(dest))
    proc = start_module("qcow2_backup", args, tmp_path)

    copied = rng.randint(4, 32)  # MiB of 97: QEMU is frozen the moment they are in the backup file, then killed

    def copying() -> bool:
        return any(p.stat().st_size >= copied * MIB for p in dest.rglob(".tmp-*") if p.is_file())

    kill_when(vm, proc, copying, f"{copied} MiB were copied", 0.0, freeze=True)
    result = result_of(proc)
    assert_died(result)
    index = next(dest.rglob("index.json"), None)
    recorded = json.loads(index.read_text())["backups"] if index else []
    print(f"index after the kill: {recorded}; files: {sorted(p.name for p in dest.rglob('*'))}")
    print(f"task: {result['msg']} changed={result['changed']}")
    assert "could not be told to clean up" not in result["msg"]  # nothing in a dead QEMU to clean up
    assert not list(dest.rglob(".tmp-*"))  # the unfinished backup file was removed
    assert all(b.get("status", "complete") != "complete" for b in recorded), recorded
    check(disk)
    assert reads(disk, OLD) and reads(disk, FILL, 16 * MIB, 96 * MIB)

    vm.start()
    again = ok("qcow2_backup", args, tmp_path)
    assert again["changed"] and again["backup"]["mode"] == "full", again
    assert not list(dest.rglob(".tmp-*"))
    target = tmp_path / "restored.qcow2"
    ok(
        "qcow2_backup",
        dict(state="restored", dest_dir=str(dest), set_name=again["sets"][0]["set"], restore_to=str(target)),
        tmp_path,
    )
    assert reads(target, OLD) and reads(target, FILL, 16 * MIB, 96 * MIB)


def test_killed_during_revert(vms: list[RamVM], tmp_path: Path, rng: random.Random) -> None:
    """snapshot-load of an internal snapshot with 256 MiB of RAM; QEMU dies once it has begun to revert the disk
    (the disk file is written). The disk is consistent (a revert cut short can leave clusters counted twice, the
    pattern check() repairs) and reads either the snapshot's data or, if the revert had not reached it, what it
    held; a new QEMU started paused (-S) loads the snapshot whole."""
    vm = started(vms, tmp_path, "64M")
    disk = vm.disks[0]
    vm.write_at(NEW, 0, MIB)
    vm.flush()
    args = dict(socket=str(vm.qmp), name="before", mode="internal", vmstate=True)
    assert ok("qmp_live_snapshot", args, tmp_path)["changed"]
    vm.write_at(FILL, 0, MIB)
    vm.flush()
    proc = start_module("qmp_live_snapshot", dict(args, state="reverted"), tmp_path)
    mtime = disk.stat().st_mtime_ns
    kill_when(vm, proc, lambda: disk.stat().st_mtime_ns != mtime, "QEMU began to revert the disk", rng.uniform(0, 0.1))
    result = result_of(proc)
    assert_died(result)
    assert result["changed"] is True and "Start the VM paused (-S) and run this task again" in result["msg"]
    assert "qemu-img check -r all repairs them" in result["msg"]

    check(disk, overcounted=True)
    assert snapshot_names(disk) == ["before"]
    print(f"the disk reads {'the snapshot' if reads(disk, NEW) else 'what it held'}")
    assert reads(disk, NEW) or reads(disk, FILL)
    vm.start(["-S"])
    again = ok("qmp_live_snapshot", dict(args, state="reverted", after="running"), tmp_path)
    assert again["changed"] and vm.status() == "running" and vm.reads(NEW)
