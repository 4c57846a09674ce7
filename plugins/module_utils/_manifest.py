# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!

"""Checkpoint manifests: a JSON record per VM and checkpoint of exactly what was taken.

The roles write a manifest before a checkpoint is taken (pending), once it is complete (open), and when it is
rolled back or released; rollback and release act only from a manifest. Files live in <dir>/<vm>/<name>.json
(folders 0700, files 0600, written atomically). Symlinks at the VM folder or the manifest are refused, never
followed. plan_transition() is pure; read/write/verify do the I/O.
"""

from __future__ import annotations

import copy
import datetime
import errno
import json
import os
import re
import stat
import typing as t
from dataclasses import dataclass, field

from ansible_collections.vmsnap.qemu.plugins.module_utils._errors import (
    QemuImgError,
    ValidationError,
    VmsnapError,
)
from ansible_collections.vmsnap.qemu.plugins.module_utils._vmstate import sidecar_path, write_json_atomic

if t.TYPE_CHECKING:
    from ansible_collections.vmsnap.qemu.plugins.module_utils._image import ImageInfo

FORMAT = "vmsnap-checkpoint-manifest"
VERSION = 1
DEFAULT_DIR = "/var/lib/vmsnap/manifests"
STATES = ("pending", "open", "rolled_back", "released")
METHODS = ("internal", "external", "offline")
RECORD_KEYS = (
    "method",
    "hypervisor",
    "qmp_socket",
    "qga_socket",
    "vm_start",
    "qemu_version",
    "snapshot",
    "state_file",
    "disks",
    "result",
)
DISK_KEYS = ("file", "format", "device", "node_name", "qdev", "overlay", "dev", "inode")
_OPTIONAL_TEXT = ("hypervisor", "qmp_socket", "qga_socket", "qemu_version", "snapshot", "state_file")
_NAME = re.compile(r"^[A-Za-z0-9_+][A-Za-z0-9._+-]{0,63}\Z")
_MAX_BYTES = 16 * 1024 * 1024
_LOOSE_BITS = 0o077

ReadTop = t.Callable[[str], "ImageInfo"]


class ManifestError(VmsnapError):
    """A manifest cannot be read, does not allow the requested transition, or no longer matches its files."""


@dataclass(frozen=True)
class Transition:
    """What a task does to a manifest: changed, the manifest afterwards (None: there is none) and why."""

    changed: bool
    manifest: dict[str, t.Any] | None
    msg: str
    write: bool = False


@dataclass
class Folders:
    """The manifest folder and the VM's folder: which are missing and which are open to group or others."""

    missing: list[str] = field(default_factory=list)
    loose: list[str] = field(default_factory=list)


def validate_name(value: t.Any, what: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise ValidationError(
            f"Invalid {what} {value!r}: use 1 to 64 characters out of letters, digits and . _ + - "
            "that do not start with '.' or '-'."
        )
    return value


def manifest_path(folder: str, vm: str, name: str) -> str:
    return os.path.join(folder, validate_name(vm, "VM name"), validate_name(name, "checkpoint name") + ".json")


def utc_stamp(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(int(epoch), tz=datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def label(vm: str, name: str) -> str:
    return f"Checkpoint {name} of VM {vm}"


# --- record validation (pure) ---


def normalize_record(record: t.Any) -> dict[str, t.Any]:
    """The given record keys, checked and in canonical form; keys that are not given stay out."""
    if record is None:
        return {}
    if not isinstance(record, dict):
        raise ValidationError(f"record must be a dictionary, not {type(record).__name__}.")
    unknown = sorted(set(record) - set(RECORD_KEYS))
    if unknown:
        raise ValidationError(
            f"record has unknown keys: {', '.join(unknown)}. Allowed are: {', '.join(RECORD_KEYS)}.",
        )
    out: dict[str, t.Any] = {}
    for key, value in record.items():
        out[key] = _CHECKS[key](value)
    return out


def _check_method(value: t.Any) -> str | None:
    if value is not None and value not in METHODS:
        raise ValidationError(f"record.method must be one of {', '.join(METHODS)}, not {value!r}.")
    return t.cast("t.Optional[str]", value)


def _text_check(key: str) -> t.Callable[[t.Any], str | None]:
    def check(value: t.Any) -> str | None:
        if value is not None and not isinstance(value, str):
            raise ValidationError(f"record.{key} must be a string or null, not {value!r}.")
        return t.cast("t.Optional[str]", value)

    return check


def _check_vm_start(value: t.Any) -> dict[str, t.Any] | None:
    if value is None:
        return None
    if isinstance(value, dict) and set(value) == {"unit"} and isinstance(value["unit"], str) and value["unit"]:
        return {"unit": value["unit"]}
    if (
        isinstance(value, dict)
        and set(value) == {"argv"}
        and isinstance(value["argv"], list)
        and value["argv"]
        and all(isinstance(arg, str) for arg in value["argv"])
    ):
        return {"argv": list(value["argv"])}
    raise ValidationError(
        f"record.vm_start must be null, {{unit: NAME}} or {{argv: [PROGRAM, ARG, ...]}}, not {value!r}."
    )


def _check_disks(value: t.Any) -> list[dict[str, t.Any]]:
    if not isinstance(value, list):
        raise ValidationError(f"record.disks must be a list of dictionaries, not {value!r}.")
    return [_check_disk(index, disk) for index, disk in enumerate(value)]


def _check_disk(index: int, disk: t.Any) -> dict[str, t.Any]:
    where = f"record.disks[{index}]"
    if not isinstance(disk, dict):
        raise ValidationError(f"{where} must be a dictionary, not {disk!r}.")
    unknown = sorted(set(disk) - set(DISK_KEYS))
    if unknown:
        raise ValidationError(f"{where} has unknown keys: {', '.join(unknown)}. Allowed are: {', '.join(DISK_KEYS)}.")
    file = disk.get("file")
    if not isinstance(file, str) or not os.path.isabs(file):
        raise ValidationError(f"{where}.file must be an absolute path, not {file!r}.")
    out: dict[str, t.Any] = {"file": file}
    for key in ("format", "device", "node_name", "qdev", "overlay"):
        value = disk.get(key)
        if value is not None and not isinstance(value, str):
            raise ValidationError(f"{where}.{key} must be a string or null, not {value!r}.")
        out[key] = value
    if out["overlay"] is not None and not os.path.isabs(out["overlay"]):
        raise ValidationError(f"{where}.overlay must be an absolute path, not {out['overlay']!r}.")
    for key in ("dev", "inode"):
        out[key] = _optional_count(disk.get(key), f"{where}.{key}")
    return out


def _optional_count(value: t.Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, str) and value.isdigit():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise ValidationError(f"{where} must be a whole number or null, not {value!r}.")


def _check_result(value: t.Any) -> dict[str, t.Any] | None:
    if value is not None and not isinstance(value, dict):
        raise ValidationError(f"record.result must be a dictionary or null, not {value!r}.")
    return None if value is None else copy.deepcopy(value)


_CHECKS: dict[str, t.Callable[[t.Any], t.Any]] = {
    "method": _check_method,
    "vm_start": _check_vm_start,
    "disks": _check_disks,
    "result": _check_result,
}
_CHECKS.update({key: _text_check(key) for key in _OPTIONAL_TEXT})


def identify_disks(record: dict[str, t.Any], stat_file: t.Callable[[str], os.stat_result] = os.stat) -> None:
    """Fill dev/inode of every disk that has none, from the file as it is now (in place)."""
    for disk in record.get("disks") or []:
        if disk["dev"] is not None and disk["inode"] is not None:
            continue
        try:
            st = stat_file(disk["file"])
        except OSError as exc:
            raise ValidationError(
                f"Disk {disk['file']} of the record cannot be examined: {exc.strerror or exc}.", disk=disk["file"]
            ) from None
        disk["dev"] = st.st_dev
        disk["inode"] = st.st_ino


# --- transitions (pure) ---


def _fields(manifest: dict[str, t.Any] | None) -> dict[str, t.Any]:
    """The record part of a manifest, every key present."""
    base: dict[str, t.Any] = {key: None for key in RECORD_KEYS}
    base["disks"] = []
    if manifest:
        base.update({key: copy.deepcopy(manifest.get(key)) for key in RECORD_KEYS if key in manifest})
        if base["disks"] is None:
            base["disks"] = []
    return base


def _stamp(manifest: dict[str, t.Any], state: str, now: float, history: bool = True) -> None:
    manifest["state"] = state
    manifest["updated"] = utc_stamp(now)
    manifest["updated_epoch"] = now
    if history:
        manifest["history"].append({"state": state, "time": utc_stamp(now), "epoch": now})


def new_pending(
    vm: str, name: str, record: dict[str, t.Any], now: float, history: list[dict[str, t.Any]] | None = None
) -> dict[str, t.Any]:
    manifest: dict[str, t.Any] = {
        "format": FORMAT,
        "version": VERSION,
        "vm": vm,
        "name": name,
        "created": utc_stamp(now),
        "created_epoch": now,
        "history": copy.deepcopy(history or []),
    }
    fields = _fields(None)
    fields.update(record)
    manifest.update(fields)
    _stamp(manifest, "pending", now)
    return manifest


def plan_transition(
    current: dict[str, t.Any] | None,
    target: str,
    vm: str,
    name: str,
    record: dict[str, t.Any],
    now: float,
    identify: t.Callable[[dict[str, t.Any]], None] = identify_disks,
) -> Transition:
    """The manifest after moving current to target. record holds only the given keys (normalize_record);
    identify fills the disks' dev/inode and is called only when a record is really written."""
    what = label(vm, name)
    state = current["state"] if current else None
    if target == "pending":
        return _to_pending(current, state, vm, name, record, now, identify, what)
    if target == "open":
        return _to_open(current, state, vm, name, record, now, identify, what)
    if target == "rolled_back":
        return _to_rolled_back(current, state, vm, name, now, what)
    if target == "released":
        return _to_released(current, state, vm, name, now, what)
    raise ValidationError(f"Unknown manifest state {target!r}; use one of {', '.join(STATES)}.")


def _merged(current: dict[str, t.Any] | None, record: dict[str, t.Any], identify: t.Callable[..., None]) -> dict:
    fields = _fields(current)
    fields.update(copy.deepcopy(record))
    identify(fields)
    return fields


def _to_pending(
    current: dict[str, t.Any] | None,
    state: str | None,
    vm: str,
    name: str,
    record: dict[str, t.Any],
    now: float,
    identify: t.Callable[..., None],
    what: str,
) -> Transition:
    if current is None or state == "released":
        fields = _merged(None, record, identify)
        manifest = new_pending(vm, name, fields, now, history=current["history"] if current else None)
        again = " (the released one before it is replaced)" if current else ""
        return Transition(True, manifest, f"{what} is now pending{again}.", write=True)
    if state == "pending":
        fields = _merged(current, record, identify)
        if fields == _fields(current):
            return Transition(False, current, f"{what} is pending already, with the same record.")
        manifest = copy.deepcopy(current)
        manifest.update(fields)
        _stamp(manifest, "pending", now, history=False)
        return Transition(True, manifest, f"{what} is pending; its record was updated.", write=True)
    return Transition(False, current, f"{what} exists already (state {state}); it was left alone.")


def _to_open(
    current: dict[str, t.Any] | None,
    state: str | None,
    vm: str,
    name: str,
    record: dict[str, t.Any],
    now: float,
    identify: t.Callable[..., None],
    what: str,
) -> Transition:
    if current is None:
        raise ManifestError(
            f"VM {vm} has no pending checkpoint {name}: a checkpoint is marked open only after it was marked "
            "pending (state pending) before it was taken."
        )
    if state == "open":
        return Transition(False, current, f"{what} is open already.")
    if state == "rolled_back":
        raise ManifestError(
            f"{what} was rolled back already and cannot be opened again: release it (release role), then take a "
            "new checkpoint."
        )
    if state == "released":
        raise ManifestError(
            f"{what} was released and cannot be opened: take it again first (state pending), then mark it open."
        )
    manifest = copy.deepcopy(current)
    manifest.update(_merged(current, record, identify))
    _stamp(manifest, "open", now)
    return Transition(True, manifest, f"{what} is now open.", write=True)


def _to_rolled_back(
    current: dict[str, t.Any] | None, state: str | None, vm: str, name: str, now: float, what: str
) -> Transition:
    if current is None:
        raise ManifestError(f"VM {vm} has no checkpoint {name}: there is nothing to roll back to.")
    if state == "rolled_back":
        return Transition(False, current, f"{what} was rolled back already.")
    if state == "pending":
        raise ManifestError(_interrupted(what))
    if state == "released":
        raise ManifestError(f"{what} was released: there is nothing left to roll back to.")
    manifest = copy.deepcopy(current)
    _stamp(manifest, "rolled_back", now)
    return Transition(True, manifest, f"{what} is now marked rolled back.", write=True)


def _to_released(
    current: dict[str, t.Any] | None, state: str | None, vm: str, name: str, now: float, what: str
) -> Transition:
    if current is None:
        return Transition(False, None, f"VM {vm} has no checkpoint {name}: nothing to release.")
    if state == "released":
        return Transition(False, current, f"{what} was released already.")
    manifest = copy.deepcopy(current)
    _stamp(manifest, "released", now)
    return Transition(True, manifest, f"{what} is now released (it was {state}).", write=True)


def _interrupted(what: str) -> str:
    return (
        f"{what} was interrupted while it was being taken (state pending): run the checkpoint role again to "
        "finish it, or the release role to remove it."
    )


def diff_view(manifest: dict[str, t.Any] | None) -> dict[str, t.Any]:
    """State and record of a manifest, for --diff."""
    if manifest is None:
        return {"exists": False}
    view: dict[str, t.Any] = {"exists": True, "state": manifest["state"]}
    view.update(_fields(manifest))
    return view


def age_seconds(manifest: dict[str, t.Any] | None, now: float) -> float | None:
    if manifest is None:
        return None
    return round(max(0.0, now - float(manifest["created_epoch"])), 3)


def is_young(manifest: dict[str, t.Any] | None, now: float, keep_for_seconds: int) -> bool:
    """Whether the checkpoint was created less than keep_for_seconds ago (parse_duration gives them)."""
    return manifest is not None and now - float(manifest["created_epoch"]) < keep_for_seconds


# --- files ---


def inspect_folders(folder: str, vm: str) -> Folders:
    """Which of the manifest folder and the VM folder are missing or open to group/others; a VM folder that is a
    symlink or not a folder is refused."""
    found = Folders()
    vm_folder = os.path.join(folder, vm)
    for path in (folder, vm_folder):
        try:
            # The manifest folder itself may be a symlink an administrator set up; the VM folder may not.
            st = os.stat(path) if path == folder else os.lstat(path)
        except FileNotFoundError:
            found.missing.append(path)
            continue
        except OSError as exc:
            raise ManifestError(f"Cannot examine the manifest folder {path}: {exc.strerror or exc}.") from None
        if stat.S_ISLNK(st.st_mode):
            raise ManifestError(f"The manifest folder {path} is a symlink; refusing to follow it.", path=path)
        if not stat.S_ISDIR(st.st_mode):
            raise ManifestError(f"{path} is not a folder; it cannot hold checkpoint manifests.", path=path)
        if st.st_mode & _LOOSE_BITS:
            found.loose.append(path)
    return found


def prepare_folders(folder: str, vm: str, found: Folders) -> None:
    """Create the missing folders with mode 0700 and tighten loose ones to 0700."""
    if found.missing:
        # The parents of the manifest folder are created 0700 too: they hold nothing but manifests.
        os.makedirs(os.path.join(folder, vm), mode=0o700, exist_ok=True)
        for path in found.missing:
            os.chmod(path, 0o700)
    for path in found.loose:
        os.chmod(path, 0o700)


def read_manifest(path: str, vm: str, name: str) -> dict[str, t.Any] | None:
    """The manifest at path, None when there is none; anything unreadable is an error and stays untouched."""
    _refuse_linked_folder(os.path.dirname(path))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ManifestError(f"Manifest {path} is a symlink; refusing to follow it.", path=path) from None
        raise ManifestError(f"Cannot read manifest {path}: {exc.strerror or exc}.", path=path) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ManifestError(f"Manifest {path} is not a regular file; it was left untouched.", path=path)
        chunks = []
        size = 0
        while size <= _MAX_BYTES:
            chunk = os.read(fd, _MAX_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        raw = b"".join(chunks)
    finally:
        os.close(fd)
    return parse_manifest(raw, path, vm, name)


def _refuse_linked_folder(vm_folder: str) -> None:
    try:
        st = os.lstat(vm_folder)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ManifestError(f"Cannot examine the manifest folder {vm_folder}: {exc.strerror or exc}.") from None
    if stat.S_ISLNK(st.st_mode):
        raise ManifestError(f"The manifest folder {vm_folder} is a symlink; refusing to follow it.", path=vm_folder)


def parse_manifest(raw: bytes, path: str, vm: str, name: str) -> dict[str, t.Any]:
    untouched = "the file was left untouched"
    if len(raw) > _MAX_BYTES:
        raise ManifestError(f"Manifest {path} is larger than {_MAX_BYTES} bytes; {untouched}.", path=path)
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ManifestError(f"Manifest {path} is not valid JSON ({exc}); {untouched}.", path=path) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ManifestError(f"{path} is not a checkpoint manifest (format {FORMAT}); {untouched}.", path=path)
    version = data.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ManifestError(f"Manifest {path} has an invalid version {version!r}; {untouched}.", path=path)
    if version > VERSION:
        raise ManifestError(
            f"Manifest {path} has version {version}, newer than this collection knows ({VERSION}); "
            f"upgrade vmsnap.qemu; {untouched}.",
            path=path,
        )
    problem = _damage(data, vm, name)
    if problem:
        raise ManifestError(f"Manifest {path} is damaged: {problem}; {untouched}.", path=path)
    return data


def _damage(data: dict[str, t.Any], vm: str, name: str) -> str | None:
    if data.get("vm") != vm or data.get("name") != name:
        return f"it is for checkpoint {data.get('name')!r} of VM {data.get('vm')!r}"
    if data.get("state") not in STATES:
        return f"unknown state {data.get('state')!r}"
    epoch = data.get("created_epoch")
    if not isinstance(epoch, (int, float)) or isinstance(epoch, bool):
        return f"created_epoch is {epoch!r}"
    if not isinstance(data.get("history"), list):
        return "history is not a list"
    disks = data.get("disks")
    if disks is not None and not (isinstance(disks, list) and all(_disk_shape(disk) for disk in disks)):
        return "disks is not a list of disks with a file"
    return None


def _disk_shape(disk: t.Any) -> bool:
    return isinstance(disk, dict) and isinstance(disk.get("file"), str)


def write_manifest(path: str, manifest: dict[str, t.Any]) -> None:
    """Atomic, mode 0600; a symlink that appeared at path is replaced by the rename, never written through."""
    write_json_atomic(path, manifest)


# --- verification ---


def verify(manifest: dict[str, t.Any], read_top: ReadTop) -> list[str]:
    """Every way the files no longer match an open or rolled back checkpoint; [] when they match.

    read_top reads an image's own header and snapshot table (QemuImg.read_top, which shares QEMU's lock).
    """
    method = manifest.get("method")
    disks = manifest.get("disks") or []
    mismatches: list[str] = []
    intact = [disk["file"] for disk in disks if _check_identity(disk, mismatches)]
    if method in ("internal", "offline"):
        _check_snapshots(manifest, intact, read_top, mismatches)
    elif method == "external":
        _check_overlays(disks, read_top, mismatches)
        _check_state_file(manifest.get("state_file"), mismatches)
    else:
        mismatches.append(f"the manifest names no known method ({method!r})")
    if not disks:
        mismatches.append("the manifest lists no disks")
    return mismatches


def mismatch_message(manifest: dict[str, t.Any], mismatches: list[str]) -> str:
    return f"{label(manifest['vm'], manifest['name'])} no longer matches its files: {'; '.join(mismatches)}."


def _check_identity(disk: dict[str, t.Any], mismatches: list[str]) -> bool:
    file = disk["file"]
    try:
        st = os.stat(file)
    except FileNotFoundError:
        mismatches.append(f"{file} is missing")
        return False
    except OSError as exc:
        mismatches.append(f"{file} cannot be examined ({exc.strerror or exc})")
        return False
    changes = []
    if disk.get("dev") is not None and disk["dev"] != st.st_dev:
        changes.append(f"device {disk['dev']} -> {st.st_dev}")
    if disk.get("inode") is not None and disk["inode"] != st.st_ino:
        changes.append(f"inode {disk['inode']} -> {st.st_ino}")
    if disk.get("dev") is None or disk.get("inode") is None:
        changes.append("no device and inode recorded")
    if changes:
        mismatches.append(f"{file} was replaced ({', '.join(changes)})")
        return False
    return True


def _read(path: str, read_top: ReadTop, mismatches: list[str], what: str) -> ImageInfo | None:
    try:
        return read_top(path)
    except QemuImgError as exc:
        mismatches.append(f"{what} {path} cannot be read ({(exc.stderr or exc.msg).strip()})")
    except VmsnapError as exc:
        mismatches.append(f"{what} {path} cannot be read ({exc.msg})")
    return None


def _check_snapshots(manifest: dict[str, t.Any], files: list[str], read_top: ReadTop, mismatches: list[str]) -> None:
    snapshot = manifest.get("snapshot")
    if not snapshot:
        mismatches.append("the manifest names no internal snapshot")
        return
    with_ram = False
    for file in files:
        info = _read(file, read_top, mismatches, "disk")
        if info is None:
            continue
        found = info.snapshots_named(snapshot)
        if not found:
            mismatches.append(f"{file} has no internal snapshot {snapshot}")
        with_ram = with_ram or any(snap.vm_state_size > 0 for snap in found)
    if manifest.get("method") == "internal" and files and not with_ram:
        mismatches.append(f"no disk's snapshot {snapshot} holds the VM's RAM (vm_state_size is 0)")


def _check_overlays(disks: list[dict[str, t.Any]], read_top: ReadTop, mismatches: list[str]) -> None:
    for disk in disks:
        overlay = disk.get("overlay")
        if not overlay:
            continue
        if not os.path.exists(overlay):
            mismatches.append(f"overlay {overlay} is missing")
            continue
        info = _read(overlay, read_top, mismatches, "overlay")
        if info is None:
            continue
        top = info.top
        if top.format != "qcow2":
            mismatches.append(f"overlay {overlay} is {top.format}, not qcow2")
            continue
        backing = top.full_backing_file or top.backing_file
        if not backing:
            mismatches.append(f"overlay {overlay} has no backing file (it should be {disk['file']})")
        elif os.path.realpath(backing) != os.path.realpath(disk["file"]):
            mismatches.append(f"overlay {overlay} is based on {backing}, not on {disk['file']}")


def _check_state_file(state_file: str | None, mismatches: list[str]) -> None:
    if not state_file:
        return
    if not os.path.isfile(state_file):
        mismatches.append(f"state file {state_file} is missing")
    if not os.path.isfile(sidecar_path(state_file)):
        mismatches.append(f"the sidecar {sidecar_path(state_file)} of state file {state_file} is missing")
