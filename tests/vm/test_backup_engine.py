# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The backup engine (_backup_qmp) against a real QEMU under TCG and a real qemu-storage-daemon.

One QEMU without a guest OS (-machine none, -S) serves the live tests; it has four 16 MiB disks: disk0 and disk1
plain, disk2 and disk3 behind blkdebug so that a data read of them fails with EIO (a job that errors halfway; blkdebug
injects its error once, so each is used for one failure). The guest's
writes are HMP qemu-io writes; data is checked with qemu-io patterns and qemu-img compare outside QEMU.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import typing as t
from pathlib import Path

import pytest
from conftest import REPO

COLLECTIONS = os.environ.get("ANSIBLE_COLLECTIONS_PATH", str(REPO / "build" / "src")).split(os.pathsep)[0]
sys.path.insert(0, COLLECTIONS)
from ansible_collections.vmsnap.qemu.plugins.module_utils._backup_qmp import (  # noqa: E402
    DAEMON_NODE,
    BackupError,
    DiskJob,
    bitmaps_of,
    cancel_stale_jobs,
    remove_bitmap,
    run_backup_jobs,
    storage_daemon,
    target_node_name,
)
from ansible_collections.vmsnap.qemu.plugins.module_utils._bitmap_names import bitmap_name  # noqa: E402
from ansible_collections.vmsnap.qemu.plugins.module_utils._errors import ImageInUseError  # noqa: E402
from ansible_collections.vmsnap.qemu.plugins.module_utils._qemu_img import QemuImg  # noqa: E402
from ansible_collections.vmsnap.qemu.plugins.module_utils._qmp import QmpClient  # noqa: E402

MIB = 1024 * 1024
SIZE = 16 * MIB
A, B, C = 0xAA, 0xBB, 0xCC


class _Binaries:
    """What QemuImg needs of an AnsibleModule."""

    def get_bin_path(self, name: str, required: bool = False) -> str:
        path = shutil.which(name)
        assert path, name
        return path


QEMU_IMG = QemuImg(t.cast(t.Any, _Binaries()))


def run(*argv: str | Path) -> str:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, check=True, timeout=60).stdout


def reads(image: Path, pattern: int, offset: int, length: int = MIB) -> bool:
    proc = subprocess.run(
        ["qemu-io", "-U", "-r", "-c", f"read -P {pattern:#x} {offset} {length}", str(image)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    return proc.returncode == 0 and "verification failed" not in proc.stdout.lower()


def identical(first: Path, second: Path) -> bool:
    proc = subprocess.run(["qemu-img", "compare", "-U", "-q", str(first), str(second)], check=False, timeout=60)
    assert proc.returncode in (0, 1)
    return proc.returncode == 0


def bitmap_flags(image: Path) -> dict[str, list[str]]:
    info = json.loads(run("qemu-img", "info", "-U", "--output=json", image))
    bitmaps = info.get("format-specific", {}).get("data", {}).get("bitmaps", [])
    return {b["name"]: b["flags"] for b in bitmaps}


def new_image(path: Path, *writes: tuple[int, int], backing: Path | None = None) -> Path:
    """A qcow2 file with pattern writes (pattern, offset) of 1 MiB each."""
    args = ["create", "-q", "-f", "qcow2"] + (["-b", str(backing), "-F", "qcow2"] if backing else [])
    run("qemu-img", *args, path, str(SIZE))
    for pattern, offset in writes:
        run("qemu-io", "-f", "qcow2", "-c", f"write -P {pattern:#x} {offset} {MIB}", path)
    return path


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X")
    except FileNotFoundError:
        return True


def wait_gone(pid: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not gone(pid):
        assert time.monotonic() < deadline, f"pid {pid} is still there"
        time.sleep(0.05)


class LiveVm:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.sock = folder / "qmp.sock"
        self.disks = [new_image(folder / f"disk{i}.qcow2", (A, 0)) for i in range(4)]
        blkdebug = folder / "blkdebug.conf"
        blkdebug.write_text('[inject-error]\nevent = "read_aio"\nerrno = "5"\n')
        argv = ["qemu-system-x86_64", "-machine", "none", "-accel", "tcg", "-nodefaults", "-display", "none", "-S"]
        argv += ["-qmp", f"unix:{self.sock},server=on,wait=off"]
        for i, disk in enumerate(self.disks):
            source = f"blkdebug:{blkdebug}:{disk}" if i >= 2 else str(disk)
            argv += ["-drive", f"file={source},if=none,id=drive{i},format=qcow2,node-name=disk{i}"]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        self.qmp = self._connect()

    def _connect(self) -> QmpClient:
        deadline = time.monotonic() + 30
        while True:
            try:
                return QmpClient(str(self.sock), 2.0, 30.0).__enter__()
            except Exception:  # noqa: BLE001 - not listening yet
                assert self.proc.poll() is None and time.monotonic() < deadline, "QEMU did not start"
                time.sleep(0.05)

    def reconnect(self) -> None:
        self.qmp.close()
        self.qmp = self._connect()

    def write(self, drive: int, pattern: int, offset: int, length: int = MIB) -> None:
        out = self.qmp.execute(
            "human-monitor-command", {"command-line": f'qemu-io drive{drive} "write -P {pattern:#x} {offset} {length}"'}
        )
        assert "error" not in out.lower() and "failed" not in out.lower(), out
        self.qmp.execute("human-monitor-command", {"command-line": f'qemu-io drive{drive} "flush"'})

    def stop(self) -> None:
        self.qmp.close()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


@pytest.fixture(scope="module")
def vm(tmp_path_factory: pytest.TempPathFactory) -> t.Iterator[LiveVm]:
    machine = LiveVm(tmp_path_factory.mktemp("backup-engine-vm"))
    try:
        yield machine
    finally:
        machine.stop()


def full_job(node: str, target: Path, set_name: str, chain: str) -> DiskJob:
    return DiskJob(node=node, target=str(target), virtual_size=SIZE, sync="full", bitmap=bitmap_name(set_name, chain))


def inc_job(node: str, target: Path, bitmap: str, backing: Path, speed: int = 0) -> DiskJob:
    job = DiskJob(node=node, target=str(target), virtual_size=SIZE, sync="bitmap", bitmap=bitmap, backing=str(backing))
    job.speed = speed
    return job


def counts(vm: LiveVm, node: str) -> dict[str, tuple[int, bool, bool]]:
    return {name: (b.count, b.recording, b.busy) for name, b in bitmaps_of(vm.qmp, node).items()}


def test_full_then_incremental_holds_only_the_changed_clusters(vm: LiveVm, tmp_path: Path) -> None:
    calls: list[str] = []
    full = tmp_path / ".tmp-full.qcow2"
    job = full_job("disk0", full, "d0", "00000001")
    [result] = run_backup_jobs(vm.qmp, QEMU_IMG, [job], 60, lambda: calls.append("pending"))
    assert calls == ["pending"] and job.job_id == "vmsnap-backup-d0" and result.bytes_copied == SIZE
    state = bitmaps_of(vm.qmp, "disk0")[job.bitmap or ""]
    assert (state.count, state.recording, state.persistent) == (0, True, True)
    assert not state.busy and not state.inconsistent
    assert identical(vm.disks[0], full) and reads(full, A, 0)
    assert oct(full.stat().st_mode & 0o777) == "0o600"

    vm.write(0, B, 4 * MIB)
    assert bitmaps_of(vm.qmp, "disk0")[job.bitmap or ""].count == MIB
    inc = tmp_path / ".tmp-inc.qcow2"
    [result] = run_backup_jobs(vm.qmp, QEMU_IMG, [inc_job("disk0", inc, job.bitmap or "", full)], 60, lambda: None)
    assert result.bytes_copied == MIB
    assert bitmaps_of(vm.qmp, "disk0")[job.bitmap or ""].count == 0
    assert QEMU_IMG.allocated_bytes(str(inc)) == MIB  # only the changed clusters
    assert inc.stat().st_size < MIB + 512 * 1024  # data + qcow2 metadata
    assert json.loads(run("qemu-img", "info", "--output=json", inc))["backing-filename"] == full.name  # relative
    assert identical(vm.disks[0], inc) and reads(inc, A, 0) and reads(inc, B, 4 * MIB) and not reads(full, B, 4 * MIB)
    assert vm.qmp.execute("query-jobs") == []
    assert not [n for n in vm.qmp.execute("query-named-block-nodes", {"flat": True}) if "tmp-" in n["file"]]


def test_two_disks_at_one_instant_and_a_failing_disk_cancels_both(vm: LiveVm, tmp_path: Path) -> None:
    fulls = [tmp_path / f".tmp-full{i}.qcow2" for i in (0, 1)]
    jobs = [full_job(f"disk{i}", fulls[i], f"two{i}", "0000000a") for i in (0, 1)]
    results = run_backup_jobs(vm.qmp, QEMU_IMG, jobs, 60, lambda: None)
    assert [r.job.node for r in results] == ["disk0", "disk1"]
    assert all(identical(vm.disks[i], fulls[i]) for i in (0, 1))
    vm.write(0, C, 2 * MIB)
    vm.write(1, C, 3 * MIB)
    incs = [tmp_path / f".tmp-inc{i}.qcow2" for i in (0, 1)]
    bitmaps = [job.bitmap or "" for job in jobs]
    results = run_backup_jobs(
        vm.qmp, QEMU_IMG, [inc_job(f"disk{i}", incs[i], bitmaps[i], fulls[i]) for i in (0, 1)], 60, lambda: None
    )  # grouped: only backup actions
    assert [r.bytes_copied for r in results] == [MIB, MIB]
    assert all(identical(vm.disks[i], incs[i]) for i in (0, 1))

    # A full backup of disk1 and disk2 (whose reads fail): disk1's job is cancelled too, its new bitmap removed.
    vm.write(1, A, 5 * MIB)
    before = {node: counts(vm, node) for node in ("disk1", "disk2")}
    failing = [full_job("disk1", tmp_path / ".tmp-f1.qcow2", "bad1", "0000000b")]
    failing.append(full_job("disk2", tmp_path / ".tmp-f2.qcow2", "bad2", "0000000b"))
    with pytest.raises(BackupError, match=r"backup of node disk2 \(vmsnap-backup-bad2\) failed: Input/output error"):
        run_backup_jobs(vm.qmp, QEMU_IMG, failing, 60, lambda: pytest.fail("must not finalize"))
    assert {node: counts(vm, node) for node in ("disk1", "disk2")} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in fulls + incs)

    # The same for a grouped incremental: disk1's bitmap keeps its count (QEMU cancels the group itself).
    vm.qmp.execute("block-dirty-bitmap-add", {"node": "disk3", "name": bitmap_name("bad3", "0000000c")})
    vm.write(3, B, 6 * MIB)
    before = {node: counts(vm, node) for node in ("disk1", "disk3")}
    assert before["disk1"][bitmaps[1]][0] == MIB and before["disk3"][bitmap_name("bad3", "0000000c")][0] == MIB
    failing = [inc_job("disk1", tmp_path / ".tmp-i1.qcow2", bitmaps[1], incs[1])]
    failing.append(inc_job("disk3", tmp_path / ".tmp-i2.qcow2", bitmap_name("bad3", "0000000c"), fulls[0]))
    with pytest.raises(BackupError, match=r"node disk3 .* Input/output error\. Every job of this backup was cancelled"):
        run_backup_jobs(vm.qmp, QEMU_IMG, failing, 60, lambda: pytest.fail("must not finalize"))
    assert {node: counts(vm, node) for node in ("disk1", "disk3")} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in fulls + incs)
    assert vm.qmp.execute("query-jobs") == []


def test_refusals_before_and_by_qemu_leave_nothing(vm: LiveVm, tmp_path: Path) -> None:
    before = counts(vm, "disk1")
    # The target's folder does not exist: nothing reaches QEMU.
    with pytest.raises(BackupError, match="Cannot create the backup file .*No such file or directory"):
        run_backup_jobs(vm.qmp, QEMU_IMG, [full_job("disk1", tmp_path / "no" / "x.qcow2", "r", "00000001")], 9, list)
    # QEMU refuses the transaction (target of another size): no job ran, no bitmap added, the file is gone.
    job = full_job("disk1", tmp_path / ".tmp-r.qcow2", "r", "00000002")
    job.virtual_size = SIZE // 2
    with pytest.raises(BackupError, match="QEMU refused the backup of disk1: .*size"):
        run_backup_jobs(vm.qmp, QEMU_IMG, [job], 9, list)
    # A file that is already there is never overwritten.
    (tmp_path / ".tmp-taken.qcow2").write_text("mine")
    with pytest.raises(BackupError, match="already exists"):
        run_backup_jobs(vm.qmp, QEMU_IMG, [full_job("disk1", tmp_path / ".tmp-taken.qcow2", "r", "00000003")], 9, list)
    assert (tmp_path / ".tmp-taken.qcow2").read_text() == "mine"
    # An incremental from a bitmap that does not record (disabled) could miss writes: refused.
    name = bitmap_name("r", "00000004")
    vm.qmp.execute("block-dirty-bitmap-add", {"node": "disk1", "name": name, "disabled": True})
    with pytest.raises(BackupError, match="is disabled"):
        run_backup_jobs(vm.qmp, QEMU_IMG, [inc_job("disk1", tmp_path / ".tmp-i.qcow2", name, tmp_path)], 9, list)
    remove_bitmap(vm.qmp, "disk1", name)
    with pytest.raises(BackupError, match="not one of vmsnap.qemu's"):
        remove_bitmap(vm.qmp, "disk1", "other-tool")
    assert counts(vm, "disk1") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-taken.qcow2"]


def test_the_daemon_refuses_an_image_a_vm_runs(vm: LiveVm) -> None:
    started = time.monotonic()
    with (
        pytest.raises(ImageInUseError, match="in use by another process.*write"),
        storage_daemon(str(vm.disks[0]), read_only=False),
    ):
        pytest.fail("opened")
    assert time.monotonic() - started < 10


def test_timeout_cancels_and_keeps_the_bitmap(vm: LiveVm, tmp_path: Path) -> None:
    name = bitmap_name("slow", "00000001")
    full = tmp_path / ".tmp-full.qcow2"
    run_backup_jobs(vm.qmp, QEMU_IMG, [full_job("disk1", full, "slow", "00000001")], 60, list)
    vm.write(1, B, 8 * MIB, 4 * MIB)
    before = counts(vm, "disk1")
    assert before[name] == (4 * MIB, True, False)
    started = time.monotonic()
    with pytest.raises(BackupError, match=r"timed out after 0.5 s and was cancelled"):
        run_backup_jobs(
            vm.qmp, QEMU_IMG, [inc_job("disk1", tmp_path / ".tmp-i.qcow2", name, full, speed=256 * 1024)], 0.5, list
        )
    assert time.monotonic() - started < 10
    assert counts(vm, "disk1") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [full.name]
    assert vm.qmp.execute("query-jobs") == []


CHILD = """
import os, signal, sys
sys.path.insert(0, {collections!r})
from ansible_collections.vmsnap.qemu.plugins.module_utils._backup_qmp import DiskJob, run_backup_jobs, storage_daemon
from ansible_collections.vmsnap.qemu.plugins.module_utils._qmp import QmpClient
from ansible_collections.vmsnap.qemu.plugins.module_utils._qemu_img import QemuImg
import shutil
class Bin:
    def get_bin_path(self, name, required=False):
        return shutil.which(name)
mode = sys.argv[1]
if mode == "job":
    qmp = QmpClient(sys.argv[2]); qmp.connect()
    job = DiskJob(node=sys.argv[3], target=sys.argv[4], virtual_size=int(sys.argv[5]), sync="bitmap",
                  bitmap=sys.argv[6], backing=sys.argv[7])
    run_backup_jobs(qmp, QemuImg(Bin()), [job], 60, lambda: os.kill(os.getpid(), signal.SIGKILL))
else:
    with storage_daemon(sys.argv[2], read_only=False) as (qmp, node):
        print(qmp.peer_pid(), flush=True)
        sys.stdin.read()
"""


def child(tmp_path: Path, *args: str | Path) -> subprocess.Popen[str]:
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(CHILD.format(collections=COLLECTIONS)))
    return subprocess.Popen(
        [sys.executable, str(script), *map(str, args)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )


def test_cancel_stale_jobs_after_a_killed_task(vm: LiveVm, tmp_path: Path) -> None:
    name = bitmap_name("stale", "00000001")
    full = tmp_path / "full.qcow2"
    run_backup_jobs(vm.qmp, QEMU_IMG, [full_job("disk0", full, "stale", "00000001")], 60, list)
    vm.write(0, C, 9 * MIB)
    before = counts(vm, "disk0")
    target = tmp_path / ".tmp-inc.qcow2"
    vm.qmp.close()  # QEMU's QMP monitor serves one client at a time
    proc = child(tmp_path, "job", vm.sock, "disk0", target, str(SIZE), name, full)
    assert proc.wait(60) == -signal.SIGKILL  # killed itself with every job pending
    vm.reconnect()
    [job] = vm.qmp.execute("query-jobs")
    assert (job["id"], job["status"]) == ("vmsnap-backup-stale", "pending")
    assert counts(vm, "disk0")[name] == (MIB, True, True)  # busy: the job holds it

    assert cancel_stale_jobs(vm.qmp, ["vmsnap-backup-stale", "vmsnap-backup-other"]) == ["vmsnap-backup-stale"]
    assert vm.qmp.execute("query-jobs") == []
    nodes = {n["node-name"] for n in vm.qmp.execute("query-named-block-nodes", {"flat": True})}
    assert target_node_name("vmsnap-backup-stale") not in nodes
    assert counts(vm, "disk0") == before
    assert cancel_stale_jobs(vm.qmp, ["vmsnap-backup-stale"]) == []
    with pytest.raises(BackupError, match="not one of vmsnap.qemu's"):
        cancel_stale_jobs(vm.qmp, ["someone-elses-job"])
    # The next run works (the caller removes the .tmp- leftover, which QEMU no longer holds).
    target.unlink()
    [result] = run_backup_jobs(vm.qmp, QEMU_IMG, [inc_job("disk0", target, name, full)], 60, list)
    assert result.bytes_copied == MIB and identical(vm.disks[0], target)


def test_storage_daemon_incremental_of_an_offline_image(tmp_path: Path) -> None:
    base = new_image(tmp_path / "base.qcow2", (A, 0))
    top = new_image(tmp_path / "top.qcow2", (B, MIB), backing=base)
    name = bitmap_name("top", "00000001")
    run("qemu-img", "bitmap", "--add", top, name)
    run("qemu-img", "bitmap", "--add", top, "other-tools-bitmap")
    full = tmp_path / "full.qcow2"
    run("qemu-img", "convert", "-O", "qcow2", top, full)  # the full backup, flattened
    run("qemu-io", "-f", "qcow2", "-c", f"write -P {C:#x} {3 * MIB} {MIB}", top)  # recorded by the bitmap

    with storage_daemon(str(top), read_only=True, workdir=str(tmp_path)) as (qmp, node):
        assert node == DAEMON_NODE
        bitmaps = bitmaps_of(qmp, node)
        assert sorted(bitmaps) == sorted([name, "other-tools-bitmap"])
        assert (bitmaps[name].count, bitmaps[name].recording, bitmaps[name].persistent) == (MIB, True, True)
        assert len(qmp.execute("query-named-block-nodes", {"flat": True})) == 4  # two layers, format + file each
    assert bitmap_flags(top)[name] == ["auto"]

    inc = tmp_path / ".tmp-inc.qcow2"
    with storage_daemon(str(top), read_only=False, workdir=str(tmp_path)) as (qmp, node):
        [result] = run_backup_jobs(qmp, QEMU_IMG, [inc_job(node, inc, name, full)], 60, list)
        assert result.bytes_copied == MIB and bitmaps_of(qmp, node)[name].count == 0
        assert bitmap_flags(top)[name] == ["in-use", "auto"]  # while a writer has it open
    assert bitmap_flags(top) == {name: ["auto"], "other-tools-bitmap": ["auto"]}  # a clean close
    assert QEMU_IMG.allocated_bytes(str(inc)) == MIB
    assert identical(top, inc) and reads(inc, A, 0) and reads(inc, B, MIB) and reads(inc, C, 3 * MIB)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("vmsnap-qsd-")] == []


def test_a_killed_daemon_leaves_the_bitmap_in_use(tmp_path: Path) -> None:
    image = new_image(tmp_path / "disk.qcow2", (A, 0))
    name = bitmap_name("disk", "00000001")
    run("qemu-img", "bitmap", "--add", image, name)
    closed_uncleanly = pytest.raises(BackupError, match="did not close cleanly.*in-use")
    with closed_uncleanly, storage_daemon(str(image), read_only=False) as (qmp, dummy):
        pid = qmp.peer_pid()
        assert pid
        os.kill(pid, signal.SIGKILL)
        wait_gone(pid)
    assert bitmap_flags(image)[name] == ["in-use", "auto"]
    with storage_daemon(str(image), read_only=True) as (qmp, node):
        assert bitmaps_of(qmp, node)[name].inconsistent


def test_the_daemon_dies_with_the_process_that_started_it(tmp_path: Path) -> None:
    image = new_image(tmp_path / "disk.qcow2", (A, 0))
    name = bitmap_name("disk", "00000002")
    run("qemu-img", "bitmap", "--add", image, name)
    proc = child(tmp_path, "daemon", image)
    assert proc.stdout is not None
    daemon_pid = int(proc.stdout.readline())
    assert not gone(daemon_pid)
    proc.kill()
    proc.wait(10)
    wait_gone(daemon_pid)  # PR_SET_PDEATHSIG
    # SIGTERM from PR_SET_PDEATHSIG: the daemon closes the image as on quit, so the bitmap stays consistent (a SIGKILL
    # would leave it in-use, a broken chain: the test above)
    assert bitmap_flags(image)[name] == ["auto"]
    assert "No errors were found" in run("qemu-img", "check", image)
