# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""_manifest: names, records, every transition, files (modes, symlinks, damage, atomic writes) and verification.

Verification runs against real images: qemu-img snapshots and overlays, a real savevm (RAM in the snapshot) and a
real QEMU holding the images while they are read.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import time
import typing as t
from pathlib import Path

import pytest

from ansible_collections.vmsnap.qemu.plugins.module_utils import _manifest
from ansible_collections.vmsnap.qemu.plugins.module_utils._errors import ValidationError
from ansible_collections.vmsnap.qemu.plugins.module_utils._manifest import (
    FORMAT,
    RECORD_KEYS,
    ManifestError,
    age_seconds,
    diff_view,
    inspect_folders,
    is_young,
    manifest_path,
    mismatch_message,
    normalize_record,
    plan_transition,
    prepare_folders,
    read_manifest,
    validate_name,
    verify,
    write_manifest,
)
from ansible_collections.vmsnap.qemu.plugins.module_utils._retention import parse_duration
from ansible_collections.vmsnap.qemu.tests.unit.plugins.module_utils.real_tools import real_qemu_img

NOW = 1796155200.0
VM = "web01"
NAME = "pre-upgrade"


def read_top() -> t.Callable[[str], t.Any]:
    return real_qemu_img().read_top


def qemu_img(*args: str) -> str:
    return subprocess.run(["qemu-img", *args], check=True, capture_output=True, text=True).stdout


def image(path: Path, *options: str) -> str:
    qemu_img("create", "-q", "-f", "qcow2", *options, str(path), "16M")
    return str(path)


def no_identity(fields: dict[str, t.Any]) -> None:
    raise AssertionError("the disks were examined although nothing is written")


def fake_identity(fields: dict[str, t.Any]) -> None:
    for disk in fields.get("disks") or []:
        if disk["dev"] is None:
            disk["dev"], disk["inode"] = 7, 42


def plan(current: dict[str, t.Any] | None, target: str, record: dict[str, t.Any] | None = None, now: float = NOW):
    return plan_transition(current, target, VM, NAME, normalize_record(record), now, identify=fake_identity)


def walk(*targets: str, record: dict[str, t.Any] | None = None) -> dict[str, t.Any]:
    manifest = None
    for step, target in enumerate(targets):
        manifest = plan(manifest, target, record if target == "pending" else None, now=NOW + step).manifest
    assert manifest is not None
    return manifest


# --- names and records ---


@pytest.mark.parametrize("good", ["web01", "a", "x" * 64, "db_1.prod+blue-2", "_tmp", "+", "9"])
def test_good_names(good: str) -> None:
    assert validate_name(good, "VM name") == good


@pytest.mark.parametrize(
    "bad", ["", "x" * 65, ".hidden", "-rf", "a/b", "..", "sp ace", "ünï", "a\nb", "a:b", "a*", None, 5]
)
def test_bad_names_are_named(bad: t.Any) -> None:
    with pytest.raises(ValidationError) as info:
        validate_name(bad, "checkpoint name")
    assert info.value.msg.startswith(f"Invalid checkpoint name {bad!r}: use 1 to 64 characters")


def test_manifest_path_validates_both_names(tmp_path: Path) -> None:
    assert manifest_path(str(tmp_path), VM, NAME) == f"{tmp_path}/web01/pre-upgrade.json"
    with pytest.raises(ValidationError, match="Invalid VM name '../etc'"):
        manifest_path(str(tmp_path), "../etc", NAME)
    with pytest.raises(ValidationError, match="Invalid checkpoint name 'x/y'"):
        manifest_path(str(tmp_path), VM, "x/y")


def test_unknown_record_keys_are_refused() -> None:
    with pytest.raises(ValidationError) as info:
        normalize_record({"method": "internal", "snapshots": "x", "disk": []})
    assert info.value.msg == f"record has unknown keys: disk, snapshots. Allowed are: {', '.join(RECORD_KEYS)}."
    with pytest.raises(ValidationError, match=r"record.disks\[0\] has unknown keys: size"):
        normalize_record({"disks": [{"file": "/v/a.qcow2", "size": 1}]})


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"method": "snapshot"}, "record.method must be one of internal, external, offline, not 'snapshot'."),
        ({"hypervisor": 5}, "record.hypervisor must be a string or null, not 5."),
        ({"vm_start": {"unit": "a", "argv": ["b"]}}, "record.vm_start must be null, {unit: NAME} or {argv: "),
        ({"vm_start": {"argv": []}}, "record.vm_start must be null"),
        ({"vm_start": "qemu@web01"}, "record.vm_start must be null"),
        ({"disks": {"file": "/a"}}, "record.disks must be a list of dictionaries"),
        ({"disks": [{"format": "qcow2"}]}, "record.disks[0].file must be an absolute path, not None."),
        ({"disks": [{"file": "rel.qcow2"}]}, "record.disks[0].file must be an absolute path, not 'rel.qcow2'."),
        ({"disks": [{"file": "/a", "overlay": "o.qcow2"}]}, "record.disks[0].overlay must be an absolute path"),
        ({"disks": [{"file": "/a", "inode": -1}]}, "record.disks[0].inode must be a whole number or null, not -1."),
        ({"disks": [{"file": "/a", "dev": True}]}, "record.disks[0].dev must be a whole number or null, not True."),
        ({"result": [1]}, "record.result must be a dictionary or null, not [1]."),
        ("method=internal", "record must be a dictionary, not str."),
    ],
)
def test_bad_record_values(record: t.Any, message: str) -> None:
    with pytest.raises(ValidationError) as info:
        normalize_record(record)
    assert info.value.msg.startswith(message)


def test_record_is_normalized() -> None:
    record = normalize_record(
        {
            "vm_start": {"argv": ["/usr/bin/qemu-system-x86_64", "-m", "512"]},
            "disks": [{"file": "/v/a.qcow2", "dev": "2049", "inode": 12}],
            "result": {"downtime_ms": 31.4},
        }
    )
    assert record["disks"] == [
        {"file": "/v/a.qcow2", "format": None, "device": None, "node_name": None, "qdev": None, "overlay": None,
         "dev": 2049, "inode": 12}
    ]  # fmt: skip
    assert set(record) == {"vm_start", "disks", "result"}  # keys not given stay out (open merges over pending)


def test_identify_disks_reads_the_files_now(tmp_path: Path) -> None:
    disk = tmp_path / "a.qcow2"
    disk.write_bytes(b"x")
    record = normalize_record({"disks": [{"file": str(disk)}, {"file": "/v/b.qcow2", "dev": 1, "inode": 2}]})
    _manifest.identify_disks(record)
    st = os.stat(disk)
    assert (record["disks"][0]["dev"], record["disks"][0]["inode"]) == (st.st_dev, st.st_ino)
    assert (record["disks"][1]["dev"], record["disks"][1]["inode"]) == (1, 2)
    with pytest.raises(ValidationError, match=f"Disk {tmp_path}/gone.qcow2 of the record cannot be examined"):
        _manifest.identify_disks(normalize_record({"disks": [{"file": str(tmp_path / "gone.qcow2")}]}))


# --- transitions ---


def test_pending_from_nothing_has_the_whole_schema() -> None:
    result = plan(None, "pending", {"method": "internal", "snapshot": NAME, "disks": [{"file": "/v/a.qcow2"}]})
    assert (result.changed, result.write) == (True, True)
    assert result.msg == "Checkpoint pre-upgrade of VM web01 is now pending."
    assert result.manifest == {
        "format": FORMAT, "version": 1, "vm": VM, "name": NAME, "state": "pending",
        "created": "2026-12-01T20:00:00Z", "created_epoch": NOW, "updated": "2026-12-01T20:00:00Z",
        "updated_epoch": NOW, "history": [{"state": "pending", "time": "2026-12-01T20:00:00Z", "epoch": NOW}],
        "method": "internal", "hypervisor": None, "qmp_socket": None, "qga_socket": None, "vm_start": None,
        "qemu_version": None, "snapshot": NAME, "state_file": None, "result": None,
        "disks": [{"file": "/v/a.qcow2", "format": None, "device": None, "node_name": None, "qdev": None,
                   "overlay": None, "dev": 7, "inode": 42}],
    }  # fmt: skip


def test_pending_again_is_unchanged_or_updates_the_record() -> None:
    pending = walk("pending", record={"method": "internal", "disks": [{"file": "/v/a.qcow2"}]})
    same = plan(pending, "pending", {"method": "internal", "disks": [{"file": "/v/a.qcow2"}]}, now=NOW + 60)
    assert (same.changed, same.write, same.manifest) == (False, False, pending)
    assert same.msg == "Checkpoint pre-upgrade of VM web01 is pending already, with the same record."
    other = plan(pending, "pending", {"hypervisor": "hv2"}, now=NOW + 60)
    assert (other.changed, other.write) == (True, True)
    assert other.manifest is not None
    assert other.manifest["hypervisor"] == "hv2" and other.manifest["method"] == "internal"
    assert other.manifest["created_epoch"] == NOW and other.manifest["updated_epoch"] == NOW + 60
    assert other.manifest["history"] == pending["history"]


@pytest.mark.parametrize("state", ["open", "rolled_back"])
def test_pending_leaves_an_existing_checkpoint_alone(state: str) -> None:
    existing = walk(*(["pending", "open"] + (["rolled_back"] if state == "rolled_back" else [])))
    result = plan_transition(
        existing, "pending", VM, NAME, normalize_record({"method": "offline"}), NOW + 9, no_identity
    )
    assert (result.changed, result.write, result.manifest) == (False, False, existing)
    assert result.msg == f"Checkpoint pre-upgrade of VM web01 exists already (state {state}); it was left alone."


def test_pending_over_released_starts_again_and_keeps_the_history() -> None:
    released = walk("pending", "open", "released", record={"method": "internal", "snapshot": "old"})
    result = plan(released, "pending", {"method": "external"}, now=NOW + 100)
    assert result.changed and result.manifest is not None
    assert result.manifest["created_epoch"] == NOW + 100
    assert result.manifest["method"] == "external" and result.manifest["snapshot"] is None  # a new record
    assert [entry["state"] for entry in result.manifest["history"]] == ["pending", "open", "released", "pending"]


def test_open_merges_over_the_pending_record() -> None:
    pending = walk("pending", record={"method": "external", "hypervisor": "hv1", "disks": [{"file": "/v/a.qcow2"}]})
    record = {"state_file": "/v/s.vmstate", "disks": [{"file": "/v/a.qcow2", "overlay": "/v/o.qcow2"}]}
    result = plan(pending, "open", record, now=NOW + 3)
    assert (result.changed, result.write, result.msg) == (True, True, "Checkpoint pre-upgrade of VM web01 is now open.")
    manifest = result.manifest
    assert manifest is not None
    assert (manifest["state"], manifest["hypervisor"], manifest["state_file"]) == ("open", "hv1", "/v/s.vmstate")
    assert manifest["disks"][0]["overlay"] == "/v/o.qcow2" and manifest["disks"][0]["inode"] == 42
    assert manifest["created_epoch"] == NOW and manifest["updated"] == "2026-12-01T20:00:03Z"
    assert [entry["state"] for entry in manifest["history"]] == ["pending", "open"]


def test_open_again_ignores_the_record() -> None:
    existing = walk("pending", "open")
    result = plan_transition(existing, "open", VM, NAME, normalize_record({"method": "offline"}), NOW + 9, no_identity)
    assert (result.changed, result.write, result.manifest) == (False, False, existing)


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ((), "VM web01 has no pending checkpoint pre-upgrade: a checkpoint is marked open only after"),
        (("pending", "open", "rolled_back"), "Checkpoint pre-upgrade of VM web01 was rolled back already and cannot"),
        (("pending", "released"), "Checkpoint pre-upgrade of VM web01 was released and cannot be opened"),
    ],
)
def test_open_errors(steps: tuple[str, ...], message: str) -> None:
    existing = walk(*steps) if steps else None
    with pytest.raises(ManifestError) as info:
        plan(existing, "open")
    assert info.value.msg.startswith(message)


def test_rolled_back() -> None:
    opened = walk("pending", "open")
    result = plan(opened, "rolled_back", now=NOW + 5)
    assert result.changed and result.manifest is not None and result.manifest["state"] == "rolled_back"
    assert result.msg == "Checkpoint pre-upgrade of VM web01 is now marked rolled back."
    again = plan(result.manifest, "rolled_back", now=NOW + 6)
    assert (again.changed, again.write, again.manifest) == (False, False, result.manifest)


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ((), "VM web01 has no checkpoint pre-upgrade: there is nothing to roll back to."),
        (
            ("pending",),
            "Checkpoint pre-upgrade of VM web01 was interrupted while it was being taken (state pending): run the "
            "checkpoint role again to finish it, or the release role to remove it.",
        ),
        (("pending", "released"), "Checkpoint pre-upgrade of VM web01 was released: there is nothing left to roll"),
    ],
)
def test_rolled_back_errors(steps: tuple[str, ...], message: str) -> None:
    with pytest.raises(ManifestError) as info:
        plan(walk(*steps) if steps else None, "rolled_back")
    assert info.value.msg.startswith(message)


@pytest.mark.parametrize("steps", [("pending",), ("pending", "open"), ("pending", "open", "rolled_back")])
def test_released(steps: tuple[str, ...]) -> None:
    existing = walk(*steps)
    result = plan(existing, "released", now=NOW + 50)
    assert (result.changed, result.write) == (True, True)
    assert result.manifest is not None and result.manifest["state"] == "released"
    assert result.msg == f"Checkpoint pre-upgrade of VM web01 is now released (it was {steps[-1]})."
    assert result.manifest["history"][-1] == {"state": "released", "time": "2026-12-01T20:00:50Z", "epoch": NOW + 50}
    again = plan(result.manifest, "released", now=NOW + 60)
    assert (again.changed, again.manifest) == (False, result.manifest)


def test_released_without_a_manifest_is_no_error() -> None:
    result = plan(None, "released")
    assert (result.changed, result.write, result.manifest) == (False, False, None)
    assert result.msg == "VM web01 has no checkpoint pre-upgrade: nothing to release."


def test_diff_view_and_age() -> None:
    assert diff_view(None) == {"exists": False}
    manifest = walk("pending", record={"method": "offline"})
    view = diff_view(manifest)
    assert view["state"] == "pending" and view["method"] == "offline" and "history" not in view
    assert age_seconds(None, NOW) is None and age_seconds(manifest, NOW + 90.5) == 90.5


def test_keep_for_young() -> None:
    manifest = walk("pending")
    assert is_young(manifest, NOW + 3599, parse_duration("1h"))
    assert not is_young(manifest, NOW + 3600, parse_duration("60m"))
    assert not is_young(manifest, NOW + 8 * 86400, parse_duration("7d"))
    assert not is_young(None, NOW, parse_duration(60))
    with pytest.raises(ValidationError, match="Invalid duration 'soon'"):
        parse_duration("soon")


# --- files ---


@pytest.fixture
def umask_022() -> t.Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


def store(folder: Path, manifest: dict[str, t.Any]) -> str:
    path = manifest_path(str(folder), VM, NAME)
    found = inspect_folders(str(folder), VM)
    prepare_folders(str(folder), VM, found)
    write_manifest(path, manifest)
    return path


def mode(path: str | Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_folders_0700_file_0600_and_read_back(tmp_path: Path, umask_022: None) -> None:
    folder = tmp_path / "var" / "manifests"
    found = inspect_folders(str(folder), VM)
    assert found.missing == [str(folder), str(folder / VM)] and found.loose == []
    manifest = walk("pending", "open", record={"method": "offline", "snapshot": NAME})
    path = store(folder, manifest)
    assert (mode(folder), mode(folder / VM), mode(path)) == (0o700, 0o700, 0o600)
    assert read_manifest(path, VM, NAME) == manifest
    assert sorted(os.listdir(folder / VM)) == ["pre-upgrade.json"]
    assert read_manifest(manifest_path(str(folder), VM, "other"), VM, "other") is None


def test_loose_folders_are_found_and_tightened(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    (folder / VM).mkdir(parents=True)
    os.chmod(folder, 0o755)
    os.chmod(folder / VM, 0o770)
    found = inspect_folders(str(folder), VM)
    assert found.loose == [str(folder), str(folder / VM)] and found.missing == []
    prepare_folders(str(folder), VM, found)
    assert (mode(folder), mode(folder / VM)) == (0o700, 0o700)
    assert inspect_folders(str(folder), VM).loose == []


def test_symlinked_manifest_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    (folder / VM).mkdir(parents=True, mode=0o700)
    target = tmp_path / "elsewhere.json"
    target.write_text("precious")
    os.symlink(target, folder / VM / "pre-upgrade.json")
    with pytest.raises(ManifestError) as info:
        read_manifest(manifest_path(str(folder), VM, NAME), VM, NAME)
    assert info.value.msg == f"Manifest {folder}/web01/pre-upgrade.json is a symlink; refusing to follow it."
    assert target.read_text() == "precious"


def test_symlinked_vm_folder_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir(mode=0o700)
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    os.symlink(real, folder / VM)
    path = manifest_path(str(folder), VM, NAME)
    with pytest.raises(ManifestError, match=f"The manifest folder {folder}/web01 is a symlink; refusing to follow"):
        read_manifest(path, VM, NAME)
    with pytest.raises(ManifestError, match="is a symlink; refusing to follow it"):
        inspect_folders(str(folder), VM)
    assert os.listdir(real) == []


def test_symlinked_manifest_folder_is_allowed(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    os.symlink(real, tmp_path / "link")
    path = store(tmp_path / "link", walk("pending"))
    assert os.path.isfile(real / VM / "pre-upgrade.json") and read_manifest(path, VM, NAME) is not None


def test_vm_path_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / VM).write_text("")
    with pytest.raises(ManifestError, match=f"{tmp_path}/web01 is not a folder; it cannot hold checkpoint manifests"):
        inspect_folders(str(tmp_path), VM)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"{not json", "is not valid JSON (Expecting property name"),
        (b"\xff\xfe", "is not valid JSON ("),
        (b"[]", "is not a checkpoint manifest (format vmsnap-checkpoint-manifest)"),
        (json.dumps({"format": "vmsnap-sidecar", "version": 1}).encode(), "is not a checkpoint manifest"),
        (json.dumps({"format": FORMAT, "version": "1"}).encode(), "has an invalid version '1'"),
        (json.dumps({"format": FORMAT, "version": 2}).encode(), "has version 2, newer than this collection knows (1)"),
    ],
)
def test_unreadable_manifests_fail_and_stay_untouched(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / VM / "pre-upgrade.json"
    path.parent.mkdir()
    path.write_bytes(content)
    with pytest.raises(ManifestError) as info:
        read_manifest(str(path), VM, NAME)
    assert info.value.msg.startswith(f"Manifest {path} {message}") or info.value.msg.startswith(f"{path} {message}")
    assert info.value.msg.endswith("the file was left untouched.")
    assert path.read_bytes() == content


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"vm": "db01"}, "it is for checkpoint 'pre-upgrade' of VM 'db01'"),
        ({"state": "closed"}, "unknown state 'closed'"),
        ({"created_epoch": "yesterday"}, "created_epoch is 'yesterday'"),
        ({"history": None}, "history is not a list"),
        ({"disks": [{"format": "qcow2"}]}, "disks is not a list of disks with a file"),
    ],
)
def test_damaged_manifests(tmp_path: Path, change: dict[str, t.Any], problem: str) -> None:
    path = tmp_path / VM / "pre-upgrade.json"
    path.parent.mkdir()
    content = json.dumps(dict(walk("pending"), **change)).encode()
    path.write_bytes(content)
    with pytest.raises(ManifestError) as info:
        read_manifest(str(path), VM, NAME)
    assert info.value.msg == f"Manifest {path} is damaged: {problem}; the file was left untouched."
    assert path.read_bytes() == content


def test_manifest_that_is_a_folder(tmp_path: Path) -> None:
    (tmp_path / VM / "pre-upgrade.json").mkdir(parents=True)
    with pytest.raises(ManifestError, match="is not a regular file; it was left untouched"):
        read_manifest(str(tmp_path / VM / "pre-upgrade.json"), VM, NAME)


def test_failed_write_leaves_no_temporary_file_and_the_old_manifest(tmp_path: Path) -> None:
    path = store(tmp_path, walk("pending"))
    before = Path(path).read_bytes()
    with pytest.raises(TypeError):
        write_manifest(path, {"bad": object()})  # fails before anything is created
    blocker = tmp_path / VM / "blocked.json"
    (blocker / "inside").mkdir(parents=True)  # renaming a file over a non-empty folder fails
    with pytest.raises(OSError):
        write_manifest(str(blocker), walk("pending"))
    assert sorted(os.listdir(tmp_path / VM)) == ["blocked.json", "pre-upgrade.json"]
    assert Path(path).read_bytes() == before


def test_write_replaces_a_symlink_that_appeared_instead_of_writing_through_it(tmp_path: Path) -> None:
    path = store(tmp_path, walk("pending"))
    target = tmp_path / "target"
    target.write_text("precious")
    os.unlink(path)
    os.symlink(target, path)
    write_manifest(path, walk("pending", "open"))
    assert target.read_text() == "precious" and not os.path.islink(path) and mode(path) == 0o600


# --- verification against real images ---


def opened(record: dict[str, t.Any]) -> dict[str, t.Any]:
    """An open manifest whose disks got dev/inode from the real files."""
    manifest = plan_transition(None, "pending", VM, NAME, normalize_record(record), NOW).manifest
    result = plan_transition(manifest, "open", VM, NAME, {}, NOW + 1)
    assert result.manifest is not None
    return result.manifest


def replace_file(path: str) -> None:
    """A new file at the same path (another inode), as a restore from backup or a careless copy makes."""
    os.rename(path, path + ".old")
    image(Path(path))
    os.unlink(path + ".old")


def test_offline_checkpoint_verifies_and_names_every_mismatch(tmp_path: Path) -> None:
    disks = [image(tmp_path / "a.qcow2"), image(tmp_path / "b.qcow2")]
    for disk in disks:
        qemu_img("snapshot", "-c", NAME, disk)
    manifest = opened({"method": "offline", "snapshot": NAME, "disks": [{"file": disk} for disk in disks]})
    assert verify(manifest, read_top()) == []
    qemu_img("snapshot", "-d", NAME, disks[0])
    old_inode = os.stat(disks[1]).st_ino
    replace_file(disks[1])
    mismatches = verify(manifest, read_top())
    assert mismatches == [
        f"{disks[1]} was replaced (inode {old_inode} -> {os.stat(disks[1]).st_ino})",
        f"{disks[0]} has no internal snapshot {NAME}",
    ]
    assert mismatch_message(manifest, mismatches).startswith(
        f"Checkpoint pre-upgrade of VM web01 no longer matches its files: {disks[1]} was replaced (inode "
    )
    os.unlink(disks[0])
    assert verify(manifest, read_top())[0] == f"{disks[0]} is missing"


def test_internal_checkpoint_needs_the_ram(tmp_path: Path) -> None:
    disk = image(tmp_path / "a.qcow2")
    qemu_img("snapshot", "-c", NAME, disk)  # disk-only: vm_state_size 0
    manifest = opened({"method": "internal", "snapshot": NAME, "disks": [{"file": disk}]})
    assert verify(manifest, read_top()) == [f"no disk's snapshot {NAME} holds the VM's RAM (vm_state_size is 0)"]
    with QemuVm(tmp_path, [disk]) as vm:
        vm.hmp(f"delvm {NAME}")
        vm.hmp(f"savevm {NAME}")
        # The running VM holds the image: it is read with QEMU's locks shared.
        assert verify(manifest, read_top()) == []
    assert verify(manifest, read_top()) == []
    assert verify(dict(manifest, snapshot="other"), read_top()) == [
        f"{disk} has no internal snapshot other",
        "no disk's snapshot other holds the VM's RAM (vm_state_size is 0)",
    ]
    assert verify(dict(manifest, snapshot=None), read_top()) == ["the manifest names no internal snapshot"]


def test_external_checkpoint(tmp_path: Path) -> None:
    base = image(tmp_path / "web01.qcow2")
    overlay = str(tmp_path / "web01.vmsnap-pre-upgrade.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", overlay)
    state_file = tmp_path / "web01.vmstate"
    state_file.write_bytes(b"QEVM")
    (tmp_path / "web01.vmstate.json").write_text("{}")
    manifest = opened(
        {"method": "external", "state_file": str(state_file), "disks": [{"file": base, "overlay": overlay}]}
    )
    with QemuVm(tmp_path, [overlay]):  # QEMU writes the overlay and holds the chain
        assert verify(manifest, read_top()) == []
    other = image(tmp_path / "other.qcow2")
    qemu_img("rebase", "-q", "-u", "-b", other, "-F", "qcow2", overlay)
    assert verify(manifest, read_top()) == [f"overlay {overlay} is based on {other}, not on {base}"]
    qemu_img("rebase", "-q", "-u", "-b", "", overlay)
    assert verify(manifest, read_top()) == [f"overlay {overlay} has no backing file (it should be {base})"]
    os.unlink(overlay)
    qemu_img("create", "-q", "-f", "raw", overlay, "1M")
    assert verify(manifest, read_top()) == [f"overlay {overlay} is raw, not qcow2"]
    os.unlink(overlay)
    os.unlink(tmp_path / "web01.vmstate.json")
    assert verify(manifest, read_top()) == [
        f"overlay {overlay} is missing",
        f"the sidecar {state_file}.json of state file {state_file} is missing",
    ]
    os.unlink(state_file)
    assert f"state file {state_file} is missing" in verify(manifest, read_top())


def test_relative_backing_file_resolves_to_the_disk(tmp_path: Path) -> None:
    base = image(tmp_path / "base.qcow2")
    overlay = str(tmp_path / "top.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", overlay)
    link = tmp_path / "disk-link.qcow2"
    os.symlink(base, link)
    manifest = opened({"method": "external", "disks": [{"file": str(link), "overlay": overlay}]})
    assert verify(manifest, read_top()) == []


def test_unknown_method_and_no_disks() -> None:
    manifest = opened({})
    assert verify(manifest, read_top()) == ["the manifest names no known method (None)", "the manifest lists no disks"]


class QemuVm:
    """A real QEMU (no guest OS, paused at start) with the given qcow2 images as virtio disks."""

    def __init__(self, folder: Path, disks: list[str]) -> None:
        self.sock = str(folder / "qmp.sock")
        argv = ["qemu-system-x86_64", "-accel", "kvm", "-accel", "tcg", "-m", "64", "-nodefaults", "-display", "none",
                "-S", "-qmp", f"unix:{self.sock},server=on,wait=off"]  # fmt: skip
        for disk in disks:
            argv += ["-drive", f"file={disk},format=qcow2,if=virtio"]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.conn: socket.socket | None = None

    def __enter__(self) -> QemuVm:
        deadline = time.monotonic() + 30
        while self.conn is None:
            try:
                conn = socket.socket(socket.AF_UNIX)
                conn.connect(self.sock)
                self.conn = conn
            except OSError:
                conn.close()
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.__exit__()
                    raise
                time.sleep(0.05)
        self.conn.settimeout(60)
        self.reader = self.conn.makefile()
        self.reader.readline()  # greeting
        self.command("qmp_capabilities")
        return self

    def command(self, name: str, arguments: dict[str, t.Any] | None = None) -> t.Any:
        assert self.conn is not None
        message: dict[str, t.Any] = {"execute": name}
        if arguments:
            message["arguments"] = arguments
        self.conn.sendall(json.dumps(message).encode() + b"\n")
        while True:
            reply = json.loads(self.reader.readline())
            if "event" not in reply:
                assert "return" in reply, reply
                return reply["return"]

    def hmp(self, line: str) -> None:
        out = self.command("human-monitor-command", {"command-line": line})
        assert out == "", f"{line}: {out}"

    def __exit__(self, *exc: t.Any) -> None:
        if self.conn is not None:
            self.conn.close()
        self.proc.kill()
        self.proc.wait()


def test_oversized_manifest_is_refused(tmp_path: Path) -> None:
    path = tmp_path / VM / "pre-upgrade.json"
    path.parent.mkdir()
    with open(path, "wb") as handle:
        handle.truncate(16 * 1024 * 1024 + 1)
    with pytest.raises(ManifestError, match="is larger than 16777216 bytes; the file was left untouched"):
        read_manifest(str(path), VM, NAME)
