# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""checkpoint_manifest's main() in this process (real AnsibleModule, real files, real qemu-img): every bad input
fails with its message and changes nothing; query, keep_for, verify, warnings and check mode. The four runs per
state through ansible are in tests/vm/test_checkpoint_manifest.py."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import subprocess
import typing as t
from pathlib import Path
from unittest import mock

import pytest
from ansible.module_utils import _internal
from ansible.module_utils.common import warnings as ansible_warnings
from ansible.module_utils.testing import patch_module_args

from ansible_collections.vmsnap.qemu.plugins.modules import checkpoint_manifest

VM = "web01"
NAME = "pre-upgrade"


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> t.Callable[..., dict[str, t.Any]]:
    """run(check=False, diff=False, **args): the module's result; dir defaults to tmp_path/manifests."""

    def call(check: bool = False, diff: bool = False, **args: t.Any) -> dict[str, t.Any]:
        params = dict(dir=str(tmp_path / "manifests"), vm=VM, name=NAME)
        params.update(args)
        params.update(_ansible_check_mode=check, _ansible_diff=diff)
        # Warnings are process-wide in module_utils: each run here is its own task.
        for name in ("_global_warnings", "_global_deprecations"):
            getattr(ansible_warnings, name).clear()
        # A controller-side import in the same pytest process (a filter plugin's test) flips module_utils into
        # controller mode, where warn() prints instead of adding to the result: a module runs on the target.
        with patch_module_args(params), mock.patch.object(_internal, "is_controller", False), pytest.raises(SystemExit):
            checkpoint_manifest.main()
        return t.cast("dict[str, t.Any]", json.loads(capsys.readouterr().out))

    return call


def tree(folder: Path) -> dict[str, tuple[int, str]]:
    seen: dict[str, tuple[int, str]] = {}
    for root, dirs, files in os.walk(folder):
        for entry in dirs + files:
            path = os.path.join(root, entry)
            st = os.lstat(path)
            digest = hashlib.sha256(Path(path).read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else ""
            seen[os.path.relpath(path, folder)] = (stat.S_IMODE(st.st_mode), digest)
    return seen


def warnings(result: dict[str, t.Any]) -> list[str]:
    """Warning texts; ansible-core 2.19 returns them as WarningSummary objects, older releases as strings."""
    return [item["event"]["msg"] if isinstance(item, dict) else item for item in result.get("warnings", [])]


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (dict(vm="../etc"), "Invalid VM name '../etc': use 1 to 64 characters out of letters, digits and . _ + - "
         "that do not start with '.' or '-'."),
        (dict(name="-rf"), "Invalid checkpoint name '-rf': use 1 to 64 characters"),
        (dict(name="x" * 65), f"Invalid checkpoint name '{'x' * 65}'"),
        (dict(dir="relative/dir"), "Manifest folder path 'relative/dir' is relative; give an absolute path."),
        (dict(state="pending", record={"method": "offline", "disk": []}),
         "record has unknown keys: disk. Allowed are: method, hypervisor, qmp_socket, qga_socket, vm_start, "
         "qemu_version, snapshot, state_file, disks, result."),
        (dict(state="pending", record={"method": "savevm"}),
         "record.method must be one of internal, external, offline, not 'savevm'."),
        (dict(state="pending", record={"disks": [{"file": "/nonexistent/web01.qcow2"}]}),
         "Disk /nonexistent/web01.qcow2 of the record cannot be examined: No such file or directory."),
        (dict(state="pending", verify=True), "verify=true only goes with state=query, not state=pending."),
        (dict(state="released", keep_for="1d"), "keep_for only goes with state=query, not state=released."),
        (dict(state="released", record={}), "record only goes with state=pending or state=open, not state=released."),
        (dict(keep_for="soon"), "Invalid duration 'soon'"),
        (dict(keep_for=0), "Duration 0 must be greater than zero."),
        (dict(state="open"), "VM web01 has no pending checkpoint pre-upgrade: a checkpoint is marked open only"),
        (dict(state="rolled_back"), "VM web01 has no checkpoint pre-upgrade: there is nothing to roll back to."),
    ],
)  # fmt: skip
def test_bad_input_fails_and_changes_nothing(run: t.Callable[..., dict[str, t.Any]], tmp_path: Path,
                                             args: dict[str, t.Any], message: str) -> None:  # fmt: skip
    for check in (True, False):
        result = run(check=check, **args)
        assert result["failed"] and not result["changed"], result
        assert result["msg"].startswith(message), result["msg"]
        assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    ("steps", "target", "message"),
    [
        (["pending"], "rolled_back", "Checkpoint pre-upgrade of VM web01 was interrupted while it was being taken "
         "(state pending): run the checkpoint role again to finish it, or the release role to remove it."),
        (["pending", "released"], "rolled_back", "Checkpoint pre-upgrade of VM web01 was released: there is nothing"),
        (["pending", "open", "rolled_back"], "open", "Checkpoint pre-upgrade of VM web01 was rolled back already"),
        (["pending", "released"], "open", "Checkpoint pre-upgrade of VM web01 was released and cannot be opened"),
    ],
)  # fmt: skip
def test_refused_transitions_change_nothing(run: t.Callable[..., dict[str, t.Any]], tmp_path: Path,
                                            steps: list[str], target: str, message: str) -> None:  # fmt: skip
    for step in steps:
        assert run(state=step)["changed"]
    before = tree(tmp_path)
    result = run(state=target)
    assert result["failed"] and not result["changed"] and result["msg"].startswith(message)
    assert result["previous_state"] == steps[-1] and result["manifest"]["state"] == steps[-1]
    assert tree(tmp_path) == before


def test_query(run: t.Callable[..., dict[str, t.Any]], tmp_path: Path) -> None:
    result = run(keep_for="7d", verify=True)
    assert (result["changed"], result["exists"], result["manifest"], result["young"]) == (False, False, None, False)
    assert (result["verified"], result["mismatches"], result["age_seconds"]) == (False, [], None)
    assert result["msg"] == "VM web01 has no checkpoint pre-upgrade."
    assert not (tmp_path / "manifests").exists()
    run(state="pending", record={"method": "offline"})
    before = tree(tmp_path)
    result = run(keep_for=3600, verify=True)
    assert (result["exists"], result["young"], result["previous_state"]) == (True, True, "pending")
    assert result["verified"] is False  # a pending checkpoint is not verified
    assert result["msg"].startswith("Checkpoint pre-upgrade of VM web01 is pending (created ")
    assert tree(tmp_path) == before
    assert "young" not in run() and "verified" not in run()


def test_verify_against_real_images(run: t.Callable[..., dict[str, t.Any]], tmp_path: Path) -> None:
    disk = str(tmp_path / "web01.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", disk, "16M")
    qemu_img("snapshot", "-c", NAME, disk)
    record = {"method": "offline", "snapshot": NAME, "disks": [{"file": disk, "format": "qcow2"}]}
    run(state="pending", record=record)
    run(state="open")
    result = run(verify=True)
    assert (result["verified"], result["mismatches"]) == (True, [])
    assert result["msg"].endswith(" Its files still match it.")
    old_inode = os.stat(disk).st_ino
    os.rename(disk, disk + ".old")
    qemu_img("create", "-q", "-f", "qcow2", disk, "16M")  # a new file at the same path, without the snapshot
    new_inode = os.stat(disk).st_ino
    before = tree(tmp_path)
    result = run(verify=True)
    assert result["failed"] and result["mismatches"] == [f"{disk} was replaced (inode {old_inode} -> {new_inode})"]
    assert result["msg"] == (
        f"Checkpoint pre-upgrade of VM web01 no longer matches its files: {disk} was replaced "
        f"(inode {old_inode} -> {new_inode})."
    )
    assert tree(tmp_path) == before


def test_pending_update_and_open_with_disks(run: t.Callable[..., dict[str, t.Any]], tmp_path: Path) -> None:
    disk = tmp_path / "web01.qcow2"
    disk.write_bytes(b"")
    result = run(state="pending", record={"method": "external", "disks": [{"file": str(disk)}]})
    assert result["manifest"]["disks"][0]["inode"] == os.stat(disk).st_ino
    assert not run(state="pending", record={"method": "external"})["changed"]
    assert not run(state="pending")["changed"]
    result = run(state="pending", record={"hypervisor": "hv2"}, diff=True)
    assert (
        result["changed"] and result["msg"] == "Checkpoint pre-upgrade of VM web01 is pending; its record was updated."
    )
    assert result["diff"]["before"]["hypervisor"] is None and result["diff"]["after"]["hypervisor"] == "hv2"
    result = run(state="open", record={"state_file": "/v/s.vmstate", "result": {"downtime_ms": 12.5}})
    assert result["manifest"]["hypervisor"] == "hv2" and result["manifest"]["method"] == "external"
    assert result["manifest"]["result"] == {"downtime_ms": 12.5}
    assert result["age_seconds"] is not None
    on_disk = json.loads((tmp_path / "manifests" / VM / f"{NAME}.json").read_text())
    assert on_disk == result["manifest"]


def test_existing_checkpoint_is_left_alone_by_pending(run: t.Callable[..., dict[str, t.Any]], tmp_path: Path) -> None:
    run(state="pending", record={"method": "offline"})
    opened = run(state="open")["manifest"]
    result = run(state="pending", record={"method": "internal"})
    assert (result["changed"], result["manifest"], result["previous_state"]) == (False, opened, "open")
    assert result["msg"] == "Checkpoint pre-upgrade of VM web01 exists already (state open); it was left alone."


def test_loose_folders_are_tightened_with_one_warning(run: t.Callable[..., dict[str, t.Any]], tmp_path: Path) -> None:
    folder = tmp_path / "manifests"
    (folder / VM).mkdir(parents=True)
    os.chmod(folder, 0o755)
    os.chmod(folder / VM, 0o750)
    result = run(check=True, state="released")
    assert result["changed"] and not result["exists"]
    assert warnings(result) == [
        f"Manifest folders open to group or others would be tightened to mode 0700: {folder}, {folder / VM}."
    ]
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o755
    result = run(state="released")
    assert result["changed"] and len(warnings(result)) == 1 and "were tightened" in warnings(result)[0]
    assert (stat.S_IMODE(os.stat(folder).st_mode), stat.S_IMODE(os.stat(folder / VM).st_mode)) == (0o700, 0o700)
    result = run(state="released")
    assert not result["changed"] and not warnings(result)
    assert run()["msg"] == "VM web01 has no checkpoint pre-upgrade."  # query does not tighten or warn


def test_damaged_or_linked_manifest_fails_untouched(run: t.Callable[..., dict[str, t.Any]], tmp_path: Path) -> None:
    folder = tmp_path / "manifests" / VM
    folder.mkdir(parents=True, mode=0o700)
    path = folder / f"{NAME}.json"
    path.write_text('{"format": "vmsnap-checkpoint-manifest", "version": 9}')
    before = tree(tmp_path)
    for state in ("query", "pending", "released"):
        result = run(state=state)
        assert result["failed"] and not result["changed"]
        assert result["msg"] == (
            f"Manifest {path} has version 9, newer than this collection knows (1); upgrade vmsnap.qemu; the file "
            "was left untouched."
        )
    assert tree(tmp_path) == before
    path.unlink()
    os.symlink(tmp_path / "elsewhere.json", path)
    result = run(state="pending")
    assert result["failed"] and result["msg"] == f"Manifest {path} is a symlink; refusing to follow it."
    assert not (tmp_path / "elsewhere.json").exists()


def test_failed_write_keeps_the_old_manifest(
    run: t.Callable[..., dict[str, t.Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run(state="pending", record={"method": "offline"})
    before = tree(tmp_path)

    def full_disk(src: str, dst: str) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "rename", full_disk)  # the last step of the atomic write fails
    result = run(state="open")
    monkeypatch.undo()
    path = tmp_path / "manifests" / VM / f"{NAME}.json"
    assert result["failed"] and not result["changed"]
    assert result["msg"] == f"Cannot write manifest {path}: No space left on device."
    assert result["manifest"]["state"] == "pending" and result["exists"]
    assert tree(tmp_path) == before  # no temporary file left, the pending manifest as it was
