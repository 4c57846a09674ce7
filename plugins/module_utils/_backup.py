# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!

"""Backup sets of qcow2_backup, the pure half: names, the index, chain health, what a run does, retention plans.

A set is one folder per disk, <dest_dir>/<set>/, holding index.json (0600) and the backup files
<id>.full.qcow2 / <id>.inc.qcow2. An incremental's backing file is the previous backup of its chain, named
relative to the folder, so any backup is restorable by itself as a chain and the folder can be moved.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import stat
import time
import typing as t
from dataclasses import dataclass, field

from ansible_collections.vmsnap.qemu.plugins.module_utils._backup_qmp import BackupError
from ansible_collections.vmsnap.qemu.plugins.module_utils._bitmap_names import bitmap_name, parse_bitmap_name
from ansible_collections.vmsnap.qemu.plugins.module_utils._errors import ValidationError, VmsnapError
from ansible_collections.vmsnap.qemu.plugins.module_utils._files import write_json_atomic
from ansible_collections.vmsnap.qemu.plugins.module_utils._retention import select_keep

FORMAT = 1
INDEX_NAME = "index.json"
TMP_PREFIX = ".tmp-"
MAX_SET_NAME = 200

_SET_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_BACKUP_ID = re.compile(r"^\d{8}T\d{6}Z(?:-[1-9][0-9]*)?$")
_BACKUP_FILE = re.compile(r"^(?P<id>\d{8}T\d{6}Z(?:-[1-9][0-9]*)?)\.(?:full|inc)\.qcow2$")


class BrokenChainError(VmsnapError):
    """on_broken_chain=fail and the chain cannot take an incremental; nothing was written."""


# ---------------------------------------------------------------------------------------------------------------
# Names


def default_set_name(bottom_image: str) -> str:
    """The file stem of the chain's bottom image, with characters outside [A-Za-z0-9._-] replaced by '_'."""
    stem = os.path.basename(bottom_image)
    if "." in stem.lstrip("."):
        stem = stem[: stem.rfind(".")]
    name = _UNSAFE.sub("_", stem).strip(".") or "disk"
    return name[:MAX_SET_NAME]


def validate_set_name(name: t.Any) -> str:
    if not isinstance(name, str) or not name:
        raise ValidationError("set_name must be a non-empty string.")
    if not _SET_NAME.match(name) or name in (".", "..") or name.startswith(".") or len(name) > MAX_SET_NAME:
        raise ValidationError(
            f"set_name {name!r} is not usable: use 1 to {MAX_SET_NAME} characters of A-Z, a-z, 0-9, '.', '_' and '-', "
            "not starting with '.'."
        )
    return name


def validate_backup_id(backup_id: t.Any) -> str:
    if not isinstance(backup_id, str) or not _BACKUP_ID.match(backup_id):
        raise ValidationError(
            f"backup_id {backup_id!r} is not a backup id: ids are UTC times such as 20261201T020000Z "
            "(with -2, -3... when several were taken in one second)."
        )
    return backup_id


def new_chain_id() -> str:
    return os.urandom(4).hex()


def new_backup_id(now: float, taken: t.Collection[str]) -> str:
    base = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    candidate, number = base, 1
    while candidate in taken:
        number += 1
        candidate = f"{base}-{number}"
    return candidate


def backup_file_name(backup_id: str, mode: str) -> str:
    return f"{backup_id}.{'full' if mode == 'full' else 'inc'}.qcow2"


def temp_file_name(backup_id: str) -> str:
    return f"{TMP_PREFIX}{backup_id}.qcow2"


def iso_time(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(int(epoch), tz=datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def is_backup_file_name(name: str) -> bool:
    return bool(_BACKUP_FILE.match(name))


# ---------------------------------------------------------------------------------------------------------------
# The index


def new_index(set_name: str, source: str, virtual_size: int) -> dict[str, t.Any]:
    return {
        "format": FORMAT,
        "set": set_name,
        "source": source,
        "virtual_size": virtual_size,
        "chain": None,
        "chains": [],
        "bitmap": None,
        "pending": None,
        "backups": [],
    }


def read_index(path: str) -> dict[str, t.Any] | None:
    """The set's index, None when the set has none yet; an unreadable or foreign index is refused."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ValidationError(f"Cannot read the backup index {path}: {exc.strerror}.", index=path) from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except ValueError:
        raise ValidationError(
            f"The backup index {path} is not valid JSON; it was not written by this module or is damaged. "
            "Nothing was changed.",
            index=path,
        ) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("backups"), list):
        raise ValidationError(
            f"The backup index {path} is not a vmsnap.qemu backup index of format {FORMAT}. Nothing was changed.",
            index=path,
        )
    return data


def write_index(path: str, data: dict[str, t.Any]) -> None:
    """Atomically (0600), through a .tmp- file that the set's clean-up removes if a killed run leaves it."""
    temp = os.path.join(os.path.dirname(path), f"{TMP_PREFIX}index-{os.getpid()}-{time.monotonic_ns()}.json")
    write_json_atomic(path, data, temp=temp)


def check_dest_dir(dest_dir: t.Any) -> str:
    """dest_dir must be an absolute path of an existing folder (not created here: a typo must not fill /)."""
    if not isinstance(dest_dir, str) or not dest_dir:
        raise ValidationError("dest_dir must be a non-empty path.")
    if dest_dir.startswith("json:") or not os.path.isabs(dest_dir):
        raise ValidationError(f"dest_dir {dest_dir!r} is relative; give an absolute path.", dest_dir=dest_dir)
    try:
        mode = os.stat(dest_dir).st_mode
    except FileNotFoundError:
        raise ValidationError(
            f"dest_dir {dest_dir} does not exist; create it first (it is never created by the module).",
            dest_dir=dest_dir,
        ) from None
    except OSError as exc:
        raise ValidationError(f"dest_dir {dest_dir} cannot be read: {exc.strerror}.", dest_dir=dest_dir) from None
    if not stat.S_ISDIR(mode):
        raise ValidationError(f"dest_dir {dest_dir} is not a folder.", dest_dir=dest_dir)
    return dest_dir


def check_set_folder(folder: str) -> bool:
    """Whether the set folder exists; a symlink or a non-folder in its place is refused."""
    try:
        st = os.lstat(folder)
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise ValidationError(f"The backup set path {folder} exists but is not a folder (or is a symlink).")
    return True


def check_index_source(index: dict[str, t.Any], index_path: str, source: str) -> None:
    """Refuse a set of another disk (another bottom image), before anything is written."""
    if index.get("source") != source:
        raise ValidationError(
            f"The backup set {os.path.dirname(index_path)} belongs to another disk ({index.get('source')}), "
            f"not to {source}. Give another dest_dir or set_name. Nothing was changed.",
            index=index_path,
            set_source=index.get("source"),
        )


# ---------------------------------------------------------------------------------------------------------------
# Backups in an index


def backups_of(index: dict[str, t.Any] | None) -> list[dict[str, t.Any]]:
    return list(index.get("backups") or []) if index else []


def newest(index: dict[str, t.Any] | None) -> dict[str, t.Any] | None:
    entries = backups_of(index)
    return entries[-1] if entries else None


def find_backup(index: dict[str, t.Any] | None, backup_id: str, set_name: str) -> dict[str, t.Any]:
    for entry in backups_of(index):
        if entry["id"] == backup_id:
            return entry
    have = [entry["id"] for entry in backups_of(index)]
    raise ValidationError(
        f"Backup {backup_id} does not exist in the set {set_name}"
        + (f"; it has {', '.join(have)}." if have else "; the set has no backups.")
        + " Nothing was changed.",
        backup_id=backup_id,
        backups=have,
    )


def chain_to(index: dict[str, t.Any], backup_id: str) -> list[dict[str, t.Any]]:
    """The backups a restore of backup_id needs, base (the full) first."""
    by_id = {entry["id"]: entry for entry in backups_of(index)}
    chain: list[dict[str, t.Any]] = []
    current: str | None = backup_id
    while current is not None:
        entry = by_id.get(current)
        if entry is None or entry in chain:
            raise BackupError(
                f"The index of set {index.get('set')} is inconsistent: backup {chain[-1]['id'] if chain else backup_id}"
                f" needs {current}, which it does not list."
            )
        chain.append(entry)
        current = entry.get("parent")
    chain.reverse()
    return chain


def public_backup(entry: dict[str, t.Any] | None, folder: str) -> dict[str, t.Any] | None:
    """A backup as the module returns it (file as an absolute path)."""
    if entry is None:
        return None
    keys = ("id", "mode", "parent", "size", "changed_bytes", "seconds", "time", "full_reason", "compressed")
    result = {key: entry.get(key) for key in keys}
    result["file"] = os.path.join(folder, entry["file"])
    result["sha256"] = entry.get("sha256")
    result["verified_at"] = entry.get("verified_at")
    return result


# ---------------------------------------------------------------------------------------------------------------
# Chain health and the decision of a present run


@dataclass(frozen=True)
class BitmapView:
    """What a run needs to know of one of the disk's bitmaps (offline from qemu-img info flags, live over QMP)."""

    name: str
    recording: bool
    inconsistent: bool
    count: int | None = None


def bitmaps_from_flags(bitmaps: t.Iterable[t.Any]) -> dict[str, BitmapView]:
    """Offline: qemu-img info's bitmap flags; 'in-use' = inconsistent (a killed writer), 'auto' = recording."""
    return {
        bitmap.name: BitmapView(bitmap.name, "auto" in bitmap.flags, "in-use" in bitmap.flags) for bitmap in bitmaps
    }


def broken_chain_reason(
    index: dict[str, t.Any] | None,
    bitmaps: dict[str, BitmapView],
    folder: str,
    virtual_size: int,
    exists: t.Callable[[str], bool] = os.path.exists,
) -> str | None:
    """Why the set's chain cannot take an incremental now, or None when it can (or the set has no backup)."""
    last = newest(index)
    if index is None or last is None:
        return None
    if index.get("pending"):
        return pending_note(index) + ", so the state of the disk's bitmap is unknown"
    if int(index.get("virtual_size") or 0) != virtual_size:
        return f"the disk's virtual size changed from {index.get('virtual_size')} to {virtual_size} bytes"
    name = index.get("bitmap")
    if not name:
        return "the set records no bitmap"
    bitmap = bitmaps.get(name)
    if bitmap is None:
        return (
            f"the bitmap {name} is missing on the disk (deleted, the disk replaced, or its QEMU killed before it "
            "stored the bitmap)"
        )
    if bitmap.inconsistent:
        return f"the bitmap {name} is inconsistent (its QEMU was killed or crashed while the disk was open)"
    if not bitmap.recording:
        return f"the bitmap {name} is disabled and has not recorded every write"
    if not exists(os.path.join(folder, last["file"])):
        return f"the newest backup file {last['file']} is missing"
    return None


def pending_note(index: dict[str, t.Any]) -> str:
    pending = index.get("pending") or {}
    return f"the backup {pending.get('id')} of {pending.get('time')} was interrupted"


@dataclass
class Decision:
    action: str  # "full", "incremental" or "none"
    full_reason: str | None = None
    warning: str | None = None


def decide_present(
    index: dict[str, t.Any] | None,
    mode: str,
    broken: str | None,
    on_broken_chain: str,
    skip_unchanged: bool,
    dirty_bytes: int | None,
    set_name: str,
) -> Decision:
    """What present does for one set. dirty_bytes: the chain bitmap's count (None: not read)."""
    if newest(index) is None:
        if mode == "incremental":
            raise ValidationError(
                f"mode=incremental but the set {set_name} has no full backup yet; take one with mode=full or "
                "mode=auto first. Nothing was changed.",
                set=set_name,
            )
        return Decision("full", "the set has no backup yet")
    if broken is not None:
        if mode == "full":
            return Decision("full", f"mode=full ({broken})")
        if on_broken_chain == "fail":
            raise BrokenChainError(
                f"Set {set_name}: cannot take an incremental backup: {broken}. on_broken_chain=fail, so nothing was "
                "written; run with mode=full (or on_broken_chain=full) to start a new chain.",
                set=set_name,
                reason=broken,
            )
        return Decision(
            "full",
            broken,
            f"Set {set_name}: took a FULL backup instead of an incremental one because {broken}.",
        )
    if skip_unchanged and dirty_bytes == 0:
        return Decision("none")
    if mode == "full":
        return Decision("full", "mode=full")
    return Decision("incremental")


def known_chains(index: dict[str, t.Any] | None) -> set[str]:
    """Every chain this set has started (recorded before its bitmap is added), its backups' and its current one."""
    if not index:
        return set()
    chains = {str(chain) for chain in index.get("chains") or []}
    chains.update(str(entry["chain"]) for entry in backups_of(index) if entry.get("chain"))
    if index.get("chain"):
        chains.add(str(index["chain"]))
    return chains


def own_stale_bitmaps(
    set_name: str, names: t.Iterable[str], keep: t.Collection[str], chains: t.Collection[str]
) -> list[str]:
    """This set's bitmaps that no chain of the index uses any more (left by a killed full backup or an old chain).

    Only bitmaps of chains this set started are listed: a set of the same name in another dest_dir backs up the
    same disk with its own chains, and other sets' and other tools' bitmaps are never listed."""
    stale = []
    for name in names:
        parsed = parse_bitmap_name(name)
        if parsed is not None and parsed[0] == set_name and parsed[1] in chains and name not in keep:
            stale.append(name)
    return sorted(stale)


def remember_chain(index: dict[str, t.Any], chain: str) -> None:
    """Before a new chain's bitmap is added: a killed run's bitmap is then known as this set's (and removed)."""
    chains = [str(c) for c in index.get("chains") or []]
    if chain not in chains:
        index["chains"] = chains + [chain]


def chain_bitmap(set_name: str, chain: str) -> str:
    return bitmap_name(set_name, chain)


def record_backup(
    index: dict[str, t.Any],
    *,
    backup_id: str,
    mode: str,
    parent: str | None,
    chain: str,
    bitmap: str,
    epoch: float,
    size: int,
    changed_bytes: int,
    seconds: float,
    compressed: bool,
    sha256: str,
    verified_at: float | None,
    full_reason: str | None,
) -> dict[str, t.Any]:
    """Add a finished backup to the index (in memory), make its chain current and clear the pending record."""
    entry = {
        "id": backup_id,
        "file": backup_file_name(backup_id, mode),
        "mode": mode,
        "parent": parent,
        "chain": chain,
        "time": iso_time(epoch),
        "epoch": epoch,
        "size": size,
        "changed_bytes": changed_bytes,
        "seconds": round(seconds, 3),
        "compressed": compressed,
        "sha256": sha256,
        "verified_at": None if verified_at is None else iso_time(verified_at),
        "full_reason": full_reason,
    }
    index["backups"].append(entry)
    index["chain"] = chain
    index["bitmap"] = bitmap
    index["pending"] = None
    return entry


# ---------------------------------------------------------------------------------------------------------------
# Retention


@dataclass
class PrunePlan:
    remove: list[str] = field(default_factory=list)
    # (kept backup, its new parent or None): a kept incremental whose parent goes gets the removed data merged in
    rebase: list[tuple[str, str | None]] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.remove or self.rebase)


def plan_prune(index: dict[str, t.Any] | None, rules: t.Any, now: float) -> PrunePlan:
    """Which backups go, and which kept incrementals must absorb the data of removed ancestors.

    The period rules decide (RETENTION's select_keep, Proxmox Backup Server semantics); the newest backup is always
    kept. A removed backup that a kept one depends on is merged into its kept descendant (that descendant is rebased
    onto its nearest kept ancestor, or made standalone), so no kept backup ever loses data.
    """
    entries = backups_of(index)
    plan = PrunePlan()
    if not entries:
        return plan
    items = [(entry["id"], float(entry["epoch"])) for entry in entries]
    kept, removed = select_keep(items, rules, now, protect=[entries[-1]["id"]])
    removed_set = set(removed)
    by_id = {entry["id"]: entry for entry in entries}
    plan.kept = [entry["id"] for entry in entries if entry["id"] not in removed_set]
    plan.remove = [entry["id"] for entry in entries if entry["id"] in removed_set]
    del kept
    for entry in entries:
        if entry["id"] in removed_set:
            continue
        parent = entry.get("parent")
        new_parent = parent
        while new_parent is not None and new_parent in removed_set:
            new_parent = by_id[new_parent].get("parent")
        if new_parent != parent:
            plan.rebase.append((entry["id"], new_parent))
    return plan


def apply_prune(index: dict[str, t.Any], plan: PrunePlan) -> None:
    """The index after a prune (in memory): removed entries gone, rebased ones with their new parent."""
    new_parents = dict(plan.rebase)
    remaining = []
    for entry in index["backups"]:
        if entry["id"] in plan.remove:
            continue
        if entry["id"] in new_parents:
            entry["parent"] = new_parents[entry["id"]]
            if entry["parent"] is None:
                entry["mode"] = "full"
        remaining.append(entry)
    index["backups"] = remaining


def unrecorded_backup_files(folder: str, index: dict[str, t.Any] | None) -> list[str]:
    """Backup-named files of the set folder that the index does not list (a prune or backup killed midway)."""
    recorded = {entry["file"] for entry in backups_of(index)}
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    return sorted(name for name in names if is_backup_file_name(name) and name not in recorded)


def leftover_temp_files(folder: str) -> list[str]:
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    return sorted(name for name in names if name.startswith(TMP_PREFIX))
