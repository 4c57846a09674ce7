# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The pure decisions of checkpoint_preflight: method table, refusals, counts, the /proc scan over a fake /proc
tree, space sums per file system. VMs come from the QEMU 7.2.22 recordings (fixtures/qemu-7.2.22/live-*.json)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import typing as t

import pytest

from ansible_collections.vmsnap.qemu.plugins.module_utils._errors import VmsnapError
from ansible_collections.vmsnap.qemu.plugins.module_utils._preflight import (
    Disk,
    Preflight,
    PreflightRefusal,
    PreflightRequest,
    SpaceNeed,
    VmView,
    bitmap_warnings,
    check_counts,
    connect,
    count_after,
    decide_method,
    disk_from_qmp,
    files_to_scan,
    find_holders,
    human_size,
    plan_running,
    plan_stopped,
    refuse_formats,
    refuse_holders,
    refuse_jobs,
    refuse_old_qemu,
    refuse_short,
    refuse_status,
    space_needs,
    stopped_view,
    sum_space,
)
from ansible_collections.vmsnap.qemu.tests.unit.plugins.module_utils.qmp_fakes import load_recording

GIB = 1024**3
MIB = 1024**2


def refusal(func: t.Callable[..., t.Any], *args: t.Any) -> PreflightRefusal:
    with pytest.raises(PreflightRefusal) as info:
        func(*args)
    assert info.value.msg.startswith("VM web01: ")
    assert info.value.details["reason"] == info.value.reason
    return info.value


def running_view(recorded: t.Any, name: str, root: pathlib.Path, ram: int = GIB) -> VmView:
    recording = load_recording(recorded.json(f"{name}.json"), root)
    vm = recording.vm
    return VmView(
        running=True,
        status=vm["status"],
        disks=[disk_from_qmp(disk) for disk in vm["block_devices"] if disk["writable"]],
        qemu_version="7.2.22",
        version=recording.version,
        ram_size=ram,
        pid=4711,
        jobs=vm["jobs"],
        described=vm,
    )


def qcow2(file: str, size: int = 10 * GIB, snapshots: tuple[str, ...] = (), depth: int = 0) -> Disk:
    chain = (file,) + tuple(f"{file}.base{i}" for i in range(depth))
    return Disk(file=file, format="qcow2", virtual_size=size, snapshot_names=snapshots, chain_files=chain)


# --- method --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "requested, running, can_restart, expected",
    [
        ("auto", True, True, "external"),
        ("auto", True, False, "internal"),
        ("internal", True, True, "internal"),
        ("internal", True, False, "internal"),
        ("external", True, True, "external"),
        ("auto", False, False, "offline"),
        ("auto", False, True, "offline"),
        ("offline", False, False, "offline"),
    ],
)
def test_method_table(requested: str, running: bool, can_restart: bool, expected: str) -> None:
    assert decide_method("web01", requested, running, can_restart) == expected


@pytest.mark.parametrize(
    "requested, running, can_restart, words",
    [
        ("offline", True, True, "it is running; an offline checkpoint needs it stopped"),
        ("offline", True, False, "it is running; an offline checkpoint needs it stopped"),
        ("external", True, False, "restarts QEMU: set vmsnap_vm_start"),
        ("internal", False, True, "it is stopped; an internal checkpoint"),
        ("external", False, True, "it is stopped; an external checkpoint"),
    ],
)
def test_method_refusals(requested: str, running: bool, can_restart: bool, words: str) -> None:
    exc = refusal(decide_method, "web01", requested, running, can_restart)
    assert exc.reason == "method" and words in exc.msg


def test_ram_checkpoints_need_qemu_6() -> None:
    exc = refusal(refuse_old_qemu, "web01", "internal", (5, 2, 0))
    assert exc.reason == "version" and "QEMU 5.2.0" in exc.msg
    refuse_old_qemu("web01", "external", (6, 0, 0))
    refuse_old_qemu("web01", "offline", None)


# --- status and jobs ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", ["running", "paused"])
def test_running_and_paused_pass(status: str) -> None:
    refuse_status("web01", status)


@pytest.mark.parametrize(
    "status",
    ["prelaunch", "inmigrate", "postmigrate", "restore-vm", "internal-error", "io-error", "guest-panicked",
     "shutdown", "save-vm", "finish-migrate", "suspended", "watchdog"],
)  # fmt: skip
def test_other_statuses_are_refused(status: str) -> None:
    exc = refusal(refuse_status, "web01", status)
    assert exc.reason == "status" and f"status {status!r}" in exc.msg and exc.details["vm_status"] == status


def test_a_running_block_job_is_refused_by_name(recorded: t.Any, tmp_path: pathlib.Path) -> None:
    view = running_view(recorded, "live-mixed-mirror-job", tmp_path)
    exc = refusal(refuse_jobs, "web01", view.jobs)
    assert exc.reason == "job" and "mirror job 'nightly-copy' (status ready)" in exc.msg
    refuse_jobs("web01", [{"id": "done", "type": "commit", "status": "concluded"}])


def test_a_killed_tasks_job_is_left_to_the_checkpoint_and_a_living_tasks_is_refused() -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    refuse_jobs("web01", [{"id": f"vmsnap-commit-{gone.pid}-1", "type": "commit", "status": "ready"}])
    exc = refusal(refuse_jobs, "web01", [{"id": f"vmsnap-commit-{os.getpid()}-1", "type": "commit", "status": "ready"}])
    assert exc.reason == "job" and f"'vmsnap-commit-{os.getpid()}-1' (status ready)" in exc.msg


# --- disks and plan -------------------------------------------------------------------------------------------------


def test_internal_names_the_raw_disk(recorded: t.Any, tmp_path: pathlib.Path) -> None:
    view = running_view(recorded, "live-mixed-fresh", tmp_path)
    expected = [f"{tmp_path}/disk0.qcow2", f"{tmp_path}/data.raw", f"{tmp_path}/disk2.qcow2"]
    assert [disk.file for disk in view.disks] == expected
    exc = refusal(refuse_formats, "web01", "internal", view.disks)
    assert exc.reason == "format" and f"disk {tmp_path}/data.raw is raw" in exc.msg
    refuse_formats("web01", "external", view.disks)  # overlays go on top of any format


def test_offline_needs_qcow2_and_a_disk() -> None:
    raw = Disk(file="/v/a.img", format="raw", virtual_size=GIB)
    exc = refusal(refuse_formats, "web01", "offline", [raw])
    assert "offline checkpoint needs every writable disk in qcow2" in exc.msg
    assert refusal(refuse_formats, "web01", "offline", []).reason == "disks"


def test_plan_internal_running(recorded: t.Any, tmp_path: pathlib.Path) -> None:
    view = running_view(recorded, "live-chain-two-overlays", tmp_path)
    preflight = plan_running(PreflightRequest(vm="web01", name="cp1"), view, "internal")
    assert preflight.vmstate_disk == f"{tmp_path}/a.vmsnap-e2.qcow2" and preflight.state_file is None
    assert not preflight.exists and [disk.overlay for disk in view.disks] == [None, None]
    assert preflight.message() == "VM web01 can be checkpointed: internal checkpoint with RAM, 2 disks"


def test_plan_external_running_names_overlays_and_state_file(recorded: t.Any, tmp_path: pathlib.Path) -> None:
    view = running_view(recorded, "live-chain-two-overlays", tmp_path)
    preflight = plan_running(PreflightRequest(vm="web01", name="cp1"), view, "external")
    assert [disk.overlay for disk in view.disks] == [f"{tmp_path}/a.vmsnap-cp1.qcow2", f"{tmp_path}/b.vmsnap-cp1.qcow2"]
    assert preflight.state_file == f"{tmp_path}/a.vmsnap-cp1.vmstate"
    assert [disk.result()["chain_depth"] for disk in view.disks] == [2, 2]


def test_plan_external_existing_checkpoint_is_a_rerun(recorded: t.Any, tmp_path: pathlib.Path) -> None:
    view = running_view(recorded, "live-chain-two-overlays", tmp_path)
    for name in ("a.vmsnap-e2.vmstate", "a.vmsnap-e2.vmstate.json"):
        (tmp_path / name).write_text("x")
    preflight = plan_running(PreflightRequest(vm="web01", name="e2"), view, "external")
    assert preflight.exists and all(disk.taken for disk in view.disks)
    assert [count_after(disk, "external") for disk in view.disks] == [2, 2]  # not counted twice
    assert space_needs(preflight) == []


def test_plan_refusals_of_the_live_planner_are_passed_on(recorded: t.Any, tmp_path: pathlib.Path) -> None:
    view = running_view(recorded, "live-chain-two-overlays", tmp_path)
    (tmp_path / "b.vmsnap-cp1.qcow2").write_text("in the way")
    exc = refusal(plan_running, PreflightRequest(vm="web01", name="cp1"), view, "external")
    assert exc.reason == "plan" and "b.vmsnap-cp1.qcow2" in exc.msg and "already exists" in exc.msg


def test_plan_stopped_marks_existing_snapshots() -> None:
    view = stopped_view([qcow2("/v/a.qcow2", snapshots=("cp1",)), qcow2("/v/b.qcow2")])
    preflight = plan_stopped(PreflightRequest(vm="web01", name="cp1"), view)
    assert [disk.taken for disk in view.disks] == [True, False] and not preflight.exists
    assert preflight.message().startswith("VM web01 can be checkpointed: offline checkpoint")


# --- counts ---------------------------------------------------------------------------------------------------------


def offline(disks: list[Disk], **kwargs: t.Any) -> Preflight:
    return plan_stopped(PreflightRequest(vm="web01", name="cp1", **kwargs), stopped_view(disks))


def test_counts_internal_snapshots_with_the_new_one() -> None:
    assert check_counts(offline([qcow2("/v/a.qcow2", snapshots=("s",) * 9)])) == []  # 10 is not more than 10
    warned = check_counts(offline([qcow2("/v/a.qcow2", snapshots=("s",) * 10)], warn_snapshots=9))
    assert warned == [
        "VM web01: disk /v/a.qcow2 will have 11 internal snapshots (more than 9); each one slows the guest's "
        "writes. Remove old checkpoints."
    ]
    exc = refusal(check_counts, offline([qcow2("/v/a.qcow2", snapshots=("s",) * 20)]))
    assert exc.reason == "snapshots" and "21 internal snapshots" in exc.msg and "max_snapshots (20)" in exc.msg


def test_an_existing_snapshot_of_that_name_is_not_counted_twice() -> None:
    names = ("s",) * 19 + ("cp1",)
    assert check_counts(offline([qcow2("/v/a.qcow2", snapshots=names)], warn_snapshots=30)) == []


def test_external_counts_chain_depth_plus_one() -> None:
    disk = qcow2("/v/a.qcow2", depth=3)
    assert count_after(disk, "external") == 4
    preflight = Preflight(PreflightRequest(vm="web01", name="cp1", max_snapshots=3), stopped_view([disk]), "external")
    exc = refusal(check_counts, preflight)
    assert "4 backing files (chain depth)" in exc.msg


# --- /proc scan -----------------------------------------------------------------------------------------------------


def fake_proc(root: pathlib.Path, pid: int, comm: str, targets: list[str], readable: bool = True) -> None:
    folder = root / str(pid)
    (folder / "fd").mkdir(parents=True)
    (folder / "comm").write_text(comm + "\n")
    for fd, target in enumerate(targets):
        os.symlink(target, folder / "fd" / str(fd))
    if not readable:
        (folder / "fd").chmod(0)


def test_find_holders_one_pass_over_a_fake_proc(tmp_path: pathlib.Path) -> None:
    proc = tmp_path / "proc"
    images = tmp_path / "vms"
    images.mkdir()
    (images / "a.qcow2").write_text("")
    (images / "b.qcow2").write_text("")
    os.symlink(images / "a.qcow2", images / "link.qcow2")
    a, b = str(images / "a.qcow2"), str(images / "b.qcow2")
    fake_proc(proc, 100, "qemu-system-x86", [a, b, "/dev/null"])  # the VM's own QEMU: excluded
    fake_proc(proc, 200, "python3", ["pipe:[123]", a, a])  # the same file twice: listed once
    fake_proc(proc, 300, "qemu-nbd", [b])
    fake_proc(proc, 400, "bash", ["/dev/pts/0", a + " (deleted)"])
    (proc / "self").mkdir()  # not a pid
    (proc / "500").mkdir()  # a process that ended meanwhile: no fd folder
    holders = find_holders([str(images / "link.qcow2"), b], exclude={100}, proc_root=str(proc))
    assert {path: sorted(procs) for path, procs in holders.items()} == {
        a: [(200, "python3")],
        b: [(300, "qemu-nbd")],
    }
    exc = refusal(refuse_holders, "web01", holders)
    assert exc.reason == "held" and f"{a} by pid 200 (python3)" in exc.msg and f"{b} by pid 300 (qemu-nbd)" in exc.msg
    assert {"file": b, "pid": 300, "command": "qemu-nbd"} in exc.details["holders"]
    refuse_holders("web01", {})


def test_unreadable_proc_entries_are_skipped(tmp_path: pathlib.Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads folders with mode 0")
    proc = tmp_path / "proc"
    fake_proc(proc, 200, "python3", ["/v/a.qcow2"], readable=False)
    assert find_holders(["/v/a.qcow2"], proc_root=str(proc)) == {}


def test_missing_proc_root_finds_nothing(tmp_path: pathlib.Path) -> None:
    assert find_holders(["/v/a.qcow2"], proc_root=str(tmp_path / "none")) == {}


def test_offline_scans_whole_chains_live_only_the_disk_files() -> None:
    disk = qcow2("/v/a.qcow2", depth=1)
    request = PreflightRequest(vm="web01", name="cp1")
    assert files_to_scan(Preflight(request, stopped_view([disk]), "offline")) == ["/v/a.qcow2", "/v/a.qcow2.base0"]
    assert files_to_scan(Preflight(request, stopped_view([disk]), "external")) == ["/v/a.qcow2"]


# --- space ----------------------------------------------------------------------------------------------------------


def test_space_needs_external_internal_offline() -> None:
    request = PreflightRequest(vm="web01", name="cp1", growth_reserve_percent=5)
    a, b = qcow2("/v/a.qcow2", size=20 * GIB), qcow2("/w/b.qcow2", size=10 * GIB)
    a.overlay, b.overlay = "/o/a.vmsnap-cp1.qcow2", "/o/b.vmsnap-cp1.qcow2"
    view = VmView(running=True, status="running", disks=[a, b], ram_size=GIB)
    external = Preflight(request, view, "external", state_file="/o/a.vmsnap-cp1.vmstate")
    assert space_needs(external) == [
        SpaceNeed("/o", growth=GIB),
        SpaceNeed("/o", growth=GIB // 2),
        SpaceNeed("/o", ram_state=GIB + 384 * MIB),
    ]
    internal = Preflight(request, view, "internal", vmstate_disk="/v/a.qcow2")
    assert space_needs(internal) == [
        SpaceNeed("/v", growth=GIB),
        SpaceNeed("/w", growth=GIB // 2),
        SpaceNeed("/v", ram_state=GIB + 384 * MIB),
    ]
    assert space_needs(offline([a, b])) == [SpaceNeed("/v", growth=GIB), SpaceNeed("/w", growth=GIB // 2)]


def test_space_is_summed_per_file_system() -> None:
    devices = {"/v": 1, "/w": 1, "/o": 2}
    free = {"/v": 5 * GIB, "/w": 1, "/o": 300 * MIB}
    needs = [SpaceNeed("/v", growth=GIB), SpaceNeed("/o", growth=400 * MIB), SpaceNeed("/w", growth=GIB // 2),
             SpaceNeed("/o", ram_state=GIB)]  # fmt: skip
    space = sum_space(needs, devices.__getitem__, free.__getitem__)
    assert space == [
        {"path": "/v", "dev": 1, "needed": GIB + GIB // 2, "ram_state": 0, "growth": GIB + GIB // 2, "free": 5 * GIB},
        {"path": "/o", "dev": 2, "needed": GIB + 400 * MIB, "ram_state": GIB, "growth": 400 * MIB, "free": 300 * MIB},
    ]
    exc = refusal(refuse_short, "web01", "external", space)
    assert exc.reason == "space" and exc.msg == (
        "VM web01: not enough free space on the file system of /o: the checkpoint needs 1.4 GiB "
        "(RAM state 1.0 GiB, overlay growth 400 MiB), 300 MiB are free."
    )
    assert exc.details["space"] == space
    refuse_short("web01", "external", space[:1])


def test_a_folder_that_cannot_be_read_is_an_error_not_a_traceback(tmp_path: pathlib.Path) -> None:
    missing = str(tmp_path / "gone")
    expected = f"Cannot check the free space in {missing}: No such file or directory. Nothing was changed."
    with pytest.raises(VmsnapError) as info:  # os.stat fails
        sum_space([SpaceNeed(missing, growth=GIB)])
    assert info.value.msg == expected
    with pytest.raises(VmsnapError) as info:  # os.statvfs fails (the folder went away after the stat)
        sum_space([SpaceNeed(missing, growth=GIB)], device_of=lambda folder: 1)
    assert info.value.msg == expected


def test_a_socket_path_that_is_a_dangling_symlink_is_refused(tmp_path: pathlib.Path) -> None:
    link = tmp_path / "web01.qmp"
    link.symlink_to(tmp_path / "nowhere")
    exc = refusal(connect, "web01", str(link), 1.0)
    assert exc.reason == "socket"
    assert exc.msg == f"VM web01: {link} cannot be read (No such file or directory); give the VM's QMP socket."


def test_space_message_without_ram_names_snapshot_growth() -> None:
    space = [{"path": "/v", "dev": 1, "needed": 2 * GIB, "ram_state": 0, "growth": 2 * GIB, "free": GIB}]
    exc = refusal(refuse_short, "web01", "offline", space)
    assert "needs 2.0 GiB (snapshot growth 2.0 GiB), 1.0 GiB are free" in exc.msg


@pytest.mark.parametrize(
    "size, text",
    [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (400 * MIB, "400 MiB"), (int(1.44 * GIB), "1.4 GiB"),
     (99 * MIB, "99.0 MiB"), (3 * 1024 * GIB, "3.0 TiB"), (5000 * 1024 * GIB, "5000 TiB")],
)  # fmt: skip
def test_human_size(size: int, text: str) -> None:
    assert human_size(size) == text


def test_dirty_bitmaps_warn_for_internal_and_offline_only() -> None:
    disk = qcow2("/v/a.qcow2")
    disk.bitmaps = ("nightly",)
    request = PreflightRequest(vm="web01", name="cp1")
    assert bitmap_warnings(Preflight(request, stopped_view([disk]), "external")) == []
    [warning] = bitmap_warnings(Preflight(request, stopped_view([disk]), "offline"))
    assert warning.startswith("VM web01: disk /v/a.qcow2 has dirty bitmaps (nightly): QEMU refuses to roll back")
    assert "belong to another tool, which vmsnap.qemu never touches" in warning
    disk.bitmaps = ("vmsnap-backup-web01-0123abcd",)
    [warning] = bitmap_warnings(Preflight(request, stopped_view([disk]), "internal"))
    assert warning == (
        "VM web01: disk /v/a.qcow2 has the bitmap of backup set 'web01' (vmsnap.qemu.qcow2_backup): a rollback to "
        "this checkpoint removes it first (the rollback role's vmsnap_rollback_backup_bitmaps, default drop), and "
        "the set's next backup is then a full one."
    )
