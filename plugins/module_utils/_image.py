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

from ansible_collections.vmsnap.qemu.plugins.module_utils._errors import VmsnapError


@dataclass(frozen=True)
class Snapshot:
    id: str
    name: str
    vm_state_size: int
    date_epoch: float
    vm_clock: float

    @property
    def date(self) -> str:
        # date-nsec (up to 2^32) can carry a date at the year-9999 limit past it.
        stamp = datetime.datetime.fromtimestamp(min(int(self.date_epoch), _MAX_DATE_SEC), tz=datetime.timezone.utc)
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


class ImageDescriptionError(VmsnapError, ValueError):
    """qemu-img info (or QEMU's query-block) described an image in a shape this collection does not understand."""


# The largest second datetime can show (9999-12-31T23:59:59Z).
_MAX_DATE_SEC = 253402300799
_NO_DEFAULT = object()


def parse_info(data: t.Any, in_use: bool = False) -> ImageInfo:
    """Parse the JSON of 'qemu-img info' (one object) or of '--backing-chain' (a list, top first).

    Anything but the shape qemu-img prints (a missing key, a wrong type, a negative size, a date out of range)
    raises ImageDescriptionError (a VmsnapError and a ValueError), never KeyError/TypeError/RecursionError.
    """
    documents = data if isinstance(data, list) else [data]
    if not documents or not all(isinstance(doc, dict) for doc in documents):
        raise _invalid("the JSON document", "is neither an object nor a non-empty list of objects")
    return ImageInfo(chain=tuple(parse_layer(doc) for doc in documents), in_use=in_use)


def parse_layer(doc: t.Any) -> Layer:
    """One image as qemu-img info and QMP's query-block/query-named-block-nodes ("image") describe it."""
    if not isinstance(doc, dict):
        raise _invalid("an image", "is not an object")
    specific = _field(doc, "format-specific", dict, {})
    specific_data = _field(specific, "data", dict, {})
    return Layer(
        filename=_field(doc, "filename", str),
        format=_field(doc, "format", str),
        virtual_size=_count(doc, "virtual-size"),
        actual_size=_count(doc, "actual-size", None),
        cluster_size=_count(doc, "cluster-size", None, minimum=1),
        backing_file=_field(doc, "backing-filename", str, None),
        full_backing_file=_field(doc, "full-backing-filename", str, None),
        backing_format=_field(doc, "backing-filename-format", str, None),
        dirty=_field(doc, "dirty-flag", bool, False),
        corrupt=_field(specific_data, "corrupt", bool, False),
        snapshots=tuple(parse_snapshot(snap) for snap in _field(doc, "snapshots", list, [])),
        bitmaps=tuple(_parse_bitmap(bitmap) for bitmap in _field(specific_data, "bitmaps", list, [])),
    )


def parse_snapshot(doc: t.Any) -> Snapshot:
    """One snapshot as qemu-img info and QMP query-block describe it."""
    if not isinstance(doc, dict):
        raise _invalid("a snapshot", "is not an object")
    date_sec = _count(doc, "date-sec", 0)
    if date_sec > _MAX_DATE_SEC:
        raise _invalid("a snapshot's 'date-sec'", "is beyond the year 9999")
    # qcow2 stores these in 32 and 64 bits: anything larger cannot come from QEMU (and overflows a float).
    nsecs = {key: _count(doc, key, 0) for key in ("date-nsec", "vm-clock-nsec")}
    vm_clock_sec = _count(doc, "vm-clock-sec", 0)
    for key, value in list(nsecs.items()) + [("vm-clock-sec", vm_clock_sec)]:
        if value >= 2**64:
            raise _invalid(f"a snapshot's {key!r}", "is beyond 2^64")
    return Snapshot(
        id=_field(doc, "id", str),
        name=_field(doc, "name", str),
        vm_state_size=_count(doc, "vm-state-size", 0),
        date_epoch=date_sec + nsecs["date-nsec"] / 1e9,
        vm_clock=vm_clock_sec + nsecs["vm-clock-nsec"] / 1e9,
    )


def _parse_bitmap(doc: t.Any) -> Bitmap:
    if not isinstance(doc, dict):
        raise _invalid("a bitmap", "is not an object")
    flags = _field(doc, "flags", list, [])
    if not all(isinstance(flag, str) for flag in flags):
        raise _invalid("a bitmap's 'flags'", "holds something other than strings")
    return Bitmap(name=_field(doc, "name", str), granularity=_count(doc, "granularity", 0), flags=tuple(flags))


def _field(doc: dict[str, t.Any], key: str, kind: type, default: t.Any = _NO_DEFAULT) -> t.Any:
    """doc[key] when it has the expected JSON type; default when absent or null (a required key has none)."""
    value = doc.get(key)
    if value is None:
        if default is _NO_DEFAULT:
            raise _invalid(f"the key {key!r}", "is missing")
        return default
    # bool is an int in Python, never in JSON.
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise _invalid(f"the key {key!r}", f"is a {type(value).__name__}, not a {kind.__name__}")
    return value


def _count(doc: dict[str, t.Any], key: str, default: t.Any = _NO_DEFAULT, minimum: int = 0) -> t.Any:
    value = _field(doc, key, int, default)
    if value is not None and value < minimum:
        raise _invalid(f"the key {key!r}", f"is below {minimum}")
    return value


def _invalid(what: str, problem: str) -> ImageDescriptionError:
    return ImageDescriptionError(f"Unexpected image description from qemu-img or QEMU: {what} {problem}.")


def metadata_update_reserve(layer: Layer, extra_snapshots: int = 1) -> int:
    """Free bytes an internal snapshot create/delete/apply may need to allocate in the image file.

    qcow2 copies the L1 table, rewrites the snapshot table into newly allocated clusters and may grow
    the refcount structures. qemu-img does not roll back on ENOSPC (it leaks clusters), so callers
    refuse to start when less than this is free.
    """
    cluster = layer.cluster_size if layer.cluster_size and layer.cluster_size >= 512 else 65536
    l2_entries = cluster // 8
    l1_entries = -(-layer.virtual_size // (cluster * l2_entries))
    l1_clusters = -(-(l1_entries * 8) // cluster)
    # Snapshot header: 40 fixed bytes + extra data + ID + name (<= 255 bytes), padded to 8.
    table_bytes = (len(layer.snapshots) + extra_snapshots) * (40 + 64 + 16 + 256)
    table_clusters = -(-table_bytes // cluster)
    refcount_slack_clusters = 4
    return (l1_clusters + table_clusters + refcount_slack_clusters) * cluster
