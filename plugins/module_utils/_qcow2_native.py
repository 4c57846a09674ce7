# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!

"""Read-only fast path: a qcow2 image's own snapshot table and bitmaps, and QEMU's lock bytes, without qemu-img.

Starting qemu-img costs ~6 ms; reading the header and snapshot table costs ~0.1 ms. Planning a snapshot on
50 disks needs one read per disk, so this path is what keeps a many-disk task close to raw qemu-img speed
(docs/performance.md). It follows docs/interop/qcow2.txt and is only used for plain local qcow2 images that
no process holds: anything it does not fully understand (encryption, an external data file, unknown
incompatible features, odd offsets) returns None and the caller asks qemu-img instead. Writes always go
through qemu-img, which validates the image again.
"""

from __future__ import annotations

import fcntl
import os
import stat
import struct
import typing as t
from dataclasses import dataclass, replace

from ansible_collections.vmsnap.qemu.plugins.module_utils._image import Bitmap, Layer, Snapshot

QCOW2_MAGIC = b"QFI\xfb"
_HEADER_V2 = struct.Struct(">4sIQIIQIIQQIIQ")  # magic .. snapshots_offset (72 bytes)
_HEADER_V3_TAIL = struct.Struct(">QQQII")  # incompatible, compatible, autoclear features, refcount order, length
_EXT_HEADER = struct.Struct(">II")
_SNAPSHOT_HEADER = struct.Struct(">QIHHIIQII")  # 40 bytes
_BITMAPS_EXT = struct.Struct(">IIQQ")
_BITMAP_ENTRY = struct.Struct(">QIIBBHI")  # 24 bytes

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_EXTERNAL_DATA = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTENDED_L2 = 1 << 4
_INCOMPAT_UNDERSTOOD = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_COMPRESSION | INCOMPAT_EXTENDED_L2
AUTOCLEAR_BITMAPS = 1 << 0

EXT_END = 0
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_BITMAPS = 0x23852875
EXT_ENCRYPTION = 0x0537BE77
EXT_EXTERNAL_DATA = 0x44415441
_EXT_REFUSED = (EXT_ENCRYPTION, EXT_EXTERNAL_DATA)

MAX_SNAPSHOTS = 65536  # block/qcow2.h QCOW_MAX_SNAPSHOTS
MAX_BITMAPS = 65535
_MAX_TABLE_BYTES = 64 * 1024 * 1024

# QEMU's file-posix locking (block/file-posix.c): a process holding permission bit N locks byte 100+N,
# a process refusing to share permission bit N locks byte 200+N. Bit 1 is BLK_PERM_WRITE.
_LOCK_PERM_BASE = 100
_LOCK_SHARED_BASE = 200
_BLK_PERM_WRITE_BIT = 1
_FLOCK = struct.Struct("hhqqi4x")  # struct flock on 64-bit Linux


class _Unsupported(Exception):
    """The fast path does not handle this image; ask qemu-img."""


@dataclass(frozen=True)
class QemuLocks:
    writer: bool  # some process writes the image
    write_forbidden: bool  # some process uses it and does not share writes (e.g. a read-only attached VM)

    @property
    def blocks_writes(self) -> bool:
        return self.writer or self.write_forbidden


def probe_qemu_locks(path: str) -> QemuLocks | None:
    """Test QEMU's lock bytes without taking a lock; None where the probe is not available."""
    getlk = getattr(fcntl, "F_OFD_GETLK", None)
    if getlk is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return QemuLocks(
            writer=_byte_locked(fd, getlk, _LOCK_PERM_BASE + _BLK_PERM_WRITE_BIT),
            write_forbidden=_byte_locked(fd, getlk, _LOCK_SHARED_BASE + _BLK_PERM_WRITE_BIT),
        )
    except (OSError, struct.error):
        return None
    finally:
        os.close(fd)


def _byte_locked(fd: int, getlk: int, offset: int) -> bool:
    request = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, offset, 1, 0)
    answer = fcntl.fcntl(fd, getlk, request)
    return _FLOCK.unpack(answer)[0] != fcntl.F_UNLCK


def read_qcow2_layer(path: str) -> Layer | None:
    """The image's own header, snapshots and bitmaps, or None when qemu-img should be asked instead."""
    try:
        with open(path, "rb") as image:
            st = os.fstat(image.fileno())
            layer = _parse(image, path, st.st_size or _block_device_size(image))
    except (OSError, ValueError, struct.error, UnicodeDecodeError, _Unsupported):
        return None
    # Like qemu-img's "actual-size" for files: the space allocated on the host.
    return replace(layer, actual_size=st.st_blocks * 512 if stat.S_ISREG(st.st_mode) else None)


def _block_device_size(image: t.BinaryIO) -> int:
    return image.seek(0, os.SEEK_END)


def _read_at(image: t.BinaryIO, offset: int, length: int, size: int) -> bytes:
    if offset < 0 or length < 0 or offset + length > size:
        raise _Unsupported(f"range {offset}+{length} outside the file")
    image.seek(offset)
    data = image.read(length)
    if len(data) != length:
        raise _Unsupported("short read")
    return data


def _parse(image: t.BinaryIO, path: str, size: int) -> Layer:
    head = _read_at(image, 0, _HEADER_V2.size, size)
    (
        magic,
        version,
        backing_offset,
        backing_size,
        cluster_bits,
        virtual_size,
        crypt_method,
        dummy_l1_size,
        dummy_l1_offset,
        dummy_refcount_offset,
        dummy_refcount_clusters,
        nb_snapshots,
        snapshots_offset,
    ) = _HEADER_V2.unpack(head)
    if magic != QCOW2_MAGIC or version not in (2, 3) or crypt_method != 0 or not 9 <= cluster_bits <= 21:
        raise _Unsupported("not a plain qcow2 v2/v3 image")
    cluster_size = 1 << cluster_bits
    incompatible = autoclear = 0
    header_length = 72
    if version == 3:
        incompatible, dummy, autoclear, dummy_order, header_length = _HEADER_V3_TAIL.unpack(
            _read_at(image, 72, _HEADER_V3_TAIL.size, size)
        )
    if incompatible & ~_INCOMPAT_UNDERSTOOD or header_length < 72 or header_length > cluster_size:
        raise _Unsupported("unknown incompatible features or header length")
    backing_format, bitmaps_ext = _read_extensions(image, header_length, cluster_size, size)
    backing_file = None
    if backing_offset:
        backing_file = _read_at(image, backing_offset, backing_size, size).decode("utf-8")
    bitmaps: tuple[Bitmap, ...] = ()
    if bitmaps_ext is not None and autoclear & AUTOCLEAR_BITMAPS:
        bitmaps = _read_bitmaps(image, bitmaps_ext, size)
    return Layer(
        filename=path,
        format="qcow2",
        virtual_size=virtual_size,
        actual_size=None,
        cluster_size=cluster_size,
        backing_file=backing_file,
        full_backing_file=_combine(path, backing_file),
        backing_format=backing_format,
        dirty=bool(incompatible & INCOMPAT_DIRTY),
        corrupt=bool(incompatible & INCOMPAT_CORRUPT),
        snapshots=_read_snapshots(image, nb_snapshots, snapshots_offset, size),
        bitmaps=bitmaps,
    )


def _read_extensions(
    image: t.BinaryIO, offset: int, cluster_size: int, size: int
) -> tuple[str | None, tuple[int, ...] | None]:
    backing_format = None
    bitmaps_ext = None
    while offset + _EXT_HEADER.size <= cluster_size:
        ext_type, length = _EXT_HEADER.unpack(_read_at(image, offset, _EXT_HEADER.size, size))
        if ext_type == EXT_END:
            break
        if ext_type in _EXT_REFUSED:
            raise _Unsupported("encrypted image or external data file")
        data = _read_at(image, offset + _EXT_HEADER.size, length, size)
        if ext_type == EXT_BACKING_FORMAT:
            backing_format = data.decode("utf-8")
        elif ext_type == EXT_BITMAPS:
            bitmaps_ext = _BITMAPS_EXT.unpack(data[: _BITMAPS_EXT.size])
        offset += _EXT_HEADER.size + _round8(length)
    return backing_format, bitmaps_ext


def _read_snapshots(image: t.BinaryIO, count: int, offset: int, size: int) -> tuple[Snapshot, ...]:
    if count > MAX_SNAPSHOTS:
        raise _Unsupported("too many snapshots")
    snapshots = []
    for dummy in range(count):
        (
            dummy_l1_offset,
            dummy_l1_size,
            id_size,
            name_size,
            date_sec,
            date_nsec,
            vm_clock_nsec,
            vm_state_size,
            extra_size,
        ) = _SNAPSHOT_HEADER.unpack(_read_at(image, offset, _SNAPSHOT_HEADER.size, size))
        cursor = offset + _SNAPSHOT_HEADER.size
        extra = _read_at(image, cursor, extra_size, size)
        if extra_size >= 8:
            vm_state_size = struct.unpack(">Q", extra[:8])[0]
        cursor += extra_size
        snap_id = _read_at(image, cursor, id_size, size).decode("utf-8")
        name = _read_at(image, cursor + id_size, name_size, size).decode("utf-8")
        offset += _round8(cursor + id_size + name_size - offset)
        clock_sec, clock_nsec = divmod(vm_clock_nsec, 1_000_000_000)
        snapshots.append(
            Snapshot(
                id=snap_id,
                name=name,
                vm_state_size=vm_state_size,
                date_epoch=date_sec + date_nsec / 1e9,
                vm_clock=clock_sec + clock_nsec / 1e9,
            )
        )
    return tuple(snapshots)


def _read_bitmaps(image: t.BinaryIO, ext: tuple[int, ...], size: int) -> tuple[Bitmap, ...]:
    count, dummy, directory_size, directory_offset = ext
    if count > MAX_BITMAPS or directory_size > _MAX_TABLE_BYTES:
        raise _Unsupported("bitmap directory too large")
    directory = _read_at(image, directory_offset, directory_size, size)
    bitmaps = []
    cursor = 0
    for dummy in range(count):
        if cursor + _BITMAP_ENTRY.size > len(directory):
            raise _Unsupported("bitmap directory truncated")
        dummy_table, dummy_table_size, flags, dummy_type, granularity_bits, name_size, extra_size = (
            _BITMAP_ENTRY.unpack_from(directory, cursor)
        )
        name_start = cursor + _BITMAP_ENTRY.size + extra_size
        name = directory[name_start : name_start + name_size].decode("utf-8")
        names = [flag for bit, flag in ((0, "in-use"), (1, "auto")) if flags & (1 << bit)]
        bitmaps.append(Bitmap(name=name, granularity=1 << granularity_bits, flags=tuple(names)))
        cursor += _round8(_BITMAP_ENTRY.size + extra_size + name_size)
    return tuple(bitmaps)


def _combine(path: str, backing_file: str | None) -> str | None:
    if backing_file is None:
        return None
    if os.path.isabs(backing_file) or ":" in backing_file.split("/", 1)[0]:
        return backing_file
    return os.path.join(os.path.dirname(path), backing_file)


def _round8(length: int) -> int:
    return (length + 7) & ~7
