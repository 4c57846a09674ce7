# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Issue 11 item 3, running VMs (VMs without a guest OS, tests/vm/fleet.py; one QEMU per task kind, reused from
trial to trial): SIGKILL of qmp_live_snapshot, qmp_vm_state and live qcow2_backup at seeded moments of their work
(kill_trials.py). After each kill, once QEMU no longer writes: every layer passes qemu-img check -U, the data written
through the VM before the task reads back, the VM runs, the next run converges, and no vmsnap job is left in QEMU."""

from __future__ import annotations

import typing as t
from pathlib import Path

import pytest
from fleet import NoOsVM
from kill_trials import (
    backing,
    flush,
    measure,
    qemu_img_check,
    qmp,
    run_module,
    settle,
    snapshots,
    trial,
    trial_indexes,
    vm_status,
    vmsnap_jobs,
)


@pytest.fixture
def live_vm(fleet_dir: Path) -> t.Iterator[NoOsVM]:
    vm = NoOsVM(fleet_dir, "kills", disks=1, memory_mib=64).create_disks(0xAA, "16M")
    vm.start()
    yield vm
    vm.kill()


def test_kill_qmp_live_snapshot_internal(live_vm: NoOsVM) -> None:
    vm = live_vm
    sock = str(vm.qmp)
    # One cycle: checkpoint with RAM, guest writes, revert, release; disk-only snapshot, release.
    cycle: list[tuple[str, dict[str, t.Any]]] = [
        ("present_vmstate", {"name": "a", "state": "present"}),
        ("reverted", {"name": "a", "state": "reverted"}),
        ("absent_vmstate", {"name": "a", "state": "absent"}),
        ("present_disk_only", {"name": "b", "state": "present", "vmstate": False}),
        ("absent_disk_only", {"name": "b", "state": "absent", "vmstate": False}),
    ]
    durations = {}
    for label, args in cycle:
        durations[label] = measure("qmp_live_snapshot", {"socket": sock, **args})
    expected = {"a": 0xAA}

    def observe() -> tuple[t.Any, ...]:
        return (snapshots(vm.disks[0]), vm_status(vm))

    def check() -> None:
        settle(vm)
        flush(vm, "drive0")  # a -U check reads what QEMU has written, not its caches
        qemu_img_check(vm.disks[0], shared=True)

    for index in trial_indexes("qmp_live_snapshot_internal", 10):
        label, args = cycle[index % len(cycle)]
        if label == "present_vmstate":
            pattern = 0x20 + index
            vm.write(pattern)
            expected["a"] = pattern
        elif label == "reverted":
            vm.write(0xEE)  # written after the checkpoint: the revert throws it away
        current = expected["a"] if label != "present_disk_only" else None
        group = f"qmp_live_snapshot_{label}"
        wanted_snaps = {"present_vmstate": ["a"], "reverted": ["a"], "present_disk_only": ["b"]}.get(label, [])
        trial(
            group,
            index,
            durations[label],
            "qmp_live_snapshot",
            {"socket": sock, **args},
            observe,
            check,
            (wanted_snaps, "running"),
        )
        assert vmsnap_jobs(vm) == [], f"{group}:{index}: jobs left in QEMU: {vmsnap_jobs(vm)}"
        if current is not None and label != "absent_disk_only":
            assert vm.reads(current), f"{group}:{index}: the guest does not read {current:#x}"
        assert vm_status(vm) == "running"


def test_kill_qmp_live_snapshot_external(fleet_dir: Path) -> None:
    vm = NoOsVM(fleet_dir, "kills-ext", disks=2, memory_mib=64).create_disks(0xAA, "16M")
    vm.start()
    try:
        sock = str(vm.qmp)
        cycle = [
            (
                "qmp_live_snapshot_external_present",
                {"name": "e", "mode": "external", "state": "present", "vmstate": False},
            ),
            (
                "qmp_live_snapshot_external_absent",
                {"name": "e", "mode": "external", "state": "absent", "vmstate": False},
            ),
        ]
        durations = {}
        for label, args in cycle:
            if label == "qmp_live_snapshot_external_absent":
                for drive in ("drive0", "drive1"):
                    vm.qemu_io(drive, "write -P 0x31 0 8M")  # data for the commit to merge
            durations[label] = measure("qmp_live_snapshot", {"socket": sock, **args})

        def observe() -> tuple[t.Any, ...]:
            return (
                sorted(p.name for p in vm.folder.iterdir() if p.suffix == ".qcow2"),
                [vm.active_file(d).name for d in ("drive0", "drive1")],
                vm_status(vm),
            )

        def check() -> None:
            settle(vm)
            for drive in ("drive0", "drive1"):
                flush(vm, drive)
                image = vm.active_file(drive)
                qemu_img_check(image, shared=True)
                if backing(image):
                    qemu_img_check(Path(backing(image) or ""), shared=True)

        for index in trial_indexes("qmp_live_snapshot_external", 6):
            label, args = cycle[index % len(cycle)]
            pattern = 0x40 + index
            for drive in ("drive0", "drive1"):
                vm.qemu_io(drive, f"write -P {pattern:#x} 0 8M")
            disks = ["disk0.qcow2", "disk1.qcow2"]
            if label == "qmp_live_snapshot_external_present":
                overlays = ["disk0.vmsnap-e.qcow2", "disk1.vmsnap-e.qcow2"]
                target = (sorted(disks + overlays), overlays, "running")
            else:
                target = (disks, disks, "running")
            trial(label, index, durations[label], "qmp_live_snapshot", {"socket": sock, **args}, observe, check, target)
            assert vmsnap_jobs(vm) == [], f"{label}:{index}: jobs left in QEMU: {vmsnap_jobs(vm)}"
            for drive in ("drive0", "drive1"):
                assert vm.reads(pattern, drive), f"{label}:{index}: {drive} does not read {pattern:#x}"
    finally:
        vm.kill()


def test_kill_qmp_vm_state_saved(fleet_dir: Path) -> None:
    vm = NoOsVM(fleet_dir, "kills-state", disks=1, memory_mib=64).create_disks(0xAA, "16M")
    vm.start()
    try:
        sock = str(vm.qmp)
        folder = fleet_dir / "states"
        folder.mkdir()
        window = measure("qmp_vm_state", {"socket": sock, "path": str(folder / "m.vmstate")})
        ok_absent = {"path": str(folder / "m.vmstate"), "state": "absent"}
        run_module("qmp_vm_state", ok_absent)

        def observe() -> tuple[t.Any, ...]:
            return (sorted(p.name for p in folder.iterdir()), vm_status(vm))

        def check() -> None:
            settle(vm)
            flush(vm, "drive0")
            qemu_img_check(vm.disks[0], shared=True)
            assert vm.reads(0xAA), "the guest's disk lost its data"

        for index in trial_indexes("qmp_vm_state_saved", 4):
            path = folder / f"s{index}.vmstate"
            target = ([path.name, f"{path.name}.json"], "running")
            trial(
                "qmp_vm_state_saved",
                index,
                window,
                "qmp_vm_state",
                {"socket": sock, "path": str(path)},
                observe,
                check,
                target,
            )
            caps = {c["capability"]: c["state"] for c in qmp(vm.qmp, "query-migrate-capabilities")}
            assert caps.get("background-snapshot") is False, f"migration settings not put back: {caps}"
            assert qmp(vm.qmp, "query-migrate").get("status") in (None, "completed"), "a migration is left"
            run_module("qmp_vm_state", {"path": str(path), "state": "absent"})
    finally:
        vm.kill()


def test_kill_qmp_live_snapshot_external_with_ram(fleet_dir: Path) -> None:
    """The checkpoint with RAM: overlays and a state file of one instant, for one pause (stop -> overlays -> migrate
    -> cont); absent merges the overlays and deletes the state file."""
    vm = NoOsVM(fleet_dir, "kills-ram", disks=1, memory_mib=64).create_disks(0xAA, "16M")
    vm.start()
    try:
        sock = str(vm.qmp)
        base = {"socket": sock, "name": "c", "mode": "external", "vmstate": True}
        cycle = [
            ("qmp_live_snapshot_checkpoint_ram_present", "present"),
            ("qmp_live_snapshot_checkpoint_ram_absent", "absent"),
        ]
        windows = {label: measure("qmp_live_snapshot", {**base, "state": state}) for label, state in cycle}

        def observe() -> tuple[t.Any, ...]:
            return (sorted(p.name for p in vm.folder.iterdir() if "vmsnap" in p.name), vm_status(vm))

        def check() -> None:
            settle(vm)
            flush(vm, "drive0")
            image = vm.active_file()
            qemu_img_check(image, shared=True)
            if backing(image):
                qemu_img_check(Path(backing(image) or ""), shared=True)

        files = ["disk0.vmsnap-c.qcow2", "disk0.vmsnap-c.vmstate", "disk0.vmsnap-c.vmstate.json"]
        for index in trial_indexes("qmp_live_snapshot_external_ram", 4):
            label, state = cycle[index % len(cycle)]
            pattern = 0x60 + index
            vm.write(pattern)
            target = (files if state == "present" else [], "running")
            trial(label, index, windows[label], "qmp_live_snapshot", {**base, "state": state}, observe, check, target)
            assert vmsnap_jobs(vm) == [], f"{label}:{index}: jobs left in QEMU: {vmsnap_jobs(vm)}"
            assert vm.reads(pattern), f"{label}:{index}: the guest does not read {pattern:#x}"
    finally:
        vm.kill()


def test_kill_qmp_vm_state_restored(fleet_dir: Path) -> None:
    """A restore into a QEMU waiting with -incoming defer: QEMU reads the file through the descriptor it was given,
    so a killed module does not stop it; the next run finds the state already restored into this process."""
    vm = NoOsVM(fleet_dir, "kills-restore", disks=1, memory_mib=64).create_disks(0xAA, "16M")
    vm.start()
    state = fleet_dir / "restore.vmstate"
    try:
        vm.write(0x71)
        ok_save = run_module("qmp_vm_state", {"socket": str(vm.qmp), "path": str(state), "after": "quit"})
        assert ok_save.result and ok_save.result["changed"], ok_save.result
        args = {"socket": str(vm.qmp), "path": str(state), "state": "restored"}

        def fresh() -> None:
            vm.kill()
            vm.start(["-incoming", "defer"])

        fresh()
        window = measure("qmp_vm_state", args)

        def observe() -> str:
            return vm_status(vm)

        def check() -> None:
            settle(vm)
            flush(vm, "drive0")
            qemu_img_check(vm.disks[0], shared=True)
            assert vm.reads(0x71)

        for index in trial_indexes("qmp_vm_state_restored", 3):
            fresh()
            trial("qmp_vm_state_restored", index, window, "qmp_vm_state", args, observe, check, "running")
    finally:
        vm.kill()


def test_kill_qcow2_backup_live(fleet_dir: Path) -> None:
    vm = NoOsVM(fleet_dir, "kills-backup", disks=1, memory_mib=64).create_disks(0xAA, "32M")
    vm.start()
    dest = fleet_dir / "backups"
    dest.mkdir()
    try:
        vm.qemu_io("drive0", "write -P 0x21 1M 8M")
        args = {"socket": str(vm.qmp), "dest_dir": str(dest)}
        window = measure("qcow2_backup", {**args, "mode": "full"})

        def observe() -> list[str]:
            return sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())

        def check() -> None:
            settle(vm)
            flush(vm, "drive0")
            qemu_img_check(vm.disks[0], shared=True)
            assert vm.reads(0xAA), "the disk lost its data"

        for index in trial_indexes("qcow2_backup_live", 3):
            vm.qemu_io("drive0", f"write -P {0x80 + index:#x} {10 + index}M 1M")
            mode = "full" if index % 2 == 0 else "auto"
            trial("qcow2_backup_live", index, window, "qcow2_backup", {**args, "mode": mode}, observe, check)
            jobs = qmp(vm.qmp, "query-jobs")
            assert jobs == [], f"qcow2_backup_live:{index}: jobs left in QEMU: {jobs}"
            verified = run_module("qcow2_backup", {"dest_dir": str(dest), "set_name": "disk0", "state": "verified"})
            assert verified.result is not None and not verified.result.get("failed"), verified.result
    finally:
        vm.kill()
