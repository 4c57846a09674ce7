# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The checkpoint, rollback and release roles (through their playbooks) on real VMs without a guest OS: four runs,
no-op rollbacks and releases, crashed QEMUs, the space refusal, offline checkpoints, ansible-playbook killed mid-way
(data checked with qemu-io through the running VM and offline). Fleets: test_workflow_fleet.py."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from fleet import (
    NEW,
    OLD,
    REPO,
    VENV_BIN,
    NoOsVM,
    assert_nothing_left,
    backing_file,
    changed_count,
    common_vars,
    guest_vars,
    manifest,
    offline_reads,
    run_playbook,
    snapshot_names,
    start_fleet,
    write_inventory,
)


def test_rollback_and_release_are_no_ops_without_a_checkpoint_and_when_repeated(fleet_dir: Path) -> None:
    (vm,) = start_fleet(fleet_dir, 1)
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
    external, internal = start_fleet(fleet_dir, 2)
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
    assert "\x00-S\x00" in Path(f"/proc/{internal.pid}/cmdline").read_text()  # started paused, then snapshot-load
    assert "-incoming" in Path(f"/proc/{external.pid}/cmdline").read_text()
    proc = run_playbook("vmsnap.qemu.release", inventory, *args)
    assert proc.returncode == 0, proc.stdout
    for vm in (external, internal):
        assert_nothing_left(vm)


def test_release_after_qemu_died_merges_the_overlays_offline(fleet_dir: Path) -> None:
    """The VM crashed after its checkpoint and its upgrade is to be kept: the release merges offline, idempotently."""
    (vm,) = start_fleet(fleet_dir, 1)
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
    (vm,) = start_fleet(fleet_dir, 1)
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
    (vm,) = start_fleet(fleet_dir, 1)
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
