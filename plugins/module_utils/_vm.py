# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!

"""What a running VM's block layer looks like, read over QMP (query-status, query-block, jobs).

Every field is checked against the shape QEMU documents: a reply of another shape (a key missing, null, a wrong
JSON type) raises VmDescriptionError naming the command and the field, never KeyError/TypeError.
"""

from __future__ import annotations

import typing as t

from ansible_collections.vmsnap.qemu.plugins.module_utils._errors import VmsnapError
from ansible_collections.vmsnap.qemu.plugins.module_utils._image import ImageDescriptionError, parse_layer

if t.TYPE_CHECKING:
    from ansible_collections.vmsnap.qemu.plugins.module_utils._qmp import QmpClient

_MISSING = object()
_INT = (int,)
# Optional fields of query-block's dirty bitmaps and query-jobs' entries, with the JSON types QEMU gives them.
_BITMAP_FIELDS: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "count": _INT,
    "granularity": _INT,
    "recording": (bool,),
    "busy": (bool,),
    "persistent": (bool,),
    "inconsistent": (bool,),
}


class VmDescriptionError(VmsnapError):
    """QEMU answered a query with a shape this collection does not understand."""


def describe_vm(qmp: QmpClient) -> dict[str, t.Any]:
    status = _object(qmp.execute("query-status"), "query-status", "the reply")
    major, minor, micro = qmp.version
    return {
        "status": _value(status, "status", (str,), "query-status"),
        "running": _value(status, "running", (bool,), "query-status"),
        "qemu_version": f"{major}.{minor}.{micro}",
        "block_devices": [
            describe_block_device(entry)
            for entry in _list(qmp.execute("query-block"), "query-block", "the reply")
            if _object(entry, "query-block", "a device").get("inserted") is not None
        ],
        "jobs": describe_jobs(qmp),
    }


def status_or_none(qmp: QmpClient) -> str | None:
    """The VM's run status, or None when it cannot be read (used after a failure, so it must not raise)."""
    try:
        status = qmp.execute("query-status")
    except VmsnapError:
        return None
    value = status.get("status") if isinstance(status, dict) else None
    return value if isinstance(value, str) else None


def describe_block_device(entry: dict[str, t.Any]) -> dict[str, t.Any]:
    """One attached disk: its drive id, active node, chain (top first), snapshots and dirty bitmaps."""
    inserted = _object(entry.get("inserted"), "query-block", "a device's inserted")
    chain = []
    image = _optional(inserted, "image", (dict,), "query-block")
    try:
        while image:
            chain.append(parse_layer(image))
            image = _optional(image, "backing-image", (dict,), "query-block")
    except ImageDescriptionError as exc:
        raise VmDescriptionError(
            f"QEMU answered query-block with an image this collection does not understand: {exc.msg}",
            qmp_command="query-block",
        ) from None
    top = chain[0] if chain else None
    return {
        "device": _optional(entry, "device", (str,), "query-block") or None,
        "qdev": _optional(entry, "qdev", (str,), "query-block"),
        "node_name": _value(inserted, "node-name", (str,), "query-block"),
        "file": _value(inserted, "file", (str,), "query-block"),
        "format": _value(inserted, "drv", (str,), "query-block"),
        "writable": not _optional(inserted, "ro", (bool,), "query-block", False),
        "chain": [layer.summary() for layer in chain],
        "chain_depth": max(len(chain) - 1, 0),
        "snapshots": [snap.as_dict() for snap in top.snapshots] if top else [],
        "bitmaps": [
            _bitmap(bitmap) for bitmap in _list(inserted.get("dirty-bitmaps", []), "query-block", "dirty-bitmaps")
        ],
    }


def _bitmap(bitmap: t.Any) -> dict[str, t.Any]:
    fields = _object(bitmap, "query-block", "a dirty bitmap")
    for key, kinds in _BITMAP_FIELDS.items():
        _optional(fields, key, kinds, "query-block")
    return {key.replace("-", "_"): value for key, value in fields.items()}


def describe_jobs(qmp: QmpClient) -> list[dict[str, t.Any]]:
    jobs = []
    for job in _list(qmp.execute("query-jobs"), "query-jobs", "the reply"):
        fields = _object(job, "query-jobs", "a job")
        jobs.append(
            {
                "id": _value(fields, "id", (str,), "query-jobs"),
                "type": _value(fields, "type", (str,), "query-jobs"),
                "status": _value(fields, "status", (str,), "query-jobs"),
                "current_progress": _optional(fields, "current-progress", _INT, "query-jobs"),
                "total_progress": _optional(fields, "total-progress", _INT, "query-jobs"),
                "error": _optional(fields, "error", (str,), "query-jobs"),
            }
        )
    return jobs


def _object(value: t.Any, command: str, what: str) -> dict[str, t.Any]:
    if not isinstance(value, dict):
        raise VmDescriptionError(
            f"QEMU answered {command} with {what} = {value!r:.200}, which is not a JSON object; the VM's state "
            "cannot be read.",
            qmp_command=command,
        )
    return value


def _list(value: t.Any, command: str, what: str) -> list[t.Any]:
    if not isinstance(value, list):
        raise VmDescriptionError(
            f"QEMU answered {command} with {what} = {value!r:.200}, which is not a JSON list; the VM's state "
            "cannot be read.",
            qmp_command=command,
        )
    return value


def _value(fields: dict[str, t.Any], key: str, kinds: tuple[type, ...], command: str) -> t.Any:
    value = fields.get(key, _MISSING)
    if value is _MISSING:
        raise VmDescriptionError(
            f"QEMU answered {command} without the field {key!r}; the VM's state cannot be read.",
            qmp_command=command,
            qmp_field=key,
        )
    return _typed(value, key, kinds, command)


def _optional(
    fields: dict[str, t.Any], key: str, kinds: tuple[type, ...], command: str, default: t.Any = None
) -> t.Any:
    value = fields.get(key, _MISSING)
    return default if value is _MISSING else _typed(value, key, kinds, command)


def _typed(value: t.Any, key: str, kinds: tuple[type, ...], command: str) -> t.Any:
    # JSON true/false are Python ints too: only an int field accepts ints, and never a bool.
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise VmDescriptionError(
            f"QEMU answered {command} with {key} = {value!r:.200}, which is not a "
            f"{' or '.join(kind.__name__ for kind in kinds)}; the VM's state cannot be read.",
            qmp_command=command,
            qmp_field=key,
        )
    return value
