# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!

"""The parsed image model built from 'qemu-img info --output=json [--backing-chain]'."""

from __future__ import annotations

import datetime
import typing as t
from dataclasses import dataclass


@dataclass(frozen=True)
class Snapshot:
    id: str
    name: str
    vm_state_size: int
    date_epoch: float
    vm_clock: float

    @property
    def date(self) -> str:
        stamp = datetime.datetime.fromtimestamp(int(self.date_epoch), tz=datetime.timezone.utc)
        return stamp.strftime("%Y-%m-%dT%H:%M:%SZ")

    def as_dict(self) -> dict[str, t.Any]:
        return {
            "id": self.id,
            "name": self.name,
            "vm_state_size": self.vm_state_size,
            "date": self.date,
            "date_epoch": self.date_epoch,
            "vm_clock": self.vm_clock,
        }


@dataclass(frozen=True)
class Bitmap:
    name: str
    granularity: int
    flags: tuple[str, ...]

    def as_dict(self) -> dict[str, t.Any]:
        return {"name": self.name, "granularity": self.granularity, "flags": list(self.flags)}


@dataclass(frozen=True)
class Layer:
    """One image file of a backing chain, as qemu-img describes it."""

    filename: str
    format: str
    virtual_size: int
    actual_size: int | None
    cluster_size: int | None
    backing_file: str | None
    full_backing_file: str | None
    backing_format: str | None
    dirty: bool
    corrupt: bool
    snapshots: tuple[Snapshot, ...] = ()
    bitmaps: tuple[Bitmap, ...] = ()

    def summary(self) -> dict[str, t.Any]:
        return {
            "filename": self.filename,
            "format": self.format,
            "virtual_size": self.virtual_size,
            "actual_size": self.actual_size,
            "backing_file": self.backing_file,
            "backing_format": self.backing_format,
        }


@dataclass(frozen=True)
class ImageInfo:
    """An image and, top first, the chain of layers below it (chain[0] is the image itself)."""

    chain: tuple[Layer, ...]
    in_use: bool = False

    @property
    def top(self) -> Layer:
        return self.chain[0]

    @property
    def snapshots(self) -> tuple[Snapshot, ...]:
        return self.top.snapshots

    def filenames(self) -> list[str]:
        """The chain's files, top first."""
        return [layer.filename for layer in self.chain]

    def snapshots_named(self, name: str) -> list[Snapshot]:
        return [snap for snap in self.top.snapshots if snap.name == name]

    def as_dict(self) -> dict[str, t.Any]:
        top = self.top
        return {
            "filename": top.filename,
            "format": top.format,
            "virtual_size": top.virtual_size,
            "actual_size": top.actual_size,
            "cluster_size": top.cluster_size,
            "dirty": top.dirty,
            "corrupt": top.corrupt,
            "backing_file": top.backing_file,
            "full_backing_file": top.full_backing_file,
            "backing_format": top.backing_format,
            "chain": [layer.summary() for layer in self.chain],
            "chain_depth": len(self.chain) - 1,
            "snapshots": [snap.as_dict() for snap in top.snapshots],
            "bitmaps": [bitmap.as_dict() for bitmap in top.bitmaps],
            "in_use": self.in_use,
        }


def parse_info(data: t.Any, in_use: bool = False) -> ImageInfo:
    """Parse the JSON of 'qemu-img info' (one object) or of '--backing-chain' (a list, top first)."""
    documents = data if isinstance(data, list) else [data]
    if not documents or not all(isinstance(doc, dict) for doc in documents):
        raise ValueError("qemu-img info JSON is neither an object nor a non-empty list of objects")
    return ImageInfo(chain=tuple(parse_layer(doc) for doc in documents), in_use=in_use)


def parse_layer(doc: dict[str, t.Any]) -> Layer:
    specific = doc.get("format-specific") or {}
    specific_data = specific.get("data") or {}
    return Layer(
        filename=str(doc["filename"]),
        format=str(doc["format"]),
        virtual_size=int(doc["virtual-size"]),
        actual_size=_optional_int(doc.get("actual-size")),
        cluster_size=_optional_int(doc.get("cluster-size")),
        backing_file=doc.get("backing-filename"),
        full_backing_file=doc.get("full-backing-filename"),
        backing_format=doc.get("backing-filename-format"),
        dirty=bool(doc.get("dirty-flag", False)),
        corrupt=bool(specific_data.get("corrupt", False)),
        snapshots=tuple(parse_snapshot(snap) for snap in doc.get("snapshots") or []),
        bitmaps=tuple(_parse_bitmap(bitmap) for bitmap in specific_data.get("bitmaps") or []),
    )


def parse_snapshot(doc: dict[str, t.Any]) -> Snapshot:
    """One snapshot as qemu-img info and QMP query-block describe it."""
    return Snapshot(
        id=str(doc["id"]),
        name=str(doc["name"]),
        vm_state_size=int(doc.get("vm-state-size", 0)),
        date_epoch=int(doc.get("date-sec", 0)) + int(doc.get("date-nsec", 0)) / 1e9,
        vm_clock=int(doc.get("vm-clock-sec", 0)) + int(doc.get("vm-clock-nsec", 0)) / 1e9,
    )


def _parse_bitmap(doc: dict[str, t.Any]) -> Bitmap:
    return Bitmap(
        name=str(doc["name"]),
        granularity=int(doc.get("granularity", 0)),
        flags=tuple(str(flag) for flag in doc.get("flags") or []),
    )


def _optional_int(value: t.Any) -> int | None:
    return None if value is None else int(value)


def metadata_update_reserve(layer: Layer, extra_snapshots: int = 1) -> int:
    """Free bytes an internal snapshot create/delete/apply may need to allocate in the image file.

    qcow2 copies the L1 table, rewrites the snapshot table into newly allocated clusters and may grow
    the refcount structures. qemu-img does not roll back on ENOSPC (it leaks clusters), so callers
    refuse to start when less than this is free.
    """
    cluster = layer.cluster_size or 65536
    l2_entries = cluster // 8
    l1_entries = -(-layer.virtual_size // (cluster * l2_entries))
    l1_clusters = -(-(l1_entries * 8) // cluster)
    # Snapshot header: 40 fixed bytes + extra data + ID + name (<= 255 bytes), padded to 8.
    table_bytes = (len(layer.snapshots) + extra_snapshots) * (40 + 64 + 16 + 256)
    table_clusters = -(-table_bytes // cluster)
    refcount_slack_clusters = 4
    return (l1_clusters + table_clusters + refcount_slack_clusters) * cluster
