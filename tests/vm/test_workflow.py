# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The workflow on real VMs: the checkpoint, rollback and release roles and the pre_upgrade playbook, run with
ansible-playbook over fleets of VMs without a guest OS (data checked with qemu-io through the running VM and
offline)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import typing as t
from pathlib import Path

import pytest
from fleet import (
    REPO,
    VENV_BIN,
    NoOsVM,
    backing_file,
    guest_vars,
    manifest,
    offline_reads,
    recap,
    run_playbook,
    snapshot_names,
    write_inventory,
)

HERE = Path(__file__).resolve().parent
OLD, NEW = 0xAA, 0xCC
VENV_PYTHON = VENV_BIN / "python"


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


def common_vars(folder: Path, manifests: bool = True) -> list[str]:
    return [
        *(["-e", f"vmsnap_manifest_dir={folder / 'manifests'}"] if manifests else []),
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


def test_max_fail_percentage_zero_leaves_later_batches_untouched(fleet_dir: Path) -> None:
    vms = fleet(fleet_dir, 3)
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
    vms = fleet(fleet_dir, 4)
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


def changed_count(proc: subprocess.CompletedProcess[str], host: str) -> int:
    return recap(proc.stdout)[host]["changed"]


def test_rollback_and_release_are_no_ops_without_a_checkpoint_and_when_repeated(fleet_dir: Path) -> None:
    (vm,) = fleet(fleet_dir, 1)
    inventory = write_inventory(fleet_dir / "inventory.yml", {vm.name: guest_vars(vm, start=False)})
    args = [*common_vars(fleet_dir), "-e", "vmsnap_targets=guests"]
    for playbook, words in (("rollback", "nothing to roll back"), ("release", "nothing to release")):
        proc = run_playbook(f"vmsnap.qemu.{playbook}", inventory, *args)
        assert proc.returncode == 0 and changed_count(proc, "vm0") == 0, proc.stdout
        assert f"VM vm0 has no checkpoint pre-upgrade: {words}." in proc.stdout
    assert manifest(fleet_dir / "manifests", "vm0") is None and vm.reads(OLD)

    # The four runs: check mode (reports the change, writes nothing), real, repeat (unchanged), repeat in check mode.
    proc = run_playbook("vmsnap.qemu.checkpoint", inventory, *args, "--check")
    assert proc.returncode == 0 and changed_count(proc, "vm0") > 0, proc.stdout
    assert manifest(fleet_dir / "manifests", "vm0") is None and "pre-upgrade" not in snapshot_names(vm.disks[0])
    proc = run_playbook("vmsnap.qemu.checkpoint", inventory, *args)
    assert proc.returncode == 0 and changed_count(proc, "vm0") > 0, proc.stdout
    assert manifest(fleet_dir / "manifests", "vm0")["method"] == "internal"
    for check in ([], ["--check"]):  # an open checkpoint is left alone
        proc = run_playbook("vmsnap.qemu.checkpoint", inventory, *args, *check)
        assert proc.returncode == 0 and changed_count(proc, "vm0") == 0, proc.stdout
    vm.write(NEW)
    proc = run_playbook("vmsnap.qemu.rollback", inventory, *args, "--check")
    assert proc.returncode == 0 and changed_count(proc, "vm0") > 0, proc.stdout
    assert vm.reads(NEW) and manifest(fleet_dir / "manifests", "vm0")["state"] == "open"
    proc = run_playbook("vmsnap.qemu.rollback", inventory, *args)
    assert proc.returncode == 0 and changed_count(proc, "vm0") > 0, proc.stdout
    assert vm.status() == "running" and vm.reads(OLD)
    vm.write(NEW)  # written after the rollback: a second rollback must not undo it
    proc = run_playbook("vmsnap.qemu.rollback", inventory, *args)
    assert proc.returncode == 0 and changed_count(proc, "vm0") == 0, proc.stdout
    assert "was already rolled back to checkpoint pre-upgrade" in proc.stdout and vm.reads(NEW)
    proc = run_playbook("vmsnap.qemu.release", inventory, *args, "--check")
    assert proc.returncode == 0 and changed_count(proc, "vm0") > 0, proc.stdout
    assert "pre-upgrade" in snapshot_names(vm.disks[0])
    for expected_changes in (True, False):
        proc = run_playbook("vmsnap.qemu.release", inventory, *args)
        assert proc.returncode == 0 and (changed_count(proc, "vm0") > 0) is expected_changes, proc.stdout
    assert manifest(fleet_dir / "manifests", "vm0")["state"] == "released"
    assert_nothing_left(vm)
    assert vm.reads(NEW)


def test_rollback_after_qemu_was_killed_starts_the_vm_from_the_checkpoint(fleet_dir: Path) -> None:
    external, internal = fleet(fleet_dir, 2)
    guests = {external.name: guest_vars(external), internal.name: guest_vars(internal, vmsnap_method="internal")}
    inventory = write_inventory(fleet_dir / "inventory.yml", guests)
    args = [*common_vars(fleet_dir), "-e", "vmsnap_targets=guests"]
    proc = run_playbook("vmsnap.qemu.checkpoint", inventory, *args)
    assert proc.returncode == 0, proc.stdout
    assert manifest(fleet_dir / "manifests", "vm0")["method"] == "external"
    assert manifest(fleet_dir / "manifests", "vm1")["method"] == "internal"
    for vm in (external, internal):
        vm.write(NEW)
        vm.kill()  # a crash: SIGKILL, the socket file stays behind
        assert not vm.running()
    proc = run_playbook("vmsnap.qemu.rollback", inventory, *args)
    assert proc.returncode == 0, proc.stdout
    for vm in (external, internal):
        assert vm.running() and vm.status() == "running", vm.name
        assert vm.reads(OLD), vm.name
    assert "-loadvm" in Path(f"/proc/{internal.pid}/cmdline").read_text()
    assert "-incoming" in Path(f"/proc/{external.pid}/cmdline").read_text()
    proc = run_playbook("vmsnap.qemu.release", inventory, *args)
    assert proc.returncode == 0, proc.stdout
    for vm in (external, internal):
        assert_nothing_left(vm)


def test_release_after_qemu_died_merges_the_overlays_offline(fleet_dir: Path) -> None:
    """The VM crashed after its checkpoint and its upgrade is to be kept: the release merges offline, idempotently."""
    (vm,) = fleet(fleet_dir, 1)
    inventory = write_inventory(fleet_dir / "inventory.yml", {vm.name: guest_vars(vm)})
    args = [*common_vars(fleet_dir), "-e", "vmsnap_targets=guests"]
    proc = run_playbook("vmsnap.qemu.checkpoint", inventory, *args)
    assert proc.returncode == 0, proc.stdout
    vm.write(NEW)
    vm.qemu_io("drive0", "flush")
    vm.kill()
    first = run_playbook("vmsnap.qemu.release", inventory, *args)
    assert first.returncode == 0 and changed_count(first, "vm0") > 0, first.stdout
    assert "changed: [vm0 -> localhost] => (item=" in first.stdout.split("merge each overlay offline")[1], first.stdout
    again = run_playbook("vmsnap.qemu.release", inventory, *args)
    assert again.returncode == 0 and changed_count(again, "vm0") == 0, again.stdout
    assert manifest(fleet_dir / "manifests", vm.name)["state"] == "released"
    assert_nothing_left(vm)
    assert offline_reads(vm.disks[0], NEW)  # the upgrade's data, merged into the VM's own disk


def test_checkpoint_refused_for_space_leaves_nothing_behind(fleet_dir: Path) -> None:
    (vm,) = fleet(fleet_dir, 1)
    small = fleet_dir / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(small)], check=True)
    try:
        inventory = write_inventory(
            fleet_dir / "inventory.yml", {vm.name: guest_vars(vm, vmsnap_overlay_dir=str(small))}
        )
        before = {p.name for p in vm.folder.iterdir()}
        proc = run_playbook("vmsnap.qemu.checkpoint", inventory, *common_vars(fleet_dir), "-e", "vmsnap_targets=guests")
        assert proc.returncode != 0
        assert "VM vm0: not enough free space on the file system of" in proc.stdout, proc.stdout
        assert list(small.iterdir()) == []
        assert {p.name for p in vm.folder.iterdir()} == before
        assert not (fleet_dir / "manifests" / "vm0").exists()
        assert_nothing_left(vm)
        assert vm.status() == "running" and vm.reads(OLD)
    finally:
        subprocess.run(["umount", str(small)], check=False)


def test_offline_checkpoint_of_a_stopped_vm_and_of_a_running_one_that_can_be_restarted(fleet_dir: Path) -> None:
    stopped, restartable = (NoOsVM(fleet_dir, f"vm{i}").create_disks(OLD) for i in range(2))
    restartable.start()
    guests = {
        stopped.name: {**guest_vars(stopped, start=False), "vmsnap_disks": [str(d) for d in stopped.disks]},
        restartable.name: {**guest_vars(restartable), "vmsnap_disks": [str(d) for d in restartable.disks]},
    }
    del guests[stopped.name]["vmsnap_qmp_socket"]
    inventory = write_inventory(fleet_dir / "inventory.yml", guests)
    args = [*common_vars(fleet_dir), "-e", "vmsnap_targets=guests"]
    # A running VM cannot be checkpointed offline: the pre-flight refuses it; stopped, it can.
    proc = run_playbook("vmsnap.qemu.checkpoint", inventory, *args, "-e", "vmsnap_method=offline", "--limit", "vm1")
    assert proc.returncode != 0 and "VM vm1: " in proc.stdout and "running" in proc.stdout, proc.stdout
    restartable.kill()
    proc = run_playbook("vmsnap.qemu.checkpoint", inventory, *args)
    assert proc.returncode == 0, proc.stdout
    for vm in (stopped, restartable):
        assert manifest(fleet_dir / "manifests", vm.name)["method"] == "offline"
        assert "pre-upgrade" in snapshot_names(vm.disks[0])
    restartable.start()
    restartable.write(NEW)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0xcc 0 1M", str(stopped.disks[0])], check=True,
                   stdout=subprocess.DEVNULL)  # fmt: skip
    proc = run_playbook("vmsnap.qemu.rollback", inventory, *args)
    assert proc.returncode == 0, proc.stdout
    assert offline_reads(stopped.disks[0], OLD)
    assert restartable.status() == "running" and restartable.reads(OLD)  # stopped, reverted, started again
    proc = run_playbook("vmsnap.qemu.release", inventory, *args)
    assert proc.returncode == 0, proc.stdout
    assert_nothing_left(stopped)
    assert_nothing_left(restartable)


def _module_processes(marker: str) -> dict[int, str]:
    """pid -> command line of the processes whose command line names marker (the run's own temp folder)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if state == "Z":  # gone, but nobody reaps it (no init reaps orphans in this sandbox)
                continue
            if marker in cmdline and "AnsiballZ_" in cmdline:
                found[int(entry.name)] = cmdline
    return found


def _kill_playbook_when(proc: subprocess.Popen[str], marker: str, module: str, occurrence: int) -> None:
    """SIGKILL ansible-playbook and its workers (its process group, as a Ctrl-C of the terminal or a killed CI job
    would) once the occurrence-th run of module has started."""
    seen: set[str] = set()
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        for cmdline in _module_processes(marker).values():
            if f"AnsiballZ_{module}.py" in cmdline:
                seen.add(cmdline.split("AnsiballZ_")[0])
        if len(seen) >= occurrence:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return
        time.sleep(0.01)
    raise AssertionError(f"{module} (run {occurrence}) never started; ansible-playbook exited {proc.poll()}")


@pytest.mark.parametrize(
    ("module", "occurrence"),
    [("checkpoint_preflight", 1), ("qmp_live_snapshot", 1), ("checkpoint_manifest", 3)],
    ids=["during-preflight", "during-snapshot", "while-recording-open"],
)
def test_checkpoint_killed_at_any_moment_converges(fleet_dir: Path, module: str, occurrence: int) -> None:
    (vm,) = fleet(fleet_dir, 1)
    inventory = write_inventory(fleet_dir / "inventory.yml", {vm.name: guest_vars(vm)})
    args = [*common_vars(fleet_dir), "-e", "vmsnap_targets=guests"]
    marker = str(fleet_dir / "ansible-tmp")
    # Without pipelining, so that each module's process names its AnsiballZ file (in the run's own temp folder).
    env = dict(
        os.environ,
        ANSIBLE_REMOTE_TMP=marker,
        ANSIBLE_PIPELINING="0",
        ANSIBLE_LOCALHOST_WARNING="0",
        ANSIBLE_INVENTORY_UNPARSED_WARNING="0",
    )
    env.setdefault("ANSIBLE_COLLECTIONS_PATH", str(REPO / "build" / "src"))
    playbook = subprocess.Popen(
        [str(VENV_BIN / "ansible-playbook"), "-i", str(inventory), "vmsnap.qemu.checkpoint", *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True, text=True,
    )  # fmt: skip
    _kill_playbook_when(playbook, marker, module, occurrence)
    # The module that was running goes on in its own session and ends by itself; nothing else is left running.
    deadline = time.monotonic() + 120
    while _module_processes(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _module_processes(marker)
    assert vm.status() == "running" and vm.reads(OLD)

    proc = run_playbook("vmsnap.qemu.checkpoint", inventory, *args)  # the next run finishes the checkpoint
    assert proc.returncode == 0, proc.stdout
    record = manifest(fleet_dir / "manifests", vm.name)
    assert record is not None and record["state"] == "open", record
    overlay = Path(record["disks"][0]["overlay"])
    assert vm.active_file() == overlay and backing_file(overlay) == str(vm.disks[0])
    vm.write(NEW)
    proc = run_playbook("vmsnap.qemu.rollback", inventory, *args)
    assert proc.returncode == 0, proc.stdout
    assert vm.status() == "running" and vm.reads(OLD)
    proc = run_playbook("vmsnap.qemu.release", inventory, *args)
    assert proc.returncode == 0, proc.stdout
    assert_nothing_left(vm)  # no orphaned overlay, state file or snapshot
    assert vm.reads(OLD)
