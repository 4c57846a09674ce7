# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The native qcow2 reader must agree with qemu-img on every image qemu-img makes; QEMU's locks must be seen.

These tests run the real qemu-img and qemu-system-x86_64 (make test installs them).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import tracemalloc

import pytest

from ansible_collections.vmsnap.qemu.plugins.module_utils._errors import QemuImgError
from ansible_collections.vmsnap.qemu.plugins.module_utils._image import parse_info
from ansible_collections.vmsnap.qemu.plugins.module_utils._qcow2_native import probe_qemu_locks, read_qcow2_layer
from ansible_collections.vmsnap.qemu.plugins.module_utils._qemu_img import QemuImg


def qemu_img(*args: str) -> str:
    return subprocess.run(["qemu-img", *args], check=True, capture_output=True, text=True).stdout


def qemu_img_view(path: str):
    return parse_info(json.loads(qemu_img("info", "--output=json", "--force-share", path))).top


def assert_same_as_qemu_img(path: str) -> None:
    native = read_qcow2_layer(path)
    assert native is not None, f"fast path refused {path}"
    assert native == qemu_img_view(path)


def create(path, *options: str, size: str = "16M") -> str:
    qemu_img("create", "-q", "-f", "qcow2", *options, str(path), size)
    return str(path)


def test_plain_images(tmp_path) -> None:
    assert_same_as_qemu_img(create(tmp_path / "v3.qcow2"))
    assert_same_as_qemu_img(create(tmp_path / "v2.qcow2", "-o", "compat=0.10"))
    assert_same_as_qemu_img(create(tmp_path / "extended-l2.qcow2", "-o", "cluster_size=16384,extended_l2=on"))
    assert_same_as_qemu_img(create(tmp_path / "small-clusters.qcow2", "-o", "cluster_size=512"))
    assert_same_as_qemu_img(create(tmp_path / "lazy.qcow2", "-o", "lazy_refcounts=on", size="3G"))


def test_zstd_image(tmp_path) -> None:
    image = create(tmp_path / "zstd.qcow2", "-o", "compression_type=zstd")
    assert_same_as_qemu_img(image)


@pytest.mark.parametrize("compat", ["1.1", "0.10"])
def test_snapshot_tables(tmp_path, compat: str) -> None:
    image = create(tmp_path / "snaps.qcow2", "-o", f"compat={compat}")
    names = ["first", "with space", "ünïcødé ✓", "q'uo\"te", "x" * 255, "gone", "last"]
    for name in names:
        qemu_img("snapshot", "-c", name, image)
    qemu_img("snapshot", "-d", "gone", image)
    qemu_img("snapshot", "-c", "first", image)  # a duplicate name, as plain qemu-img allows
    native = read_qcow2_layer(image)
    assert native is not None
    assert [s.name for s in native.snapshots] == [
        "first",
        "with space",
        "ünïcødé ✓",
        "q'uo\"te",
        "x" * 255,
        "last",
        "first",
    ]
    assert [s.id for s in native.snapshots] == ["1", "2", "3", "4", "5", "7", "8"]
    assert_same_as_qemu_img(image)


def test_bitmaps(tmp_path) -> None:
    image = create(tmp_path / "bitmaps.qcow2")
    qemu_img("bitmap", "--add", image, "nightly")
    qemu_img("bitmap", "--add", "-g", "1M", "--disable", image, "paused")
    native = read_qcow2_layer(image)
    assert native is not None
    assert [(b.name, b.granularity, b.flags) for b in native.bitmaps] == [
        ("nightly", 65536, ("auto",)),
        ("paused", 1048576, ()),
    ]
    assert_same_as_qemu_img(image)


def test_backing_files(tmp_path) -> None:
    base = create(tmp_path / "base.qcow2")
    relative = tmp_path / "relative.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(relative))
    absolute = tmp_path / "absolute.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", str(absolute))
    for image in (relative, absolute):
        assert_same_as_qemu_img(str(image))
    layer = read_qcow2_layer(str(relative))
    assert layer is not None
    assert (layer.backing_file, layer.full_backing_file, layer.backing_format) == ("base.qcow2", base, "qcow2")


def test_corrupt_flag_is_reported(tmp_path) -> None:
    image = create(tmp_path / "corrupt.qcow2")
    with open(image, "r+b") as handle:
        handle.seek(72 + 7)
        handle.write(b"\x02")  # incompatible feature bit 1: corrupt
    layer = read_qcow2_layer(image)
    assert layer is not None and layer.corrupt is True
    assert_same_as_qemu_img(image)


def test_vm_state_sizes_from_a_real_savevm(tmp_path) -> None:
    image = create(tmp_path / "vmstate.qcow2")
    sock = str(tmp_path / "qmp.sock")
    vm = subprocess.Popen(
        ["qemu-system-x86_64", "-accel", "kvm", "-accel", "tcg", "-m", "64", "-nodefaults", "-display", "none",
         "-S", "-drive", f"file={image},format=qcow2,if=virtio", "-qmp", f"unix:{sock},server=on,wait=off"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        qmp = _qmp_connect(sock)
        _qmp(qmp, "qmp_capabilities")
        reply = _qmp(qmp, "human-monitor-command", {"command-line": "savevm with-ram"})
        assert reply["return"] == "", reply
        _qmp(qmp, "quit")
        vm.wait(30)
    finally:
        vm.kill()
        vm.wait()
    native = read_qcow2_layer(image)
    assert native is not None and native.snapshots[0].vm_state_size > 0
    assert_same_as_qemu_img(image)


@pytest.mark.parametrize("kind", ["raw", "garbage", "truncated", "external-data", "empty"])
def test_fast_path_declines_what_it_does_not_handle(tmp_path, kind: str) -> None:
    path = tmp_path / kind
    if kind == "raw":
        qemu_img("create", "-q", "-f", "raw", str(path), "1M")
    elif kind == "garbage":
        path.write_bytes(os.urandom(4096))
    elif kind == "truncated":
        create(path)
        path.write_bytes(path.read_bytes()[:80])
    elif kind == "external-data":
        create(path, "-o", f"data_file={tmp_path / 'data.raw'}")
    else:
        path.write_bytes(b"")
    assert read_qcow2_layer(str(path)) is None


def test_unknown_incompatible_feature_is_left_to_qemu_img(tmp_path) -> None:
    image = create(tmp_path / "future.qcow2")
    with open(image, "r+b") as handle:
        handle.seek(72)
        handle.write((1 << 40).to_bytes(8, "big"))
    assert read_qcow2_layer(image) is None


@pytest.mark.parametrize(("readonly", "writer", "forbidden"), [(False, True, True), (True, False, True)])
def test_lock_probe_sees_a_running_vm(tmp_path, readonly: bool, writer: bool, forbidden: bool) -> None:
    image = create(tmp_path / "held.qcow2")
    free = probe_qemu_locks(image)
    assert free is not None and not free.blocks_writes
    drive = f"file={image},format=qcow2,if=virtio" + (",readonly=on" if readonly else "")
    vm = subprocess.Popen(
        ["qemu-system-x86_64", "-accel", "kvm", "-accel", "tcg", "-m", "64", "-nodefaults", "-display", "none",
         "-S", "-drive", drive, "-qmp", f"unix:{tmp_path / 'qmp.sock'},server=on,wait=off"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _qmp_connect(str(tmp_path / "qmp.sock")).close()  # the disks are open once QMP answers
        held = probe_qemu_locks(image)
        assert held is not None
        assert (held.writer, held.write_forbidden, held.blocks_writes) == (writer, forbidden, True)
    finally:
        vm.kill()
        vm.wait()
    after = probe_qemu_locks(image)
    assert after is not None and not after.blocks_writes


def _qmp_connect(path: str) -> socket.socket:
    deadline = time.monotonic() + 20
    while True:
        try:
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(path)
            sock.settimeout(60)
            sock.makefile().readline()  # greeting
            return sock
        except OSError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _qmp(sock: socket.socket, command: str, arguments: dict | None = None) -> dict:
    message = {"execute": command} | ({"arguments": arguments} if arguments else {})
    sock.sendall(json.dumps(message).encode() + b"\n")
    reader = sock.makefile()
    while True:
        reply = json.loads(reader.readline())
        if "event" not in reply:
            return reply


# ---------------------------------------------------------------------------------------------------------------
# Hostile images as real files (issue 11): each of these was accepted (or read whole) before the reader checked
# lengths and offsets the way QEMU does.


def _patch(path: str, offset: int, data: bytes, truncate: int | None = None) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(data)
        if truncate is not None:
            handle.truncate(truncate)


def _qemu_img_refuses(path: str) -> str:
    proc = subprocess.run(["qemu-img", "info", "--output=json", path], capture_output=True, text=True, check=False)
    assert proc.returncode != 0, proc.stdout
    return proc.stderr


def _overlay(tmp_path) -> str:
    create(tmp_path / "base.qcow2")
    path = str(tmp_path / "overlay.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", path)
    return path


def test_a_sparse_file_claiming_a_700_mib_backing_name_is_declined_without_reading_it(tmp_path) -> None:
    """Before: the reader allocated and read 700 MiB and returned it as the backing file's name."""
    path = _overlay(tmp_path)
    _patch(path, 16, (700 << 20).to_bytes(4, "big"), truncate=1 << 30)  # backing_file_size; a sparse 1 GiB file
    assert "Backing file name too long" in _qemu_img_refuses(path)
    tracemalloc.start()
    try:
        assert read_qcow2_layer(path) is None
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_a_nul_byte_in_the_backing_name_is_left_to_qemu_img(tmp_path) -> None:
    """Before: the reader returned 'base' + NUL + 'qcow2' where qemu-img (C strings) says 'base'."""
    path = _overlay(tmp_path)
    with open(path, "rb") as handle:
        backing_offset = int.from_bytes(handle.read(16)[8:16], "big")
    _patch(path, backing_offset + 4, b"\0")
    assert qemu_img_view(path).backing_file == "base"
    assert read_qcow2_layer(path) is None


@pytest.mark.parametrize(
    ("offset", "value", "width", "qemu_says"),
    [
        (40, 0x30001, 8, "Active L1 table offset invalid"),
        (64, 0x50010, 8, "Snapshot table offset invalid"),
        (48, 0x10008, 8, "Reference count table offset invalid"),
        (36, 0, 4, "L1 table is too small"),
        (20, 22, 4, "Unsupported cluster size"),
        (100, 96, 4, "qcow2 header too short"),
    ],
)
def test_no_plan_for_an_image_qemu_img_refuses(tmp_path, offset: int, value: int, width: int, qemu_says: str) -> None:
    """Before: the reader accepted these headers, so check mode planned (and reported changed) on images that
    every real run then failed to open; now the planning read is qemu-img's own, with its error."""
    path = create(tmp_path / "refused.qcow2")
    qemu_img("snapshot", "-c", "before", path)
    _patch(path, offset, value.to_bytes(width, "big"))
    assert qemu_says in _qemu_img_refuses(path)
    assert read_qcow2_layer(path) is None

    class Module:
        def get_bin_path(self, name: str, required: bool = False) -> str:
            return shutil.which(name) or name

    with pytest.raises(QemuImgError, match=qemu_says):
        QemuImg(Module()).read_top(path)


def test_a_fifo_planted_at_the_name_is_declined_without_blocking(tmp_path) -> None:
    """Before: opening a FIFO for reading waited for a writer forever."""
    fifo = str(tmp_path / "fifo.qcow2")
    os.mkfifo(fifo)

    def expired(signum, frame):
        raise AssertionError("the reader blocked on a FIFO")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(10)
    try:
        assert read_qcow2_layer(fifo) is None
        probe_qemu_locks(fifo)  # None or an answer: it must return
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_qemu_tools_are_present() -> None:
    assert shutil.which("qemu-img") and shutil.which("qemu-system-x86_64")
