# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!

"""Dirty bitmaps that stand in the way of reverting an internal snapshot: whose they are and what to say.

QEMU refuses to revert an internal snapshot (qemu-img snapshot -a, snapshot-load, -loadvm) while the image has any
dirty bitmap. The collection's own backup bitmaps (vmsnap-backup-<set>-<chain>, see _bitmap_names) may be dropped
for the revert (backup_bitmaps=drop); the set's next backup is then a full one, which qcow2_backup detects by the
missing bitmap. Bitmaps of other tools are never touched, so they always stop the revert.
"""

from __future__ import annotations

import typing as t
from dataclasses import dataclass

from ansible_collections.vmsnap.qemu.plugins.module_utils._bitmap_names import parse_bitmap_name
from ansible_collections.vmsnap.qemu.plugins.module_utils._errors import ValidationError

BACKUP_BITMAPS_CHOICES = ("fail", "drop")


class RevertBlockedError(ValidationError):
    """Dirty bitmaps keep an internal snapshot from being reverted."""


@dataclass(frozen=True)
class BlockingBitmap:
    name: str | None  # None: the unnamed bitmap of a running block job (mirror, commit)
    backup_set: str | None  # the qcow2_backup set it belongs to; None for another tool's bitmap
    busy: bool = False  # a block job uses it right now (QEMU refuses to remove it)

    @property
    def droppable(self) -> bool:
        return self.backup_set is not None and not self.busy

    def describe(self) -> str:
        if self.name is None:
            return "an unnamed bitmap belongs to a running block job (mirror or commit)"
        if self.backup_set is None:
            return f"bitmap '{self.name}' belongs to another tool (not vmsnap.qemu)"
        text = f"bitmap '{self.name}' belongs to the backup set '{self.backup_set}' of vmsnap.qemu.qcow2_backup"
        return text + (" and a backup job is using it right now" if self.busy else "")

    def as_dict(self) -> dict[str, t.Any]:
        return {"name": self.name, "set": self.backup_set}


def blocking_bitmaps(bitmaps: t.Iterable[tuple[str | None, bool]]) -> list[BlockingBitmap]:
    """Each (name, busy) of an image's or a disk's dirty bitmaps, with the backup set it belongs to."""
    found = []
    for name, busy in bitmaps:
        parsed = parse_bitmap_name(name)
        found.append(BlockingBitmap(name or None, parsed[0] if parsed else None, bool(busy)))
    return found


def backup_sets(bitmaps: t.Iterable[BlockingBitmap]) -> list[str]:
    return sorted({bitmap.backup_set for bitmap in bitmaps if bitmap.backup_set is not None})


def check_revert_bitmaps(blocked: list[tuple[str, list[BlockingBitmap]]], snapshot: str, mode: str) -> None:
    """Raise unless the revert can go ahead: no bitmaps, or (mode drop) only droppable backup bitmaps.

    blocked: (where, bitmaps) per image or disk, where as in a sentence ("image /v/a.qcow2", "disk drive0").
    """
    found = [bitmap for dummy, bitmaps in blocked for bitmap in bitmaps]
    if not found or (mode == "drop" and all(bitmap.droppable for bitmap in found)):
        return
    raise RevertBlockedError(
        refusal_message(blocked, snapshot, mode),
        bitmaps=[bitmap.name for bitmap in found],
        backup_sets=backup_sets(found),
        foreign_bitmaps=[bitmap.name for bitmap in found if bitmap.backup_set is None],
    )


def refusal_message(
    blocked: list[tuple[str, list[BlockingBitmap]]], snapshot: str, mode: str, nothing_changed: bool = True
) -> str:
    found = [bitmap for dummy, bitmaps in blocked for bitmap in bitmaps]
    parts = [
        f"Cannot revert to snapshot '{snapshot}': QEMU refuses to revert an internal snapshot while a dirty bitmap "
        "is on the image."
    ]
    parts.extend(
        f"On {where}, {'; '.join(bitmap.describe() for bitmap in bitmaps)}." for where, bitmaps in blocked if bitmaps
    )
    if nothing_changed:
        parts.append("Nothing was changed.")
    busy_sets = backup_sets(bitmap for bitmap in found if bitmap.busy)
    if busy_sets:
        parts.append(f"Wait until the backup of set {_quoted(busy_sets)} has finished, then revert.")
    if any(bitmap.backup_set is None for bitmap in found):
        if mode == "drop":
            parts.append("backup_bitmaps=drop removes only the bitmaps of vmsnap.qemu.qcow2_backup's backup sets.")
        parts.append(
            "Bitmaps of other tools are never removed by vmsnap.qemu: have their owner remove them (or remove them "
            "with qemu-img bitmap --remove offline, block-dirty-bitmap-remove live, which ends what they track), "
            "then revert."
        )
    idle_sets = backup_sets(bitmap for bitmap in found if bitmap.droppable)
    if mode != "drop" and idle_sets:
        parts.append(
            "Set backup_bitmaps=drop (in the rollback role, vmsnap_rollback_backup_bitmaps) to remove the backup "
            f"bitmaps before the revert; the next backup of set {_quoted(idle_sets)} is then a full one."
        )
    return " ".join(parts)


def drop_warning(dropped: list[tuple[str, list[BlockingBitmap]]], snapshot: str, done: bool) -> str:
    """The warning of a revert that drops backup bitmaps (done=False: in check mode, what it would drop)."""
    names = [f"'{bitmap.name}' ({where})" for where, bitmaps in dropped for bitmap in bitmaps]
    sets = backup_sets(bitmap for dummy, bitmaps in dropped for bitmap in bitmaps)
    verb = "Removed" if done else "Would remove"
    return (
        f"{verb} the backup bitmap{'s' if len(names) > 1 else ''} {', '.join(names)} to revert to snapshot "
        f"'{snapshot}' (QEMU cannot revert an internal snapshot while a dirty bitmap is on the image): the next "
        f"vmsnap.qemu.qcow2_backup run of backup set {_quoted(sets)} takes a full backup."
    )


def _quoted(names: list[str]) -> str:
    return ", ".join(f"'{name}'" for name in names)
