# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Issue 11 item 3: SIGKILL of the module process at seeded random moments of its work (kill_trials.py says how the
module runs, what each trial checks and how one is replayed): offline images here, running VMs in
test_kill_trials_live.py; and the kills the trials hit only by chance, made on purpose, each with what the next run
does about them. After each kill: every image passes qemu-img check, the data written before the task reads back, the
VM runs, and the next run of the same task converges (a repeat is unchanged) with no vmsnap job left in QEMU.
`make soak` runs the trials with more trials and other seeds."""

from __future__ import annotations

import os
import time
import typing as t
from pathlib import Path

import pytest
from fleet import NoOsVM
from kill_trials import (
    backing,
    converge,
    dead_pid,
    make_chain,
    measure,
    ok_run,
    qemu_img_check,
    qemu_io_reads,
    qemu_io_write,
    qmp,
    run_module,
    snapshots,
    trial,
    trial_indexes,
    vm_status,
)


def test_kill_qcow2_snapshot_paths(tmp_path: Path) -> None:
    images = [tmp_path / f"disk{i}.qcow2" for i in range(3)]
    for image in images:
        import subprocess

        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "32M"], check=True)
        qemu_io_write(image, 0xAA, "0", "4M")
    paths = [str(image) for image in images]
    windows = [measure("qcow2_snapshot", {"paths": paths, "name": "m", "state": s}) for s in ("present", "absent")]
    window = [min(w[0] for w in windows), max(w[1] for w in windows)]

    def observe() -> list[list[str]]:
        return [snapshots(image) for image in images]

    def check() -> None:
        for image in images:
            qemu_img_check(image)
            assert qemu_io_reads(image, 0xAA, "0", "4M"), f"{image} lost its data"

    for index in trial_indexes("qcow2_snapshot", 10):
        name = f"k{index // 2}"
        state = "present" if index % 2 == 0 else "absent"
        wanted = [[name]] * len(images) if state == "present" else [[]] * len(images)
        trial(
            "qcow2_snapshot",
            index,
            window,
            "qcow2_snapshot",
            {"paths": paths, "name": name, "state": state},
            observe,
            check,
            wanted,
        )


@pytest.mark.parametrize("state", ["committed", "flattened"])
def test_kill_qcow2_chain(tmp_path: Path, state: str) -> None:
    folder = tmp_path / "chain"
    folder.mkdir()
    base, overlay = make_chain(folder)
    args: dict[str, t.Any] = {"path": str(overlay), "state": state}
    if state == "committed":
        args["backing"] = str(base)
    window = measure("qcow2_chain", args)

    def observe() -> tuple[t.Any, ...]:
        files = sorted(p.name for p in folder.iterdir())
        return (
            files,
            backing(overlay) if overlay.exists() else None,
            qemu_io_reads(base, 0xBB, "0", "8M"),
        )

    def check() -> None:
        for image in (base, overlay):
            if image.exists():
                qemu_img_check(image)
        top = overlay if overlay.exists() else base
        assert qemu_io_reads(top, 0xBB, "0", "8M"), f"{top}: the overlay's data is lost"
        assert qemu_io_reads(top, 0x11, "8M", "8M"), f"{top}: the base's data is lost"

    for index in trial_indexes(f"qcow2_chain_{state}", 5):
        make_chain(folder)
        target = (["base.qcow2"], None, True) if state == "committed" else (["base.qcow2", "top.qcow2"], None, False)
        trial(f"qcow2_chain_{state}", index, window, "qcow2_chain", args, observe, check, target)


# -- live ---------------------------------------------------------------------------------------------------------


def test_kill_qcow2_backup_offline(tmp_path: Path) -> None:
    import subprocess

    image, dest = tmp_path / "disk.qcow2", tmp_path / "backups"
    dest.mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "32M"], check=True)
    qemu_io_write(image, 0xAA, "0", "8M")
    args = {"path": str(image), "dest_dir": str(dest)}
    window = measure("qcow2_backup", {**args, "mode": "full"})
    written = {0xAA}

    def observe() -> list[str]:
        return sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())

    def check() -> None:
        qemu_img_check(image)
        assert qemu_io_reads(image, 0xAA, "0", "1M"), "the disk lost its data"

    for index in trial_indexes("qcow2_backup_offline", 4):
        pattern = 0x50 + index
        qemu_io_write(image, pattern, f"{8 + index}M", "1M")  # new data: the next backup has something to copy
        written.add(pattern)
        mode = "full" if index % 2 == 0 else "auto"
        trial("qcow2_backup_offline", index, window, "qcow2_backup", {**args, "mode": mode}, observe, check)
        verified = run_module("qcow2_backup", {"dest_dir": str(dest), "set_name": "disk", "state": "verified"})
        assert verified.result is not None and not verified.result.get("failed"), verified.result


def test_next_run_completes_a_killed_tasks_commit(fleet_dir: Path) -> None:
    """The kill the trials hit only by chance, made on purpose: a task killed while its active block-commit waits in
    'ready' for job-complete (and one killed after the merge, before deleting the overlay). It failed before: the job
    stayed 'ready' forever and every later task was refused ("An earlier vmsnap job ... is still ready")."""
    vm = NoOsVM(fleet_dir, "kills-ready", disks=1, memory_mib=64).create_disks(0xAA, "16M")
    vm.start()
    try:
        sock = str(vm.qmp)
        args = {"socket": sock, "name": "e", "mode": "external", "vmstate": False}
        ok_run = run_module("qmp_live_snapshot", {**args, "state": "present"})
        assert ok_run.result and ok_run.result["changed"], ok_run.result
        vm.write(0x77)
        overlay = vm.active_file()
        assert overlay.name == "disk0.vmsnap-e.qcow2"
        job_id = f"vmsnap-commit-{dead_pid()}-1"
        nodes = qmp(vm.qmp, "query-named-block-nodes")
        top = next(n["node-name"] for n in nodes if n["file"] == str(overlay) and n["drv"] == "qcow2")
        base = next(n["node-name"] for n in nodes if n["file"] == str(vm.disks[0]) and n["drv"] == "qcow2")
        device = next(b["inserted"]["node-name"] for b in qmp(vm.qmp, "query-block"))
        qmp(
            vm.qmp,
            "block-commit",
            {"job-id": job_id, "device": device, "top-node": top, "base-node": base, "auto-dismiss": False},
        )
        for dummy in range(200):
            if [j["status"] for j in qmp(vm.qmp, "query-jobs")] == ["ready"]:
                break
            time.sleep(0.05)
        result = converge("qmp_live_snapshot", {**args, "state": "absent"})
        assert result["changed"] is True
        assert any(job_id in str(w) for w in result.get("warnings") or []), result
        assert qmp(vm.qmp, "query-jobs") == []
        assert vm.active_file() == vm.disks[0] and not overlay.exists()
        assert vm.reads(0x77)
        qemu_img_check(vm.disks[0], shared=True)

        # Killed after the merge, before the unlink: the file outside the chain reads the same as the disk.
        ok_run = run_module("qmp_live_snapshot", {**args, "state": "present"})
        vm.write(0x78)
        qmp(vm.qmp, "block-commit", {"job-id": f"vmsnap-commit-{dead_pid()}-2", "device": device, "auto-dismiss": True})
        for dummy in range(200):
            jobs = qmp(vm.qmp, "query-jobs")
            if jobs and jobs[0]["status"] == "ready":
                qmp(vm.qmp, "job-complete", {"id": jobs[0]["id"]})
            if not jobs and vm.active_file() == vm.disks[0]:
                break
            time.sleep(0.05)
        assert overlay.exists() and vm.active_file() == vm.disks[0]
        result = converge("qmp_live_snapshot", {**args, "state": "absent"})
        assert result["changed"] is True and not overlay.exists(), result
        assert vm.reads(0x78)
    finally:
        vm.kill()


def test_next_run_replaces_an_unused_claim(fleet_dir: Path) -> None:
    """A task killed between claiming its overlay file (created empty, O_EXCL) and QEMU's transaction left an empty
    file with the overlay's name. It failed before: every later run refused ("already exists but is not part of that
    disk's chain"). A non-empty file there is still refused."""
    vm = NoOsVM(fleet_dir, "kills-claim", disks=1, memory_mib=64).create_disks(0xAA, "16M")
    vm.start()
    try:
        args = {"socket": str(vm.qmp), "name": "e", "mode": "external", "vmstate": False, "state": "present"}
        claim = vm.disks[0].with_name("disk0.vmsnap-e.qcow2")
        claim.write_bytes(b"x")
        refused = run_module("qmp_live_snapshot", args)
        assert refused.result and refused.result.get("failed") and "already exists" in refused.result["msg"]
        assert claim.read_bytes() == b"x" and vm.active_file() == vm.disks[0]
        claim.write_bytes(b"")
        checked = run_module("qmp_live_snapshot", {**args, "_ansible_check_mode": True})
        assert checked.result and checked.result["changed"] is True and not checked.result.get("failed")
        assert claim.exists() and claim.stat().st_size == 0
        result = converge("qmp_live_snapshot", args)
        assert result["changed"] is True and vm.active_file() == claim
        assert any("claimed and never used" in str(w) for w in result.get("warnings") or []), result
        vm.write(0x79)
        assert vm.reads(0x79)
    finally:
        vm.kill()


def test_next_run_resumes_a_guest_a_killed_task_paused(fleet_dir: Path) -> None:
    """A task killed between its stop and its cont (a state save, a revert that drops bitmaps) left the guest paused
    with its marker /objects/vmsnap-paused-<pid> in QEMU. The next run resumes it (check mode only says so); a guest
    paused by someone else (no marker, or a marker of a process that still runs) stays paused. It failed before: the
    guest stayed paused for good and nothing said why."""
    vm = NoOsVM(fleet_dir, "kills-paused", disks=1, memory_mib=64).create_disks(0xAA, "16M")
    vm.start()
    try:
        args = {"socket": str(vm.qmp), "name": "p", "vmstate": False}

        def objects() -> list[str]:
            return sorted(o["name"] for o in qmp(vm.qmp, "qom-list", {"path": "/objects"}) if "vmsnap" in o["name"])

        def killed_task_paused(pid: int) -> str:
            marker = f"vmsnap-paused-{pid}"
            qmp(vm.qmp, "object-add", {"qom-type": "secret", "id": marker, "data": "vmsnap"})
            qmp(vm.qmp, "stop")
            return marker

        marker = killed_task_paused(dead_pid())
        checked = run_module("qmp_live_snapshot", {**args, "_ansible_check_mode": True})
        assert checked.result and not checked.result.get("failed"), checked.result
        assert "the real run resumes it first" in str(checked.result.get("warnings"))
        assert vm_status(vm) == "paused" and objects() == [marker]
        result = converge("qmp_live_snapshot", args)
        assert result["changed"] is True and "it was resumed" in str(result.get("warnings")), result
        assert vm_status(vm) == "running" and objects() == [] and snapshots(vm.disks[0]) == ["p"]

        # The same with nothing else to do: resuming is the change.
        marker = killed_task_paused(dead_pid())
        result = converge("qmp_live_snapshot", args)
        assert result["changed"] is True and vm_status(vm) == "running" and objects() == []
        marker = killed_task_paused(dead_pid())
        result = converge("qmp_vm_state", {"socket": str(vm.qmp), "path": str(fleet_dir / "s.vmstate")})
        assert "it was resumed" in str(result.get("warnings")), result
        assert vm_status(vm) == "running" and objects() == []

        # Paused by someone else: left paused.
        qmp(vm.qmp, "stop")
        ours = killed_task_paused(os.getpid())  # a marker whose task still runs
        result = converge("qmp_live_snapshot", {**args, "state": "absent"})
        assert result["changed"] is True and vm_status(vm) == "paused" and objects() == [ours]
        assert snapshots(vm.disks[0]) == []
    finally:
        vm.kill()


def test_next_run_removes_the_private_folder_of_a_run_killed_after_its_change(tmp_path: Path) -> None:
    """qcow2_chain flattened/present killed after the new image got its name but before its private folder was
    removed: the image is as requested, so the next run changes nothing, and it used to leave the folder for good
    (the kill trials found it: qcow2_chain_flattened, a kill right after the rename)."""
    import subprocess

    base, overlay = make_chain(tmp_path)
    flat = tmp_path / "flat.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(overlay), str(flat)], check=True)
    leftovers = [tmp_path / ".flat.qcow2.vmsnap-flatten.tmp", tmp_path / ".top.qcow2.vmsnap-create.tmp"]
    for folder in leftovers:
        folder.mkdir(mode=0o700)
    (leftovers[0] / "flat.qcow2").write_bytes(b"")  # what a kill during the convert leaves (here: a stand-in)
    result = converge("qcow2_chain", {"path": str(flat), "state": "flattened"})
    assert result["changed"] is False and not leftovers[0].exists(), result
    result = converge("qcow2_chain", {"path": str(overlay), "backing": str(base)})
    assert result["changed"] is False and not leftovers[1].exists(), result
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.qcow2", "flat.qcow2", "top.qcow2"]
    assert qemu_io_reads(flat, 0xBB, "0", "8M") and qemu_io_reads(flat, 0x11, "8M", "8M")


def test_next_run_cancels_a_killed_live_backup_job(fleet_dir: Path) -> None:
    """qcow2_backup on a running VM killed while its job copies (auto-finalize is off, so the job then waits in
    QEMU for a job-finalize that never comes) leaves the job with its copy-before-write filter on top of the disk.
    The next run used to refuse the disk ("is copy-before-write, not qcow2") before it reached its clean-up; now it
    cancels the leftover job first (the kill trials found it: qcow2_backup_live)."""
    import signal

    from kill_trials import start_module

    vm = NoOsVM(fleet_dir, "kills-pending", disks=1, memory_mib=64).create_disks(0xAA, "64M")
    vm.start()
    dest = fleet_dir / "backups"
    dest.mkdir()
    try:
        vm.qemu_io("drive0", "write -P 0x22 1M 48M")
        args = {"socket": str(vm.qmp), "dest_dir": str(dest)}
        index = dest / "disk0" / "index.json"
        proc, args_file = start_module("qcow2_backup", args)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            # The job copies into the backup's temporary file: kill once it holds some of the data.
            if any(p.stat().st_size > 4 << 20 for p in index.parent.glob("*") if p.name != index.name):
                break
            time.sleep(0.002)
        assert proc.poll() is None, "the backup finished before it could be killed while its job ran"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        os.unlink(args_file)
        jobs = qmp(vm.qmp, "query-jobs")
        assert [job["id"] for job in jobs] == ["vmsnap-backup-disk0"], jobs
        result = converge("qcow2_backup", args)
        assert result["changed"] is True
        assert "Cancelled the leftover backup job vmsnap-backup-disk0" in str(result.get("warnings")), result
        assert qmp(vm.qmp, "query-jobs") == []
        assert vm.active_file() == vm.disks[0] and vm.reads(0xAA)
        verified = run_module("qcow2_backup", {"dest_dir": str(dest), "set_name": "disk0", "state": "verified"})
        assert verified.result is not None and not verified.result.get("failed"), verified.result
    finally:
        vm.kill()


def test_next_run_retakes_a_checkpoint_with_ram_whose_task_was_killed(fleet_dir: Path) -> None:
    """An external checkpoint with RAM killed after its overlays and before its state file was renamed into place:
    overlays, no state file, the killed task's temporary state file beside it. The next run used to refuse it ("has
    its overlays, but no RAM state file") for good; now it merges the overlays back (the RAM of their instant is lost)
    and takes the checkpoint again. Without the killed task's temporary file it still refuses (found by the kill
    trials: qmp_live_snapshot_checkpoint_ram_present)."""
    vm = NoOsVM(fleet_dir, "kills-half", disks=1, memory_mib=64).create_disks(0xAA, "16M")
    vm.start()
    try:
        base = {"socket": str(vm.qmp), "name": "c", "mode": "external"}
        assert ok_run("qmp_live_snapshot", {**base, "vmstate": False})["changed"]
        vm.write(0x91)  # into the overlay
        state = vm.folder / "disk0.vmsnap-c.vmstate"
        refused = run_module("qmp_live_snapshot", {**base, "vmstate": True})
        assert refused.result and refused.result.get("failed") and "no RAM state file" in refused.result["msg"]
        temp = vm.folder / f".disk0.vmsnap-c.vmstate.vmsnap-tmp-{dead_pid()}-17"
        temp.write_bytes(b"QEVM")
        checked = run_module("qmp_live_snapshot", {**base, "vmstate": True, "_ansible_check_mode": True})
        assert checked.result and checked.result["changed"] is True and not checked.result.get("failed")
        assert "The real run merges the overlays back" in str(checked.result.get("warnings"))
        assert vm.active_file().name == "disk0.vmsnap-c.qcow2" and temp.exists()
        result = converge("qmp_live_snapshot", {**base, "vmstate": True})
        assert result["changed"] is True and "took the checkpoint again" in str(result.get("warnings")), result
        names = sorted(p.name for p in vm.folder.iterdir() if "vmsnap" in p.name)
        assert names == ["disk0.vmsnap-c.qcow2", "disk0.vmsnap-c.vmstate", "disk0.vmsnap-c.vmstate.json"], names
        assert state.stat().st_size > 0 and vm_status(vm) == "running" and vm.reads(0x91)
        assert backing(vm.active_file()) == str(vm.disks[0]) and qemu_io_reads(vm.disks[0], 0x91)
    finally:
        vm.kill()


def test_killed_offline_incremental_leaves_the_disk_clean(tmp_path: Path) -> None:
    """qcow2_backup offline incremental killed while its helper qemu-storage-daemon copies: the daemon (which has the
    disk open read-write for its bitmaps) quits with its parent, so qemu-img check finds nothing wrong with the disk
    and the next run takes a full backup that verifies. (A kill trial once found two leaked clusters in the disk after
    a kill near the end of an incremental, when the daemon got SIGKILL with its parent; it now gets SIGTERM and closes
    the disk as on quit. This test kills mid-copy, where the old SIGKILL left the disk clean too: it does not
    reproduce that trial.)"""
    import signal
    import subprocess

    from kill_trials import start_module

    image, dest = tmp_path / "disk.qcow2", tmp_path / "backups"
    dest.mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "96M"], check=True)
    qemu_io_write(image, 0xAA, "0", "1M")
    args = {"path": str(image), "dest_dir": str(dest)}
    ok_run("qcow2_backup", args)
    qemu_io_write(image, 0x33, "1M", "64M")  # the incremental has 64 MiB to copy
    proc, args_file = start_module("qcow2_backup", args)
    deadline = time.monotonic() + 60
    folder = dest / "disk"
    while time.monotonic() < deadline and proc.poll() is None:
        if any(p.stat().st_size > 8 << 20 for p in folder.glob(".tmp-*")):
            break
        time.sleep(0.002)
    assert proc.poll() is None, "the incremental ended before it could be killed while copying"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    os.unlink(args_file)
    deadline = time.monotonic() + 30
    while subprocess.run(["pgrep", "-s", str(proc.pid)], capture_output=True, check=False).returncode == 0:
        assert time.monotonic() < deadline, "the helper daemon outlived its module by 30 s"
        time.sleep(0.02)
    qemu_img_check(image)
    assert qemu_io_reads(image, 0x33, "1M", "64M")
    again = converge("qcow2_backup", args)
    assert again["changed"] is True
    verified = run_module("qcow2_backup", {"dest_dir": str(dest), "set_name": "disk", "state": "verified"})
    assert verified.result is not None and all(v["ok"] for v in verified.result["verified"]), verified.result


def test_next_run_recognises_a_restore_whose_task_was_killed(fleet_dir: Path) -> None:
    """qmp_vm_state restored killed after QEMU loaded the state and before the task recorded the restore in the
    sidecar (what the sidecar's last_restore would say is missing): the QEMU is then paused, no longer waiting for a
    state, and the next run used to refuse it ("not waiting for an incoming state") although the state is in. A marker
    object the task adds before the load (vmsnap-restored-<sha256 prefix>) now tells the next run, which resumes the
    guest (found by the kill trials: qmp_vm_state_restored)."""
    import json

    vm = NoOsVM(fleet_dir, "kills-restored", disks=1, memory_mib=64).create_disks(0xAA, "16M")
    vm.start()
    state = fleet_dir / "r.vmstate"
    sidecar = fleet_dir / "r.vmstate.json"
    try:
        vm.write(0x73)
        assert ok_run("qmp_vm_state", {"socket": str(vm.qmp), "path": str(state), "after": "quit"})["changed"]
        recorded = json.loads(sidecar.read_text())
        vm.kill()
        vm.start(["-incoming", "defer"])
        args = {"socket": str(vm.qmp), "path": str(state), "state": "restored"}
        assert ok_run("qmp_vm_state", {**args, "after": "paused"})["changed"]
        assert vm_status(vm) == "paused"
        sidecar.write_text(json.dumps(recorded))  # as if the task had been killed before it recorded the restore
        result = converge("qmp_vm_state", args)
        assert result["changed"] is True and vm_status(vm) == "running", result
        assert "already restored" in result.get("msg", ""), result
        assert vm.reads(0x73)
    finally:
        vm.kill()
