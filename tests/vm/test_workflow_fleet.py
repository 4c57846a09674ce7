# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The pre_upgrade playbook over fleets of real VMs without a guest OS: batches, vmsnap_max_fail_percentage, two
inventory hypervisors (data checked with qemu-io through the running VM and offline)."""

from __future__ import annotations

import json
from pathlib import Path

from fleet import (
    NEW,
    OLD,
    VENV_BIN,
    assert_nothing_left,
    common_vars,
    guest_vars,
    manifest,
    recap,
    run_playbook,
    start_fleet,
    write_inventory,
)

VENV_PYTHON = VENV_BIN / "python"


def test_fleet_in_two_batches_rolls_back_exactly_the_failed_guest(fleet_dir: Path) -> None:
    vms = start_fleet(fleet_dir, 4)
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


def test_max_fail_percentage_zero_leaves_later_batches_untouched(fleet_dir: Path) -> None:
    vms = start_fleet(fleet_dir, 3)
    guests = {vm.name: guest_vars(vm) for vm in vms}
    guests["vm0"]["fleet_break_upgrade"] = True
    inventory = write_inventory(fleet_dir / "inventory.yml", guests)
    proc = run_playbook(
        "vmsnap.qemu.pre_upgrade",
        inventory,
        *common_vars(fleet_dir),
        "-e",
        "vmsnap_targets=guests",
        "-e",
        "vmsnap_serial=2",
    )
    assert proc.returncode != 0
    counts = recap(proc.stdout)
    assert counts["vm0"]["failed"] == 1 and counts["vm1"]["failed"] == 0, proc.stdout
    assert "vm2" not in counts, proc.stdout  # batch 2 never ran
    report = json.loads((fleet_dir / "report.json").read_text())["guests"]
    assert report["vm0"]["outcome"] == "rolled back" and report["vm1"]["outcome"] == "upgraded"
    assert report["vm2"]["outcome"] == "skipped"
    # Batch 2's guest was never checkpointed: no manifest, no snapshot, no overlay, its data untouched.
    assert manifest(fleet_dir / "manifests", "vm2") is None
    assert_nothing_left(vms[2])
    assert vms[2].reads(OLD)
    assert vms[0].reads(OLD) and vms[1].reads(NEW)


def test_each_guest_is_handled_on_its_own_hypervisor(fleet_dir: Path) -> None:
    """Two inventory hypervisors (both this machine, local connections), each with its own manifest folder and a
    Python interpreter that logs every module it runs: every guest's modules run on its own hypervisor."""
    vms = start_fleet(fleet_dir, 4)
    hypervisors = {}
    for hv in ("hv1", "hv2"):
        log = fleet_dir / f"{hv}.log"
        wrapper = fleet_dir / f"{hv}-python"
        wrapper.write_text(f'#!/bin/sh\necho "$@" >> {log}\nexec {VENV_PYTHON} "$@"\n')
        wrapper.chmod(0o755)
        hypervisors[hv] = {"ansible_python_interpreter": str(wrapper), "manifests": fleet_dir / f"{hv}-manifests"}
    guests = {}
    for vm in vms:
        hv = "hv1" if vm.name in ("vm0", "vm1") else "hv2"
        guests[vm.name] = guest_vars(vm, hypervisor=hv, vmsnap_manifest_dir=str(hypervisors[hv]["manifests"]))
    guests["vm3"]["fleet_break_health"] = True
    inventory = write_inventory(
        fleet_dir / "inventory.yml",
        guests,
        hypervisors={
            hv: {"ansible_python_interpreter": values["ansible_python_interpreter"]}
            for hv, values in hypervisors.items()
        },
    )
    args = common_vars(fleet_dir, manifests=False)  # each guest's manifest folder is its hypervisor's
    proc = run_playbook(
        "vmsnap.qemu.pre_upgrade", inventory, *args, "-e", "vmsnap_targets=guests", "-e", "vmsnap_serial=4",
        "-e", "vmsnap_max_fail_percentage=50",
        env={"ANSIBLE_PIPELINING": "0"},  # so that the interpreters' logs name each module's AnsiballZ file
    )  # fmt: skip
    counts = recap(proc.stdout)
    assert counts["vm3"]["failed"] == 1 and all(counts[f"vm{i}"]["failed"] == 0 for i in range(3)), proc.stdout
    for vm in vms:
        hv = guests[vm.name]["vmsnap_hypervisor"]
        other = "hv2" if hv == "hv1" else "hv1"
        record = manifest(hypervisors[hv]["manifests"], vm.name)
        assert record is not None and record["state"] == "released" and record["hypervisor"] == hv
        assert manifest(hypervisors[other]["manifests"], vm.name) is None
    logs = {hv: (fleet_dir / f"{hv}.log").read_text() for hv in hypervisors}
    for module in ("checkpoint_preflight", "qmp_live_snapshot", "checkpoint_manifest"):
        assert f"AnsiballZ_{module}" in logs["hv1"] and f"AnsiballZ_{module}" in logs["hv2"], module
    # Only hv2 has a guest to roll back (into a new QEMU: its RAM state is loaded there).
    assert "AnsiballZ_qmp_vm_state" in logs["hv2"] and "AnsiballZ_qmp_vm_state" not in logs["hv1"]
    assert vms[3].reads(OLD) and all(vm.reads(NEW) for vm in vms[:3])
