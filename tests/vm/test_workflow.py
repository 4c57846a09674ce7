# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The workflow on real VMs: the checkpoint, rollback and release roles and the pre_upgrade playbook, run with
ansible-playbook over fleets of VMs without a guest OS (data checked with qemu-io through the running VM and
offline)."""

from __future__ import annotations

import json
import typing as t
from pathlib import Path

import pytest
from fleet import (
    NoOsVM,
    backing_file,
    guest_vars,
    manifest,
    recap,
    run_playbook,
    snapshot_names,
    write_inventory,
)

HERE = Path(__file__).resolve().parent
OLD, NEW = 0xAA, 0xCC


@pytest.fixture
def fleet_dir(tmp_path: Path) -> t.Iterator[Path]:
    started: list[NoOsVM] = []
    folder = tmp_path
    (folder / "manifests").mkdir()
    yield folder
    for vm_dir in folder.iterdir():
        pidfile = vm_dir / "qemu.pid"
        if pidfile.exists():
            NoOsVM(folder, vm_dir.name).kill()
    del started


def fleet(folder: Path, count: int, **per_vm: dict[str, t.Any]) -> list[NoOsVM]:
    vms = [NoOsVM(folder, f"vm{i}").create_disks(OLD) for i in range(count)]
    for vm in vms:
        vm.start()
    return vms


def common_vars(folder: Path) -> list[str]:
    return [
        "-e", f"vmsnap_manifest_dir={folder / 'manifests'}",
        "-e", f"vmsnap_upgrade_tasks={HERE / 'workflow' / 'upgrade.yml'}",
        "-e", f"vmsnap_health_tasks={HERE / 'workflow' / 'health.yml'}",
        "-e", f"fleet_helper={HERE / 'fleet.py'}",
        "-e", f"vmsnap_report={folder / 'report.json'}",
    ]  # fmt: skip


def assert_nothing_left(vm: NoOsVM) -> None:
    """No snapshot, overlay or state file of the checkpoint, and the disk is the VM's own again."""
    for disk in vm.disks:
        assert "pre-upgrade" not in snapshot_names(disk)
        assert backing_file(disk) is None
    leftovers = [p.name for p in vm.folder.iterdir() if "vmsnap-" in p.name]
    assert leftovers == [], leftovers


def test_fleet_in_two_batches_rolls_back_exactly_the_failed_guest(fleet_dir: Path) -> None:
    vms = fleet(fleet_dir, 4)
    guests = {vm.name: guest_vars(vm) for vm in vms}
    guests["vm1"]["fleet_break_health"] = True
    # vm2 cannot be restarted by the roles: it gets an internal checkpoint (snapshot-save / snapshot-load)
    del guests["vm2"]["vmsnap_vm_start"]
    inventory = write_inventory(fleet_dir / "inventory.yml", guests)
    proc = run_playbook(
        "vmsnap.qemu.pre_upgrade", inventory, *common_vars(fleet_dir),
        "-e", "vmsnap_targets=guests", "-e", "vmsnap_serial=2", "-e", "vmsnap_max_fail_percentage=50",
    )  # fmt: skip
    counts = recap(proc.stdout)
    assert counts["vm1"]["failed"] == 1, proc.stdout
    assert all(counts[name]["failed"] == 0 for name in ("vm0", "vm2", "vm3")), proc.stdout
    report = json.loads((fleet_dir / "report.json").read_text())["guests"]
    assert report["vm1"]["outcome"] == "rolled back" and report["vm1"]["rolled_back"] is True, proc.stdout
    assert report["vm1"]["released"] is True
    for name in ("vm0", "vm2", "vm3"):
        assert report[name]["outcome"] == "upgraded" and report[name]["released"] is True, report[name]
        assert report[name]["rolled_back"] is False
    assert report["vm2"]["method"] == "internal" and report["vm0"]["method"] == "external"
    # The failed guest sees its checkpoint's data again, in a running VM; the others keep their upgrade.
    assert vms[1].status() == "running" and vms[1].reads(OLD) and not vms[1].reads(NEW)
    for vm in (vms[0], vms[2], vms[3]):
        assert vm.status() == "running" and vm.reads(NEW), vm.name
    for vm in vms:
        record = manifest(fleet_dir / "manifests", vm.name)
        assert record is not None and record["state"] == "released", record
        assert_nothing_left(vm)
    assert "vm1 on localhost: ROLLED BACK" in proc.stdout
