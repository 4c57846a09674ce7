# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!

"""What a running VM's block layer looks like, read over QMP (query-status, query-block, jobs)."""

from __future__ import annotations

import typing as t

from ansible_collections.vmsnap.qemu.plugins.module_utils._errors import VmsnapError
from ansible_collections.vmsnap.qemu.plugins.module_utils._image import parse_layer

if t.TYPE_CHECKING:
    from ansible_collections.vmsnap.qemu.plugins.module_utils._qmp import QmpClient


def describe_vm(qmp: QmpClient) -> dict[str, t.Any]:
    status = qmp.execute("query-status")
    major, minor, micro = qmp.version
    return {
        "status": status.get("status"),
        "running": bool(status.get("running")),
        "qemu_version": f"{major}.{minor}.{micro}",
        "block_devices": [
            describe_block_device(entry) for entry in qmp.execute("query-block") or [] if "inserted" in entry
        ],
        "jobs": describe_jobs(qmp),
    }


def status_or_none(qmp: QmpClient) -> str | None:
    """The VM's run status, or None when it cannot be read (used after a failure, so it must not raise)."""
    try:
        return str(qmp.execute("query-status").get("status"))
    except VmsnapError:
        return None


def describe_block_device(entry: dict[str, t.Any]) -> dict[str, t.Any]:
    """One attached disk: its drive id, active node, chain (top first), snapshots and dirty bitmaps."""
    inserted = entry["inserted"]
    chain = []
    image: dict[str, t.Any] | None = inserted.get("image")
    while image:
        chain.append(parse_layer(image))
        image = image.get("backing-image")
    top = chain[0] if chain else None
    return {
        "device": entry.get("device") or None,
        "qdev": entry.get("qdev"),
        "node_name": inserted.get("node-name"),
        "file": inserted.get("file"),
        "format": inserted.get("drv"),
        "writable": not inserted.get("ro", False),
        "chain": [layer.summary() for layer in chain],
        "chain_depth": max(len(chain) - 1, 0),
        "snapshots": [snap.as_dict() for snap in top.snapshots] if top else [],
        "bitmaps": [
            {key.replace("-", "_"): value for key, value in bitmap.items()}
            for bitmap in inserted.get("dirty-bitmaps") or []
        ],
    }


def describe_jobs(qmp: QmpClient) -> list[dict[str, t.Any]]:
    jobs = []
    for job in qmp.execute("query-jobs") or []:
        jobs.append(
            {
                "id": job.get("id"),
                "type": job.get("type"),
                "status": job.get("status"),
                "current_progress": job.get("current-progress"),
                "total_progress": job.get("total-progress"),
                "error": job.get("error"),
            }
        )
    return jobs
