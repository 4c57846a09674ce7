# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Hostile images: the native qcow2 reader, fed mutated real qcow2 files, declines or agrees with qemu-img.

Seed images of every kind the reader accepts (and some it declines) are made by the real qemu-img at test time.
Each case applies one to four mutations to one seed: bit flips, bytes set to boundary values, every header,
extension, snapshot-table and bitmap-directory field set to boundary values, names with NUL, invalid UTF-8 or
Unicode noncharacters, truncations and (sparse) extensions of the file. The reader runs on a copy-on-write view of
the seed, so 20,000 cases take a few seconds. For every case it must return a Layer or decline (its own
_Unsupported, nothing else), never ask for bytes past the end of the file or more than its bounds, and finish
quickly. A sample of the accepted cases is written to real files and compared with `qemu-img info`: the reader may
only accept what qemu-img opens, and must then say exactly what qemu-img says.

Seeded and reproducible: case i of seed S depends only on (S, i). `make fuzz` runs many more cases:
VMSNAP_FUZZ_CASES (default 20000), VMSNAP_FUZZ_SEED (default 11), VMSNAP_FUZZ_AGREE (accepted cases compared with
qemu-img, default 48), VMSNAP_FUZZ_CASE (replay one case number and print what it did).
"""

from __future__ import annotations

import json
import os
import random
import signal
import struct
import subprocess
import time
import tracemalloc
import typing as t
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest

from ansible_collections.vmsnap.qemu.plugins.module_utils import _qcow2_native as native
from ansible_collections.vmsnap.qemu.plugins.module_utils._image import ImageDescriptionError, Layer, parse_info

CASES = int(os.environ.get("VMSNAP_FUZZ_CASES", "20000"))
SEED = int(os.environ.get("VMSNAP_FUZZ_SEED", "11"))
AGREE = int(os.environ.get("VMSNAP_FUZZ_AGREE", "48"))
REPLAY = os.environ.get("VMSNAP_FUZZ_CASE")

# What one case may cost the reader: the header cluster (twice at most), the snapshot table, the bitmap
# directory and tables, plus one chunk of look-ahead each.
MAX_BYTES_READ = (
    2 * (1 << native.MAX_CLUSTER_BITS)
    + native._MAX_SNAPSHOT_TABLE
    + native._MAX_BITMAP_DIRECTORY
    + native._MAX_BITMAP_TABLES
    + 4 * native._TABLE_CHUNK
)
MAX_CASE_SECONDS = 5.0  # generous: the machine is shared; a real case takes well under a millisecond
MAX_PEAK_ALLOCATION = 64 * 1024 * 1024

BOUNDARY = (0, 1, 2, 7, 8, 9, 21, 22, 72, 104, 112, 255, 256, 511, 512, 1023, 1024, 4095, 4096, 65535,
            65536, 65537, 1 << 20, (1 << 21) + 1, 1 << 31, (1 << 32) - 1, 1 << 32, 1 << 62, 1 << 63,
            (1 << 64) - 1)  # fmt: skip
NAME_POISON = (b"\0", b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xef\xbf\xbe", b"\xef\xb7\x90", b"\x80", b"a\0b")


def qemu_img(*args: str) -> str:
    return subprocess.run(["qemu-img", *args], check=True, capture_output=True, text=True).stdout


# ---------------------------------------------------------------------------------------------------------------
# Seeds: real images and a map of their fields


@dataclass
class Seed:
    name: str
    data: bytes
    fields: list[tuple[int, int]] = field(default_factory=list)  # (offset, width in bytes)
    names: list[tuple[int, int]] = field(default_factory=list)  # (offset, length) of names in the file
    regions: list[tuple[int, int]] = field(default_factory=list)  # (offset, length) of metadata the reader reads
    view: Layer | None = None  # what the reader makes of the unchanged seed, named as the fuzz cases are
    extensions: dict[int, int] = field(default_factory=dict)  # type -> offset of the extension's header
    directory: int = 0  # offset of the bitmap directory
    accepted: Layer | None = None


def _u(data: bytes, offset: int, width: int) -> int:
    return int.from_bytes(data[offset : offset + width], "big")


def map_fields(name: str, data: bytes) -> Seed:
    """Where a (valid) seed keeps the fields the reader looks at, following docs/interop/qcow2.txt."""
    seed = Seed(name, data)
    version = _u(data, 4, 4)
    cluster = 1 << _u(data, 20, 4)
    seed.fields += [(0, 4), (4, 4), (8, 8), (16, 4), (20, 4), (24, 8), (32, 4), (36, 4), (40, 8), (48, 8), (56, 4),
                    (60, 4), (64, 8)]  # fmt: skip
    header_length = 72
    if version == 3:
        seed.fields += [(72, 8), (80, 8), (88, 8), (96, 4), (100, 4), (104, 1)]
        header_length = _u(data, 100, 4)
    seed.regions.append((0, min(cluster, 4096)))
    offset = header_length
    bitmaps = None
    while offset + 8 <= cluster:
        kind, length = _u(data, offset, 4), _u(data, offset + 4, 4)
        seed.fields += [(offset, 4), (offset + 4, 4)]
        seed.extensions[kind] = offset
        if kind == 0:
            break
        if kind == native.EXT_BACKING_FORMAT:
            seed.names.append((offset + 8, length))
        if kind == native.EXT_BITMAPS:
            seed.fields += [(offset + 8, 4), (offset + 12, 4), (offset + 16, 8), (offset + 24, 8)]
            bitmaps = (_u(data, offset + 8, 4), _u(data, offset + 16, 8), _u(data, offset + 24, 8))
        offset += 8 + ((length + 7) & ~7)
    backing_offset, backing_size = _u(data, 8, 8), _u(data, 16, 4)
    if backing_offset:
        seed.names.append((backing_offset, backing_size))
    count, offset = _u(data, 60, 4), _u(data, 64, 8)
    table_start = offset
    for dummy in range(count):
        seed.fields += [(offset + o, w) for o, w in ((0, 8), (8, 4), (12, 2), (14, 2), (16, 4), (20, 4), (24, 8),
                                                     (32, 4), (36, 4))]  # fmt: skip
        id_size, name_size, extra = _u(data, offset + 12, 2), _u(data, offset + 14, 2), _u(data, offset + 36, 4)
        seed.fields += [(offset + 40 + o, 8) for o in range(0, extra - 7, 8)]
        seed.names += [(offset + 40 + extra, id_size), (offset + 40 + extra + id_size, name_size)]
        offset += (40 + extra + id_size + name_size + 7) & ~7
    if count:
        seed.regions.append((table_start, offset - table_start))
    if bitmaps:
        nb, size, offset = bitmaps
        seed.directory = offset
        seed.regions.append((offset, size))
        for dummy in range(nb):
            seed.fields += [(offset + o, w) for o, w in ((0, 8), (8, 4), (12, 4), (16, 1), (17, 1), (18, 2), (20, 4))]
            table, table_size = _u(data, offset, 8), _u(data, offset + 8, 4)
            seed.fields += [(table + 8 * i, 8) for i in range(table_size)]
            name_size, extra = _u(data, offset + 18, 2), _u(data, offset + 20, 4)
            seed.names.append((offset + 24 + extra, name_size))
            offset += (24 + extra + name_size + 7) & ~7
    return seed


def _patch(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(data)


def build_seeds(folder: str) -> list[Seed]:
    """Real images of every kind the reader accepts, and some it must decline."""
    made: list[tuple[str, str]] = []

    def create(name: str, *options: str, size: str = "16M") -> str:
        path = os.path.join(folder, name)
        qemu_img("create", "-q", "-f", "qcow2", *options, path, size)
        made.append((name, path))
        return path

    create("base-image.qcow2")
    create("v2.qcow2", "-o", "compat=0.10")
    create("zstd-lazy.qcow2", "-o", "compression_type=zstd,lazy_refcounts=on")
    create("extl2.qcow2", "-o", "cluster_size=16384,extended_l2=on")
    create("small-clusters.qcow2", "-o", "cluster_size=512", size="1M")
    create("big-clusters.qcow2", "-o", "cluster_size=2M", size="64M")
    create("overlay.qcow2", "-b", "base-image.qcow2", "-F", "qcow2", "-u", size="16M")
    create("overlay-abs.qcow2", "-b", os.path.join(folder, "base-image.qcow2"), "-F", "raw", "-u", size="8M")
    for compat in ("1.1", "0.10"):
        snaps = create(f"snaps-{compat}.qcow2", "-o", f"compat={compat}")
        for name in ("first", "ünïcødé ✓", "x" * 40, "gone", "last"):
            qemu_img("snapshot", "-c", name, snaps)
        qemu_img("snapshot", "-d", "gone", snaps)
    bitmaps = create("bitmaps.qcow2", size="100M")
    qemu_img("bitmap", "--add", bitmaps, "nightly")
    qemu_img("bitmap", "--add", "-g", "1M", "--disable", bitmaps, "paused")
    everything = create("everything.qcow2", "-b", "base-image.qcow2", "-F", "qcow2", "-u", size="32M")
    qemu_img("snapshot", "-c", "pre-upgrade", everything)
    qemu_img("snapshot", "-c", "second", everything)
    qemu_img("bitmap", "--add", "-g", "512", everything, "fine")
    create("external-data.qcow2", "-o", f"data_file={os.path.join(folder, 'data.raw')}", size="1M")
    seeds = []
    for name, path in made:
        with open(path, "rb") as handle:
            seeds.append(map_fields(name, handle.read()))
    # A snapshot with a RAM state: give the first snapshot of a copy vm state sizes (32-bit field and the
    # 64-bit one in the extra data); qemu-img reports them like a savevm's.
    base = next(s for s in seeds if s.name == "snaps-1.1.qcow2")
    vmstate = bytearray(base.data)
    table = _u(vmstate, 64, 8)
    vmstate[table + 32 : table + 36] = (123456).to_bytes(4, "big")
    vmstate[table + 40 : table + 48] = (5 << 33).to_bytes(8, "big")
    seeds.append(map_fields("vmstate.qcow2", bytes(vmstate)))
    # An in-use bitmap (what a crashed QEMU leaves): its table is not checked, its flag is reported.
    base = next(s for s in seeds if s.name == "bitmaps.qcow2")
    in_use = bytearray(base.data)
    in_use[base.directory + 12 : base.directory + 16] = (3).to_bytes(4, "big")
    seeds.append(map_fields("bitmap-in-use.qcow2", bytes(in_use)))
    return seeds


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> list[Seed]:
    folder = str(tmp_path_factory.mktemp("fuzz-seeds"))
    result = build_seeds(folder)
    for seed in result:
        path = os.path.join(folder, "check-" + seed.name)
        with open(path, "wb") as handle:
            handle.write(seed.data)
        seed.accepted = native.read_qcow2_layer(path)
        try:
            seed.view = native.parse_qcow2(Mutant(seed).pread, "/fuzz/" + seed.name, len(seed.data))
        except native._Unsupported:
            seed.view = None
        if seed.accepted is not None:
            assert seed.accepted == qemu_img_view(path), seed.name
    return result


def qemu_img_view(path: str) -> Layer | None:
    """qemu-img's own view of path, or None when qemu-img refuses to open it."""
    proc = subprocess.run(
        ["qemu-img", "info", "--output=json", "-f", "qcow2", "--force-share", "--", path],
        capture_output=True,
        text=True,
        env=dict(os.environ, LANG="C", LC_ALL="C"),
        check=False,
        timeout=60,
    )
    if proc.returncode != 0:
        return None
    try:
        return parse_info(json.loads(proc.stdout)).top
    except ImageDescriptionError as exc:  # e.g. a negative vm-state-size (a uint64 >= 2^63): never equal to a Layer
        return exc.msg  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------------------
# Cases: copy-on-write views of a seed


class Mutant:
    """A seed's bytes with patches, cut or extended (zeros, like a sparse file); counts what the reader reads."""

    def __init__(self, seed: Seed) -> None:
        self.seed = seed
        self.size = len(seed.data)
        self.patches: list[tuple[int, bytes]] = []
        self.steps: list[str] = []
        self.reads = 0
        self.bytes_read = 0
        self.largest_read = 0

    def patch(self, offset: int, data: bytes) -> None:
        self.patches.append((offset, data))

    def pread(self, offset: int, length: int) -> bytes:
        assert offset >= 0 and length >= 0, (offset, length)
        assert offset + length <= self.size, f"read {offset}+{length} past the end ({self.size})"
        self.reads += 1
        self.bytes_read += length
        self.largest_read = max(self.largest_read, length)
        end = offset + length
        data = bytearray(self.seed.data[offset:end])
        if len(data) < length:
            data += bytes(length - len(data))
        for at, patch in self.patches:
            lo, hi = max(at, offset), min(at + len(patch), end)
            if lo < hi:
                data[lo - offset : hi - offset] = patch[lo - at : hi - at]
        if len(data) > length:  # a patch never grows the view
            del data[length:]
        return bytes(data)

    def materialise(self, path: str) -> None:
        with open(path, "wb") as handle:
            handle.write(self.seed.data[: self.size])
            for at, patch in self.patches:
                if at < self.size:
                    handle.seek(at)
                    handle.write(patch[: self.size - at])
            handle.truncate(self.size)


def _field_value(rng: random.Random, current: int, width: int, cluster: int) -> int:
    choice = rng.random()
    if choice < 0.5:
        value = rng.choice(BOUNDARY)
    elif choice < 0.8:
        value = current + rng.choice((-8, -1, 1, 8, cluster, -cluster, current, 512, 65536))
    else:
        value = rng.getrandbits(8 * width)
    return value % (1 << (8 * width))


def mutate(rng: random.Random, seed: Seed) -> Mutant:
    mutant = Mutant(seed)
    data = seed.data
    cluster = 1 << min(max(_u(data, 20, 4), 9), 21)
    for dummy in range(rng.choice((1, 1, 1, 2, 2, 3, 4))):
        kind = rng.random()
        if kind < 0.45 and seed.fields:
            offset, width = rng.choice(seed.fields)
            value = _field_value(rng, _u(data, offset, width), width, cluster)
            mutant.patch(offset, value.to_bytes(width, "big"))
            mutant.steps.append(f"field {offset}/{width} = {value}")
        elif kind < 0.6 and seed.names:
            offset, length = rng.choice(seed.names)
            poison = rng.choice(NAME_POISON)
            at = offset + rng.randrange(max(length, 1))
            mutant.patch(at, poison)
            mutant.steps.append(f"name at {at} <- {poison!r}")
        elif kind < 0.8:
            region_offset, region_length = rng.choice(seed.regions)
            at = region_offset + rng.randrange(max(region_length, 1))
            if rng.random() < 0.5:
                byte = data[at] if at < len(data) else 0
                value = byte ^ (1 << rng.randrange(8))
            else:
                value = rng.choice((0, 0xFF, 0x80, 0x7F, rng.randrange(256)))
            mutant.patch(at, bytes([value]))
            mutant.steps.append(f"byte {at} = {value}")
        elif kind < 0.9:
            cut = rng.choice((rng.randrange(len(data)), rng.randrange(min(len(data), 4096)), 72, 104, 112))
            mutant.size = min(mutant.size, cut)
            mutant.steps.append(f"truncate to {cut}")
        else:
            mutant.size = rng.choice((len(data) + rng.randrange(1, 1 << 16), 1 << 40, (1 << 63) - 1))
            mutant.steps.append(f"extend to {mutant.size}")
    return mutant


def case_rng(seed: int, index: int) -> random.Random:
    return random.Random(seed * 1_000_003 + index)


@dataclass
class Outcome:
    index: int
    mutant: Mutant
    layer: Layer | None


def run_case(seeds: list[Seed], index: int, trace: bool = False) -> Outcome:
    rng = case_rng(SEED, index)
    mutant = mutate(rng, rng.choice(seeds))
    started = time.monotonic()
    if trace:
        tracemalloc.start()
    try:
        layer: Layer | None = native.parse_qcow2(mutant.pread, "/fuzz/" + mutant.seed.name, mutant.size)
    except native._Unsupported:
        layer = None
    except Exception as exc:  # noqa: BLE001 - anything but the decline is the failure this test looks for
        raise AssertionError(f"case {index} (seed {SEED}, {mutant.seed.name}: {mutant.steps}) raised {exc!r}") from exc
    finally:
        if trace:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            assert peak < MAX_PEAK_ALLOCATION, f"case {index}: {peak} bytes allocated ({mutant.steps})"
    elapsed = time.monotonic() - started
    where = f"case {index} (seed {SEED}, {mutant.seed.name}: {mutant.steps})"
    assert elapsed < MAX_CASE_SECONDS, f"{where} took {elapsed:.1f} s"
    assert mutant.bytes_read <= MAX_BYTES_READ, f"{where} read {mutant.bytes_read} bytes"
    assert mutant.largest_read <= native._MAX_READ, where
    if layer is not None:
        assert len(layer.snapshots) <= native.MAX_SNAPSHOTS and len(layer.bitmaps) <= native.MAX_BITMAPS, where
        assert layer.backing_file is None or 0 < len(layer.backing_file.encode()) <= native.MAX_BACKING_NAME, where
    return Outcome(index, mutant, layer)


class _Watchdog:
    """Fails the test instead of hanging it: SIGALRM after the given seconds."""

    def __init__(self, seconds: int) -> None:
        self.seconds = seconds

    def __enter__(self) -> None:
        def expired(signum: int, frame: t.Any) -> None:
            raise AssertionError(f"the fuzz run did not finish within {self.seconds} s")

        self.previous = signal.signal(signal.SIGALRM, expired)
        signal.alarm(self.seconds)

    def __exit__(self, *exc: t.Any) -> None:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, self.previous)


# ---------------------------------------------------------------------------------------------------------------
# Tests


def test_seeds_cover_every_kind_the_reader_accepts(seeds: list[Seed]) -> None:
    accepted = {seed.name for seed in seeds if seed.accepted is not None}
    assert accepted == {seed.name for seed in seeds} - {"external-data.qcow2"}
    layers = {seed.name: seed.accepted for seed in seeds}
    assert layers["everything.qcow2"] is not None and layers["everything.qcow2"].backing_format == "qcow2"
    assert [b.flags for b in layers["bitmap-in-use.qcow2"].bitmaps] == [("in-use", "auto"), ()]  # type: ignore[union-attr]
    assert layers["vmstate.qcow2"].snapshots[0].vm_state_size == 5 << 33  # type: ignore[union-attr]


def test_fuzz_reader_declines_or_agrees_with_qemu_img(seeds: list[Seed], tmp_path) -> None:
    if REPLAY is not None:
        outcome = run_case(seeds, int(REPLAY))
        print(f"case {REPLAY}: {outcome.mutant.seed.name} {outcome.mutant.steps} -> {outcome.layer}")
        return
    accepted: list[Outcome] = []
    declined = 0
    started = time.monotonic()
    with _Watchdog(max(120, CASES // 50)):
        for index in range(CASES):
            outcome = run_case(seeds, index, trace=index % 200 == 0)
            if outcome.layer is None:
                declined += 1
            elif outcome.layer != outcome.mutant.seed.view and outcome.mutant.size < 1 << 40:
                accepted.append(outcome)
    elapsed = time.monotonic() - started
    print(f"\nfuzz: {CASES} cases in {elapsed:.1f} s ({CASES / elapsed:.0f}/s), seed {SEED}: {declined} declined, "
          f"{CASES - declined} accepted ({len(accepted)} with a view that differs from the seed's)")  # fmt: skip
    assert declined > CASES // 10 and len(accepted) > CASES // 100  # the mutations reach both outcomes

    # Agreement: accepted mutants, as real files, must be opened by qemu-img and described exactly alike.
    sample = random.Random(SEED).sample(accepted, min(AGREE, len(accepted)))
    unchanged = (run_case(seeds, i) for i in range(CASES, CASES + 4 * AGREE))
    sample += [o for o in unchanged if o.layer is not None and o.mutant.size < 1 << 40][:8]

    def compare(outcome: Outcome) -> str | None:
        path = str(tmp_path / f"case-{outcome.index}.qcow2")
        outcome.mutant.materialise(path)
        mine = native.read_qcow2_layer(path)
        theirs = qemu_img_view(path)
        os.unlink(path)
        if mine is not None and mine != theirs:
            return f"case {outcome.index} ({outcome.mutant.seed.name}: {outcome.mutant.steps}): {mine} != {theirs}"
        return None

    with ThreadPoolExecutor(max_workers=4) as pool:
        problems = [p for p in pool.map(compare, sample) if p]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("kind", ["name", "id", "bitmap", "backing", "format"])
def test_names_with_nul_or_bad_utf8_are_declined(seeds: list[Seed], kind: str) -> None:
    """QEMU cuts names at NUL and shows invalid UTF-8 as U+FFFD: the reader would name another snapshot."""
    seed = next(s for s in seeds if s.name == ("everything.qcow2" if kind != "bitmap" else "bitmaps.qcow2"))
    data = seed.data
    if kind in ("name", "id"):
        table = _u(data, 64, 8)
        extra, id_size = _u(data, table + 36, 4), _u(data, table + 12, 2)
        at = table + 40 + extra + (id_size if kind == "name" else 0)
    elif kind == "bitmap":
        at = next(offset for offset, length in seed.names if data[offset : offset + length] == b"nightly")
    elif kind == "backing":
        at = _u(data, 8, 8)
    else:
        at = next(offset for offset, length in seed.names if data[offset : offset + length] == b"qcow2")
    for poison in (b"\0", b"\xff", b"\xef\xbf\xbf"):
        mutant = Mutant(seed)
        mutant.patch(at, poison)
        with pytest.raises(native._Unsupported):
            native.parse_qcow2(mutant.pread, "/x.qcow2", mutant.size)


def test_a_sparse_file_claiming_a_700_mib_backing_name_is_declined_without_reading_it(seeds: list[Seed]) -> None:
    seed = next(s for s in seeds if s.name == "overlay.qcow2")
    mutant = Mutant(seed)
    mutant.size = 1 << 40
    mutant.patch(16, (700 << 20).to_bytes(4, "big"))
    with pytest.raises(native._Unsupported):
        native.parse_qcow2(mutant.pread, "/x.qcow2", mutant.size)
    assert mutant.bytes_read <= 1 << 16


@pytest.mark.parametrize(
    ("what", "offset", "value", "width"),
    [
        ("2^31 snapshots", 60, 1 << 31, 4),
        ("65537 snapshots", 60, 65537, 4),
        ("a 4 GiB bitmap directory", "bitmaps-size", (1 << 32), 8),
        ("2^31 bitmaps", "bitmaps-count", 1 << 31, 4),
        ("a 64 KiB snapshot name", "name-size", 65535, 2),
        ("4 GiB of snapshot extra data", "extra-size", (1 << 32) - 1, 4),
        ("a header extension of 4 GiB", "ext-length", (1 << 32) - 1, 4),
        ("an L1 table of 2^32 entries", 36, (1 << 32) - 1, 4),
        ("a refcount table of 2^32 clusters", 56, (1 << 32) - 1, 4),
    ],
)
def test_huge_claims_are_declined_without_allocating(
    seeds: list[Seed], what: str, offset: t.Any, value: int, width: int
) -> None:
    seed = next(s for s in seeds if s.name == "everything.qcow2")
    data = seed.data
    ext = seed.extensions[native.EXT_BITMAPS]
    table = _u(data, 64, 8)
    where = {
        "bitmaps-size": ext + 16,
        "bitmaps-count": ext + 8,
        "name-size": table + 14,
        "extra-size": table + 36,
        "ext-length": ext + 4,
    }.get(offset, offset)
    mutant = Mutant(seed)
    mutant.size = 1 << 40  # a sparse file: reading "the whole table" would be possible, and must not happen
    mutant.patch(where, value.to_bytes(width, "big"))
    tracemalloc.start()
    try:
        with pytest.raises(native._Unsupported):
            native.parse_qcow2(mutant.pread, "/x.qcow2", mutant.size)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, what
    assert mutant.bytes_read < 1 << 20, what


@pytest.mark.parametrize(
    ("what", "offset", "value", "width"),
    [
        ("a misaligned L1 table", 40, 0x30001, 8),
        ("a misaligned refcount table", 48, 0x10008, 8),
        ("a misaligned snapshot table", 64, 0x50010, 8),
        ("cluster bits 8", 20, 8, 4),
        ("cluster bits 22", 20, 22, 4),
        ("a header length of 96", 100, 96, 4),
        ("a header length past the cluster", 100, 65544, 4),
        ("an unknown incompatible feature", 72, 1 << 40, 8),
        ("refcount order 7", 96, 7, 4),
        ("no refcount table", 56, 0, 4),
        ("an L1 table too small for the disk", 36, 0, 4),
        ("the zstd bit without zstd", 72, 1 << 3, 8),
        ("a backing name past the cluster", 8, 65530, 8),
    ],
)
def test_headers_qemu_img_refuses_are_declined(
    seeds: list[Seed], tmp_path, what: str, offset: int, value: int, width: int
) -> None:
    """Never a plan for an image qemu-img refuses: each of these made qemu-img fail, and the reader must decline."""
    seed = next(s for s in seeds if s.name == "everything.qcow2")
    mutant = Mutant(seed)
    mutant.patch(offset, value.to_bytes(width, "big"))
    path = str(tmp_path / "bad.qcow2")
    mutant.materialise(path)
    assert qemu_img_view(path) is None, f"qemu-img opened {what}"
    assert native.read_qcow2_layer(path) is None, what


def test_a_virtual_size_in_part_sectors_is_left_to_qemu_img(seeds: list[Seed], tmp_path) -> None:
    """qemu-img shows the size rounded down to whole sectors; the reader leaves such an image to it."""
    seed = next(s for s in seeds if s.name == "everything.qcow2")
    mutant = Mutant(seed)
    mutant.patch(24, ((32 << 20) + 1).to_bytes(8, "big"))
    path = str(tmp_path / "odd-size.qcow2")
    mutant.materialise(path)
    theirs = qemu_img_view(path)
    assert theirs is not None and theirs.virtual_size == 32 << 20
    assert native.read_qcow2_layer(path) is None


def test_struct_sizes_match_the_spec() -> None:
    assert native._HEADER.size == 72 and native._HEADER_V3.size == 32
    assert native._SNAPSHOT_HEADER.size == 40 and native._BITMAP_ENTRY.size == 24 and native._BITMAPS_EXT.size == 24
    assert struct.calcsize(">Q") == 8
