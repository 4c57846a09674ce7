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

The files may come from elsewhere and this runs as root, so every length and offset read from the file is checked
against the limits QEMU itself applies when it opens the image (block/qcow2.c qcow2_do_open and
qcow2_read_extensions, block/qcow2-snapshot.c, block/qcow2-bitmap.c): whatever qemu-img would refuse is declined,
so the caller gets qemu-img's own error instead of a plan. Reads never go past the end of the file, each read and
the whole parse are bounded (a header claiming 65536 snapshots of 64 KiB names is declined before anything that
large is read) and every loop has a fixed bound.
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
_HEADER = struct.Struct(">4sIQIIQIIQQIIQ")  # magic .. snapshots_offset (72 bytes, v2 and v3)
_HEADER_V3 = struct.Struct(">QQQII")  # incompatible, compatible, autoclear features, refcount order, header length
_EXT_HEADER = struct.Struct(">II")
_SNAPSHOT_HEADER = struct.Struct(">QIHHIIQII")  # 40 bytes
_BITMAPS_EXT = struct.Struct(">IIQQ")  # 24 bytes
_BITMAP_ENTRY = struct.Struct(">QIIBBHI")  # 24 bytes
_U64 = struct.Struct(">Q")

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_EXTERNAL_DATA = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTENDED_L2 = 1 << 4
_INCOMPAT_UNDERSTOOD = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_COMPRESSION | INCOMPAT_EXTENDED_L2
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

EXT_END = 0
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_BITMAPS = 0x23852875
EXT_ENCRYPTION = 0x0537BE77
EXT_EXTERNAL_DATA = 0x44415441
_EXT_REFUSED = (EXT_ENCRYPTION, EXT_EXTERNAL_DATA)

# QEMU's own limits (block/qcow2.h, block/qcow2-bitmap.c, include/block/block_int-common.h).
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
MAX_SNAPSHOTS = 65536  # QCOW_MAX_SNAPSHOTS
MAX_SNAPSHOTS_SIZE = 1024 * MAX_SNAPSHOTS  # QCOW_MAX_SNAPSHOTS_SIZE: bytes of the whole snapshot table
MAX_SNAPSHOT_EXTRA_DATA = 1024  # QCOW_MAX_SNAPSHOT_EXTRA_DATA
MAX_REFTABLE_SIZE = 8 * 1024 * 1024  # QCOW_MAX_REFTABLE_SIZE
MAX_L1_SIZE = 32 * 1024 * 1024  # QCOW_MAX_L1_SIZE
MAX_BACKING_NAME = 1023  # backing file names longer than this are refused
MAX_BACKING_FORMAT = 15  # sizeof(bs->backing_format) - 1
MAX_BITMAPS = 65535  # QCOW2_MAX_BITMAPS
MAX_BITMAP_NAME = 1023  # BME_MAX_NAME_SIZE
MAX_BITMAP_TABLE_SIZE = 0x8000000  # BME_MAX_TABLE_SIZE (entries)
MAX_BITMAP_PHYS_SIZE = 0x20000000  # BME_MAX_PHYS_SIZE
MIN_GRANULARITY_BITS = 9
MAX_GRANULARITY_BITS = 31
_BITMAP_RESERVED_FLAGS = 0xFFFFFFFC
_BITMAP_TYPE_DIRTY_TRACKING = 1
_BITMAP_ENTRY_RESERVED = 0xFF000000000001FE
_BITMAP_ENTRY_OFFSET = 0x00FFFFFFFFFFFE00
_INT64_MAX = (1 << 63) - 1
_COMPRESSION_ZLIB = 0
_COMPRESSION_ZSTD = 1

# This reader's own bounds, stricter than QEMU's (beyond them qemu-img is asked): real images stay far below.
_MAX_VIRTUAL_SIZE = 1 << 60
_MAX_EXTENSIONS = 64
_MAX_SNAPSHOT_TABLE = 16 * 1024 * 1024
_MAX_BITMAP_DIRECTORY = 1024 * 1024
_MAX_BITMAP_TABLES = 1024 * 1024  # bytes of all bitmap tables together
_MAX_READ = 16 * 1024 * 1024
_HEAD_READ = 4096
_TABLE_CHUNK = 4096

# QEMU's file-posix locking (block/file-posix.c): a process holding permission bit N locks byte 100+N,
# a process refusing to share permission bit N locks byte 200+N. Bit 1 is BLK_PERM_WRITE.
_LOCK_PERM_BASE = 100
_LOCK_SHARED_BASE = 200
_BLK_PERM_WRITE_BIT = 1
_FLOCK = struct.Struct("hhqqi4x")  # struct flock on 64-bit Linux

# pread(offset, length) -> bytes
Pread = t.Callable[[int, int], bytes]


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
        # O_NONBLOCK: opening a FIFO planted at the name must not wait for a writer.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
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
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except (OSError, ValueError):
        return None
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            size = st.st_size
        elif stat.S_ISBLK(st.st_mode):
            size = os.lseek(fd, 0, os.SEEK_END)
        else:
            return None
        layer = parse_qcow2(lambda offset, length: os.pread(fd, length, offset), path, size)
    except (OSError, _Unsupported):
        return None
    finally:
        os.close(fd)
    # Like qemu-img's "actual-size" for files: the space allocated on the host.
    return replace(layer, actual_size=st.st_blocks * 512 if stat.S_ISREG(st.st_mode) else None)


def parse_qcow2(pread: Pread, path: str, size: int) -> Layer:
    """Parse the image behind pread (size bytes long); raises _Unsupported (only) for anything to leave to qemu-img.

    Errors that reading itself raises (OSError) pass through.
    """
    head = _Head(pread, size)
    (
        magic,
        version,
        backing_offset,
        backing_size,
        cluster_bits,
        virtual_size,
        crypt_method,
        l1_size,
        l1_offset,
        refcount_offset,
        refcount_clusters,
        nb_snapshots,
        snapshots_offset,
    ) = _HEADER.unpack(head.get(0, _HEADER.size))
    if magic != QCOW2_MAGIC or version not in (2, 3) or crypt_method != 0:
        raise _Unsupported("not a plain qcow2 v2/v3 image")
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise _Unsupported("cluster size")
    cluster_size = 1 << cluster_bits
    head.limit = cluster_size
    incompatible = autoclear = 0
    header_length = _HEADER.size
    compression = _COMPRESSION_ZLIB
    if version == 3:
        incompatible, dummy, autoclear, refcount_order, header_length = _HEADER_V3.unpack(
            head.get(_HEADER.size, _HEADER_V3.size)
        )
        if header_length < 104 or header_length % 8 or refcount_order > 6:
            raise _Unsupported("header length or refcount order")
        if header_length > 104:
            compression = head.get(104, 1)[0]
    if header_length > cluster_size or incompatible & ~_INCOMPAT_UNDERSTOOD or autoclear & AUTOCLEAR_DATA_FILE_RAW:
        raise _Unsupported("header length, unknown incompatible features or a raw external data file")
    if compression not in (_COMPRESSION_ZLIB, _COMPRESSION_ZSTD) or (compression != _COMPRESSION_ZLIB) != bool(
        incompatible & INCOMPAT_COMPRESSION
    ):
        raise _Unsupported("compression type")
    if incompatible & INCOMPAT_EXTENDED_L2 and cluster_bits < 14:
        raise _Unsupported("subclusters smaller than 512 bytes")
    _check_tables(
        cluster_bits,
        virtual_size,
        bool(incompatible & INCOMPAT_EXTENDED_L2),
        (l1_offset, l1_size, refcount_offset, refcount_clusters, snapshots_offset, nb_snapshots),
    )
    if backing_offset > cluster_size:
        raise _Unsupported("backing file offset")
    backing_format, bitmaps_ext = _read_extensions(head, header_length, backing_offset or cluster_size)
    backing_file = None
    if backing_offset:
        if not 0 < backing_size <= min(MAX_BACKING_NAME, cluster_size - backing_offset):
            raise _Unsupported("backing file name length")
        backing_file = _text(head.get(backing_offset, backing_size))
    elif backing_format is not None:
        raise _Unsupported("a backing format without a backing file")
    snapshots = _read_snapshots(pread, size, nb_snapshots, snapshots_offset)
    bitmaps: tuple[Bitmap, ...] = ()
    if bitmaps_ext is not None and autoclear & AUTOCLEAR_BITMAPS:
        bitmaps = _read_bitmaps(pread, size, bitmaps_ext, cluster_size, virtual_size)
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
        snapshots=snapshots,
        bitmaps=bitmaps,
    )


class _Head:
    """The header cluster: read once (a few KiB, more only when extensions or the backing name lie further)."""

    def __init__(self, pread: Pread, size: int) -> None:
        self._pread = pread
        self._size = size
        self.limit = _HEAD_READ
        self._data = _read(pread, 0, min(size, _HEAD_READ), size)

    def get(self, offset: int, length: int) -> bytes:
        end = offset + length
        if end > self.limit:
            raise _Unsupported("outside the header cluster")
        if end > len(self._data):
            if end > self._size:
                raise _Unsupported("header cluster past the end of the file")
            self._data = _read(self._pread, 0, min(self.limit, self._size), self._size)
        return self._data[offset:end]


def _read(pread: Pread, offset: int, length: int, size: int) -> bytes:
    if offset < 0 or length < 0 or length > _MAX_READ or offset + length > size:
        raise _Unsupported("range outside the file")
    data = pread(offset, length) if length else b""
    if len(data) != length:
        raise _Unsupported("short read")
    return data


def _check_tables(cluster_bits: int, virtual_size: int, extended_l2: bool, tables: tuple[int, ...]) -> None:
    """qemu-img refuses images whose table offsets or sizes are out of range (qcow2_validate_table)."""
    l1_offset, l1_size, refcount_offset, refcount_clusters, snapshots_offset, nb_snapshots = tables
    cluster_size = 1 << cluster_bits
    if virtual_size % 512 or virtual_size > _MAX_VIRTUAL_SIZE:
        raise _Unsupported("virtual size")
    if refcount_clusters == 0:
        raise _Unsupported("no refcount table")
    for offset, entries, entry_len, max_bytes in (
        (refcount_offset, refcount_clusters, cluster_size, MAX_REFTABLE_SIZE),
        (snapshots_offset, nb_snapshots, _SNAPSHOT_HEADER.size, _SNAPSHOT_HEADER.size * MAX_SNAPSHOTS),
        (l1_offset, l1_size, 8, MAX_L1_SIZE),
    ):
        if entries > max_bytes // entry_len or _INT64_MAX - entries * entry_len < offset or offset % cluster_size:
            raise _Unsupported("table offset or size")
    l2_bits = cluster_bits - (4 if extended_l2 else 3)
    shift = cluster_bits + l2_bits
    if l1_size < (virtual_size + (1 << shift) - 1) >> shift:
        raise _Unsupported("L1 table too small")


def _read_extensions(head: _Head, offset: int, end: int) -> tuple[str | None, tuple[int, ...] | None]:
    backing_format = None
    bitmaps_ext = None
    seen = set()
    for dummy in range(_MAX_EXTENSIONS):
        if offset >= end:
            break
        ext_type, length = _EXT_HEADER.unpack(head.get(offset, _EXT_HEADER.size))
        offset += _EXT_HEADER.size
        if offset > end or length > end - offset:
            raise _Unsupported("header extension too large")
        if ext_type == EXT_END:
            return backing_format, bitmaps_ext
        if ext_type in _EXT_REFUSED or ext_type in seen:
            raise _Unsupported("encrypted image, external data file or a repeated extension")
        seen.add(ext_type)
        if ext_type == EXT_BACKING_FORMAT:
            if not 0 < length <= MAX_BACKING_FORMAT:
                raise _Unsupported("backing format length")
            backing_format = _text(head.get(offset, length))
        elif ext_type == EXT_BITMAPS:
            if length != _BITMAPS_EXT.size:
                raise _Unsupported("bitmaps extension length")
            bitmaps_ext = _BITMAPS_EXT.unpack(head.get(offset, length))
        offset += _round8(length)
    else:
        raise _Unsupported("too many header extensions")
    return backing_format, bitmaps_ext


class _Stream:
    """Sequential reads through a table, in chunks, never past the end of the file."""

    def __init__(self, pread: Pread, size: int, offset: int) -> None:
        self._pread = pread
        self._size = size
        self._buffer = b""
        self._start = offset  # file offset of _buffer[0]
        self.offset = offset

    def take(self, length: int) -> bytes:
        skip = self.offset - self._start
        if skip + length > len(self._buffer):
            want = min(max(length, _TABLE_CHUNK), self._size - self.offset)
            self._buffer = _read(self._pread, self.offset, max(want, length), self._size)
            self._start = self.offset
            skip = 0
        self.offset += length
        return self._buffer[skip : skip + length]


def _read_snapshots(pread: Pread, size: int, count: int, offset: int) -> tuple[Snapshot, ...]:
    if count == 0:
        return ()
    if count > MAX_SNAPSHOTS:
        raise _Unsupported("too many snapshots")
    stream = _Stream(pread, size, offset)
    snapshots = []
    for dummy in range(count):
        stream.offset = offset + _round8(stream.offset - offset)
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
        ) = _SNAPSHOT_HEADER.unpack(stream.take(_SNAPSHOT_HEADER.size))
        if extra_size > MAX_SNAPSHOT_EXTRA_DATA:
            raise _Unsupported("snapshot extra data too large")
        table_length = stream.offset - offset + extra_size + id_size + name_size
        if table_length > min(MAX_SNAPSHOTS_SIZE, _MAX_SNAPSHOT_TABLE):
            raise _Unsupported("snapshot table too large")
        extra = stream.take(extra_size)
        if extra_size >= 8:
            vm_state_size = _U64.unpack_from(extra)[0]
        if vm_state_size > _INT64_MAX:
            raise _Unsupported("vm state size")
        snap_id = _text(stream.take(id_size))
        name = _text(stream.take(name_size))
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


def _read_bitmaps(
    pread: Pread, size: int, ext: tuple[int, ...], cluster_size: int, virtual_size: int
) -> tuple[Bitmap, ...]:
    count, reserved, directory_size, directory_offset = ext
    if reserved or not 0 < count <= MAX_BITMAPS or directory_offset % cluster_size:
        raise _Unsupported("bitmaps extension")
    if not 0 < directory_size <= _MAX_BITMAP_DIRECTORY:
        raise _Unsupported("bitmap directory size")
    directory = _read(pread, directory_offset, directory_size, size)
    bitmaps = []
    names = set()
    table_bytes = 0
    cursor = 0
    while cursor < directory_size:
        if len(bitmaps) == count or cursor + _BITMAP_ENTRY.size > directory_size:
            raise _Unsupported("bitmap directory does not match its header extension")
        table_offset, table_size, flags, kind, granularity_bits, name_size, extra_size = _BITMAP_ENTRY.unpack_from(
            directory, cursor
        )
        name_start = cursor + _BITMAP_ENTRY.size + extra_size
        cursor += _round8(_BITMAP_ENTRY.size + extra_size + name_size)
        if cursor > directory_size or extra_size:
            raise _Unsupported("bitmap directory entry")
        in_use = bool(flags & 1)
        _check_bitmap_entry(table_offset, table_size, flags, kind, granularity_bits, name_size, cluster_size)
        if not in_use:
            if virtual_size > (table_size * cluster_size * 8) << granularity_bits:
                raise _Unsupported("bitmap table too small for the disk")
            table_bytes += table_size * 8
            if table_bytes > _MAX_BITMAP_TABLES:
                raise _Unsupported("bitmap tables too large")
            _check_bitmap_table(pread, size, table_offset, table_size, cluster_size, granularity_bits, virtual_size)
        name = _text(directory[name_start : name_start + name_size])
        if not name or name in names:
            raise _Unsupported("empty or repeated bitmap name")
        names.add(name)
        flag_names = [flag for bit, flag in ((0, "in-use"), (1, "auto")) if flags & (1 << bit)]
        bitmaps.append(Bitmap(name=name, granularity=1 << granularity_bits, flags=tuple(flag_names)))
    if len(bitmaps) != count:
        raise _Unsupported("fewer bitmaps than the header extension says")
    return tuple(bitmaps)


def _check_bitmap_entry(
    table_offset: int, table_size: int, flags: int, kind: int, granularity_bits: int, name_size: int, cluster_size: int
) -> None:
    """block/qcow2-bitmap.c check_dir_entry()."""
    if (
        table_size == 0
        or table_offset == 0
        or table_offset % cluster_size
        or table_size > MAX_BITMAP_TABLE_SIZE
        or not MIN_GRANULARITY_BITS <= granularity_bits <= MAX_GRANULARITY_BITS
        or flags & _BITMAP_RESERVED_FLAGS
        or name_size > MAX_BITMAP_NAME
        or kind != _BITMAP_TYPE_DIRTY_TRACKING
        or table_size * cluster_size > MAX_BITMAP_PHYS_SIZE
    ):
        raise _Unsupported("bitmap directory entry")


def _check_bitmap_table(
    pread: Pread, size: int, offset: int, entries: int, cluster_size: int, granularity_bits: int, virtual_size: int
) -> None:
    """What QEMU checks when it loads a bitmap that is not in use (bitmap_table_load, load_bitmap_data)."""
    # The serialised bitmap is whole 64-bit words of bits, each bit covering one granule.
    words = ((virtual_size - 1) >> granularity_bits >> 6) + 1 if virtual_size else 0
    if entries != -(-(words * 8) // cluster_size):
        raise _Unsupported("bitmap table size")
    table = _read(pread, offset, entries * 8, size)
    for (entry,) in _U64.iter_unpack(table):
        data_offset = entry & _BITMAP_ENTRY_OFFSET
        if entry & _BITMAP_ENTRY_RESERVED or (data_offset and (entry & 1 or data_offset % cluster_size)):
            raise _Unsupported("bitmap table entry")


def _text(data: bytes) -> str:
    """A name as QEMU shows it: NUL ends a C string and qemu-img would show less, so both are left to qemu-img."""
    if b"\0" in data:
        raise _Unsupported("NUL in a name")
    if data.isascii():
        return data.decode("ascii")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise _Unsupported("a name that is not UTF-8") from None
    if any(_noncharacter(char) for char in text):
        raise _Unsupported("a Unicode noncharacter in a name")
    return text


def _noncharacter(char: str) -> bool:
    code = ord(char)
    return 0xFDD0 <= code <= 0xFDEF or code & 0xFFFE == 0xFFFE


def _combine(path: str, backing_file: str | None) -> str | None:
    if backing_file is None:
        return None
    if os.path.isabs(backing_file) or ":" in backing_file.split("/", 1)[0]:
        return backing_file
    return os.path.join(os.path.dirname(path), backing_file)


def _round8(length: int) -> int:
    return (length + 7) & ~7
