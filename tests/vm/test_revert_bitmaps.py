# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Reverting internal snapshots of disks that carry dirty bitmaps (issue 10): real qemu-img and real QEMU (TCG, no
guest OS), data checked with qemu-io patterns.

qcow2_snapshot and qmp_live_snapshot run in this process (their real main(), AnsibleModule and all); the rollback
role runs once through ansible-playbook, for a VM whose QEMU was killed (started again with -S, then loaded) and a
VM whose QEMU runs, both with a backup bitmap on their disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
import typing as t
from pathlib import Path

import pytest
from conftest import REPO
from fleet import (
    NEW,
    OLD,
    NoOsVM,
    common_vars,
    guest_vars,
    manifest,
    offline_reads,
    qmp_execute,
    run_playbook,
    snapshot_names,
    write_inventory,
)

sys.path.insert(0, os.environ.get("ANSIBLE_COLLECTIONS_PATH", str(REPO / "build" / "src")).split(os.pathsep)[0])
from ansible.module_utils.common import warnings as ansible_warnings  # noqa: E402
from ansible.module_utils.testing import patch_module_args  # noqa: E402

from ansible_collections.vmsnap.qemu.plugins.modules import qcow2_snapshot, qmp_live_snapshot  # noqa: E402

OURS = "vmsnap-backup-disk0-0123abcd"
FOREIGN = "incremental-0"
QEMU_WORDS = "Device has active dirty bitmaps"


def run(module: t.Any, check: bool = False, **args: t.Any) -> dict[str, t.Any]:
    """One task of module in this process: its result (failed ones too) with the warnings as strings."""
    for name in ("_global_warnings", "_global_deprecations"):
        getattr(ansible_warnings, name).clear()
    out = io.StringIO()
    with (
        patch_module_args(dict(args, _ansible_check_mode=check)),
        contextlib.redirect_stdout(out),
        contextlib.suppress(SystemExit),
    ):
        module.main()
    result = t.cast("dict[str, t.Any]", json.loads(out.getvalue()))
    result["failed"] = bool(result.get("failed"))
    result["warnings"] = [
        w["event"]["msg"] if isinstance(w, dict) and "event" in w else str(w) for w in result.get("warnings") or []
    ]
    return result


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def image_bitmaps(image: Path) -> list[str]:
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(image)], capture_output=True, check=True)
    return [b["name"] for b in json.loads(out.stdout).get("format-specific", {}).get("data", {}).get("bitmaps", [])]


def qemu(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


def qmp(vm: NoOsVM, command: str, **arguments: t.Any) -> t.Any:
    return qmp_execute(vm.qmp, command, arguments)


def vm_bitmaps(vm: NoOsVM) -> list[str]:
    (disk,) = [entry for entry in qmp(vm, "query-block") if entry.get("device") == "drive0"]
    return [bitmap.get("name") for bitmap in disk["inserted"].get("dirty-bitmaps") or []]


def add_bitmap(vm: NoOsVM, name: str) -> None:
    qmp(vm, "block-dirty-bitmap-add", node="drive0", name=name, persistent=True)


# --- offline: qcow2_snapshot state=reverted -------------------------------------------------------------------


def offline_image(folder: Path, name: str, *bitmaps: str) -> Path:
    """OLD at snapshot cp, NEW written after it, then the bitmaps (as qcow2_backup and another tool add them)."""
    image = folder / f"{name}.qcow2"
    qemu("qemu-img", "create", "-q", "-f", "qcow2", str(image), "16M")
    qemu("qemu-io", "-c", f"write -P {OLD:#x} 0 1M", str(image))
    qemu("qemu-img", "snapshot", "-c", "cp", str(image))
    qemu("qemu-io", "-c", f"write -P {NEW:#x} 0 1M", str(image))
    for bitmap in bitmaps:
        qemu("qemu-img", "bitmap", "--add", str(image), bitmap)
    return image


def test_offline_revert_names_the_backup_set_and_drop_reverts(tmp_path: Path) -> None:
    image = offline_image(tmp_path, "disk0", OURS)
    before = sha256(image)

    refused = run(qcow2_snapshot, path=str(image), name="cp", state="reverted")
    assert refused["failed"] and not refused["changed"]
    assert f"bitmap '{OURS}' belongs to the backup set 'disk0' of vmsnap.qemu.qcow2_backup" in refused["msg"]
    assert "Set backup_bitmaps=drop" in refused["msg"] and QEMU_WORDS not in refused["msg"]
    assert refused["backup_sets"] == ["disk0"] and sha256(image) == before

    checked = run(qcow2_snapshot, check=True, path=str(image), name="cp", state="reverted", backup_bitmaps="drop")
    assert not checked["failed"] and checked["changed"]
    assert checked["dropped_bitmaps"] == [{"name": OURS, "set": "disk0"}]
    assert any(w.startswith(f"Would remove the backup bitmap '{OURS}'") for w in checked["warnings"])
    assert sha256(image) == before

    done = run(qcow2_snapshot, path=str(image), name="cp", state="reverted", backup_bitmaps="drop")
    assert not done["failed"] and done["changed"] and done["dropped_bitmaps"] == [{"name": OURS, "set": "disk0"}]
    assert any("backup set 'disk0' takes a full backup" in w and w.startswith("Removed") for w in done["warnings"])
    assert image_bitmaps(image) == [] and offline_reads(image, OLD)

    bad = run(qcow2_snapshot, path=str(image), name="cp", state="present", backup_bitmaps="drop")
    assert bad["failed"] and bad["msg"] == "backup_bitmaps=drop applies to state=reverted, not state=present."


def test_offline_drop_never_touches_another_tools_bitmap(tmp_path: Path) -> None:
    image = offline_image(tmp_path, "disk0", OURS, FOREIGN)
    before = sha256(image)
    refused = run(qcow2_snapshot, path=str(image), name="cp", state="reverted", backup_bitmaps="drop")
    assert refused["failed"] and not refused["changed"]
    assert f"bitmap '{FOREIGN}' belongs to another tool (not vmsnap.qemu)" in refused["msg"]
    assert "backup_bitmaps=drop removes only the bitmaps of vmsnap.qemu.qcow2_backup's" in refused["msg"]
    assert refused["foreign_bitmaps"] == [FOREIGN] and QEMU_WORDS not in refused["msg"]
    assert sha256(image) == before and image_bitmaps(image) == [OURS, FOREIGN]


# --- live: qmp_live_snapshot state=reverted -------------------------------------------------------------------


@pytest.fixture
def live_vm(tmp_path: Path) -> t.Iterator[NoOsVM]:
    """A running VM (drive0 with OLD) with internal checkpoint cp (RAM included), NEW written after it."""
    vm = NoOsVM(tmp_path, "vm").create_disks(OLD).start()
    try:
        taken = run(qmp_live_snapshot, socket=str(vm.qmp), name="cp")
        assert not taken["failed"], taken
        vm.write(NEW)
        yield vm
    finally:
        vm.kill()


def test_live_revert_names_the_set_drops_in_one_pause_and_refuses_foreign_bitmaps(live_vm: NoOsVM) -> None:
    vm = live_vm
    add_bitmap(vm, OURS)
    refused = run(qmp_live_snapshot, socket=str(vm.qmp), name="cp", state="reverted")
    assert refused["failed"] and not refused["changed"]
    assert f"On disk drive0, bitmap '{OURS}' belongs to the backup set 'disk0'" in refused["msg"]
    assert QEMU_WORDS not in refused["msg"]
    assert vm.status() == "running" and vm_bitmaps(vm) == [OURS] and vm.reads(NEW)

    args = dict(socket=str(vm.qmp), name="cp", state="reverted", backup_bitmaps="drop")
    checked = run(qmp_live_snapshot, check=True, **args)
    assert not checked["failed"] and checked["changed"]
    assert checked["dropped_bitmaps"] == [{"device": "drive0", "name": OURS, "set": "disk0"}]
    assert vm_bitmaps(vm) == [OURS] and vm.reads(NEW)

    done = run(qmp_live_snapshot, **args)
    assert not done["failed"] and done["changed"], done
    assert done["devices"][0]["dropped_bitmaps"] == [{"name": OURS, "set": "disk0"}]
    assert any("backup set 'disk0' takes a full backup" in w for w in done["warnings"])
    assert done["downtime_ms"] > 0 and done["vm_status"] == "running"
    assert vm.status() == "running" and vm_bitmaps(vm) == [] and vm.reads(OLD)

    vm.write(NEW)
    add_bitmap(vm, OURS)
    add_bitmap(vm, FOREIGN)
    foreign = run(qmp_live_snapshot, **args)
    assert foreign["failed"] and not foreign["changed"]
    assert f"bitmap '{FOREIGN}' belongs to another tool (not vmsnap.qemu)" in foreign["msg"]
    assert vm.status() == "running" and sorted(vm_bitmaps(vm)) == sorted([OURS, FOREIGN]) and vm.reads(NEW)


# --- the rollback role ----------------------------------------------------------------------------------------


def checkpoint_then_crash(vm: NoOsVM, fleet_dir: Path) -> tuple[Path, list[str]]:
    """An internal checkpoint through the checkpoint playbook, NEW written and flushed, then QEMU SIGKILLed (a
    crash: the socket file stays behind). Returns the inventory and the playbook arguments for the rollback."""
    inventory = write_inventory(fleet_dir / "inventory.yml", {vm.name: guest_vars(vm, vmsnap_method="internal")})
    args = [*common_vars(fleet_dir), "-e", "vmsnap_targets=guests"]
    proc = run_playbook("vmsnap.qemu.checkpoint", inventory, *args)
    assert proc.returncode == 0, proc.stdout
    vm.write(NEW)
    vm.qemu_io("drive0", "flush")
    vm.kill()
    return inventory, args


def test_rollback_role_drops_the_backup_bitmap_of_a_vm_whose_qemu_was_killed(fleet_dir: Path) -> None:
    """The new path: QEMU started with -S, then snapshot-load over QMP with the bitmap dropped, then cont. (A running
    QEMU takes the same qmp_live_snapshot task, tested above; the workflow tests run it without bitmaps.)"""
    vm = NoOsVM(fleet_dir, "vm0").create_disks(OLD)
    qemu("qemu-img", "bitmap", "--add", str(vm.disks[0]), "vmsnap-backup-vm0-0123abcd")  # as a backup leaves it
    vm.start()
    # The crash leaves the bitmap on the disk, marked in use (QEMU loads it as inconsistent).
    inventory, args = checkpoint_then_crash(vm, fleet_dir)
    assert image_bitmaps(vm.disks[0]) == ["vmsnap-backup-vm0-0123abcd"]

    proc = run_playbook("vmsnap.qemu.rollback", inventory, *args)
    assert proc.returncode == 0, proc.stdout
    assert "backup set 'vm0' takes a full backup" in proc.stderr, proc.stderr  # the task's warning
    assert vm.status() == "running" and vm.reads(OLD) and vm_bitmaps(vm) == []
    assert manifest(fleet_dir / "manifests", vm.name)["state"] == "rolled_back"
    cmdline = Path(f"/proc/{vm.pid}/cmdline").read_bytes().split(b"\0")
    assert b"-S" in cmdline and b"-loadvm" not in cmdline
    vm.kill()
    assert offline_reads(vm.disks[0], OLD)


def test_rollback_role_ends_the_qemu_it_started_when_the_load_fails(fleet_dir: Path) -> None:
    """Another tool's bitmap stops the load into the QEMU the role started with -S: the role ends that QEMU again
    (else it would sit in prelaunch, holding the disk lock that qemu-img needs) and fails with the module's message.
    The image is not byte-identical afterwards: any QEMU that opens it read-write and closes it rewrites the bitmap
    directory (-loadvm did too); what it holds is compared instead."""
    vm = NoOsVM(fleet_dir, "vm0").create_disks(OLD).start()
    inventory, args = checkpoint_then_crash(vm, fleet_dir)
    qemu("qemu-img", "bitmap", "--add", str(vm.disks[0]), "other-tool")
    before = fleet_dir / "before.qcow2"
    before.write_bytes(vm.disks[0].read_bytes())

    proc = run_playbook("vmsnap.qemu.rollback", inventory, *args)
    assert proc.returncode != 0, proc.stdout
    assert "bitmap 'other-tool' belongs to another tool (not vmsnap.qemu)" in proc.stdout, proc.stdout
    assert "The QEMU that the rollback had started for it (with -S, the guest never ran) was stopped" in proc.stdout
    assert "the disks are not locked and hold what they held before the rollback." in proc.stdout
    assert not vm.running()
    with pytest.raises(OSError):  # nothing listens on the socket any more (refused, or the file is gone)
        qmp_execute(vm.qmp, "query-status")
    qemu("qemu-img", "check", "-q", str(vm.disks[0]))  # not locked (check opens it read-write), and consistent
    qemu("qemu-img", "compare", "-q", str(before), str(vm.disks[0]))  # the guest's data: still NEW, not reverted
    assert offline_reads(vm.disks[0], NEW) and image_bitmaps(vm.disks[0]) == ["other-tool"]
    assert snapshot_names(vm.disks[0]) == snapshot_names(before)
    assert manifest(fleet_dir / "manifests", vm.name)["state"] == "open"
