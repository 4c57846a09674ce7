# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Files the modules create in folders other users may write (issue 11 item 5), on real files with the real qemu-img:
a symlink or file planted at a name the task is about to use is never followed nor overwritten, and modes are set
explicitly. The generic helpers are tested in test_files.py; qcow2_chain's overlays and flattens in test_chain.py."""

from __future__ import annotations

import os
import stat
import subprocess
import types
import typing as t
from pathlib import Path

import pytest

from ansible_collections.vmsnap.qemu.plugins.module_utils import _backup as B
from ansible_collections.vmsnap.qemu.plugins.module_utils._backup_execute import restore, restore_temp
from ansible_collections.vmsnap.qemu.plugins.module_utils._errors import VmsnapError
from ansible_collections.vmsnap.qemu.plugins.module_utils._files import claimed
from ansible_collections.vmsnap.qemu.plugins.module_utils._live import LiveSnapshotError
from ansible_collections.vmsnap.qemu.plugins.module_utils._live_execute import _claim_overlays
from ansible_collections.vmsnap.qemu.plugins.module_utils._qemu_img import QemuImg
from ansible_collections.vmsnap.qemu.plugins.module_utils._vm_process import write_env_file
from ansible_collections.vmsnap.qemu.plugins.module_utils._vmstate import write_json_atomic as write_sidecar
from ansible_collections.vmsnap.qemu.tests.unit.plugins.module_utils.real_tools import real_qemu_img

SECRET = b"the link's target: must never change\n"


@pytest.fixture
def qemu_img() -> QemuImg:
    return real_qemu_img()


@pytest.fixture
def target(tmp_path: Path) -> Path:
    (tmp_path / "elsewhere").mkdir()
    path = tmp_path / "elsewhere" / "target"
    path.write_bytes(SECRET)
    return path


@pytest.fixture
def shared(tmp_path: Path) -> Path:
    (tmp_path / "shared").mkdir()
    return tmp_path / "shared"


def img(*args: str) -> str:
    return subprocess.run(["qemu-img", *args], check=True, capture_output=True, text=True).stdout


def image_with_data(path: Path) -> str:
    img("create", "-q", "-f", "qcow2", str(path), "1M")
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 64k", str(path)], check=True, capture_output=True)
    return str(path)


def test_qemu_img_writes_the_claimed_file_even_when_a_symlink_replaces_its_name(
    qemu_img: QemuImg, shared: Path, target: Path
) -> None:
    source = image_with_data(shared / "disk.qcow2")
    temp = shared / ".tmp-1.full.qcow2"
    with claimed(str(temp)) as name:
        os.rename(temp, shared / "moved")  # another user swaps the name for a symlink after the create
        temp.symlink_to(target)
        qemu_img.run(["convert", "-q", "-O", "qcow2", "--", source, name])
    assert target.read_bytes() == SECRET
    assert qemu_img.compare(source, str(shared / "moved"))
    assert stat.S_IMODE((shared / "moved").stat().st_mode) == 0o600


def test_claimed_refuses_a_planted_symlink(shared: Path, target: Path) -> None:
    (shared / ".tmp-1.full.qcow2").symlink_to(target)
    planted = r"\.tmp-1\.full\.qcow2 exists .*refusing to overwrite or follow it"
    with pytest.raises(VmsnapError, match=planted), claimed(str(shared / ".tmp-1.full.qcow2")):
        pass
    assert target.read_bytes() == SECRET


@pytest.mark.parametrize("restore_as", ["standalone", "chain"])
def test_restore_removes_a_symlink_at_its_temp_name_without_following_it_and_keeps_the_disks_mode(
    qemu_img: QemuImg, shared: Path, target: Path, tmp_path: Path, restore_as: str
) -> None:
    backups = tmp_path / "backups"
    backups.mkdir()
    backup = image_with_data(backups / "1.full.qcow2")
    restore_to = shared / "disk.qcow2"
    img("create", "-q", "-f", "qcow2", str(restore_to), "1M")
    os.chmod(restore_to, 0o640)
    Path(restore_temp(str(restore_to))).symlink_to(target)
    restore(qemu_img, backup, str(restore_to), restore_as, verify=True)
    assert target.read_bytes() == SECRET
    assert qemu_img.compare(backup, str(restore_to))
    assert stat.S_IMODE(restore_to.stat().st_mode) == 0o640
    assert sorted(os.listdir(shared)) == ["disk.qcow2"]


def test_a_new_restore_target_is_0600(qemu_img: QemuImg, shared: Path, tmp_path: Path) -> None:
    backup = image_with_data(tmp_path / "1.full.qcow2")
    old = os.umask(0)
    try:
        restore(qemu_img, backup, str(shared / "new.qcow2"), "standalone", verify=True)
    finally:
        os.umask(old)
    assert stat.S_IMODE((shared / "new.qcow2").stat().st_mode) == 0o600


WRITERS: dict[str, t.Callable[[str], None]] = {
    "backup index": lambda path: B.write_index(path, {"backups": []}),
    "state sidecar or manifest": lambda path: write_sidecar(path, {"a": 1}),
    "unit env file": lambda path: write_env_file(path, ["-m", "64"]),
}


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_atomic_writers_replace_a_symlink_at_their_name_never_its_target(
    shared: Path, target: Path, writer: str
) -> None:
    path = shared / "written"
    path.symlink_to(target)
    old = os.umask(0o077 if writer == "unit env file" else 0)
    try:
        WRITERS[writer](str(path))
    finally:
        os.umask(old)
    assert target.read_bytes() == SECRET
    assert not path.is_symlink() and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(shared) == ["written"]


def device(disk: Path, overlay: Path) -> t.Any:
    return types.SimpleNamespace(overlay=str(overlay), disk={"file": str(disk)}, label="disk virtio0")


def test_live_overlays_get_the_disks_mode_whatever_the_umask(shared: Path) -> None:
    disk = shared / "disk.qcow2"
    disk.write_bytes(b"")
    os.chmod(disk, 0o660)
    old = os.umask(0o077)
    try:
        claimed_files = _claim_overlays([device(disk, shared / "disk.ov.qcow2")])
    finally:
        os.umask(old)
    assert claimed_files == [str(shared / "disk.ov.qcow2")]
    assert stat.S_IMODE((shared / "disk.ov.qcow2").stat().st_mode) == 0o660


@pytest.mark.parametrize("dangling", [False, True])
def test_live_overlays_refuse_a_planted_symlink(shared: Path, target: Path, dangling: bool) -> None:
    disk = shared / "disk.qcow2"
    disk.write_bytes(b"")
    pointee = target.parent / "missing" if dangling else target
    (shared / "disk.ov.qcow2").symlink_to(pointee)
    with pytest.raises(LiveSnapshotError, match="disk.ov.qcow2 .*refusing to overwrite or follow it. No snapshot"):
        _claim_overlays([device(disk, shared / "disk.ov.qcow2")])
    assert target.read_bytes() == SECRET and not (target.parent / "missing").exists()
    assert (shared / "disk.ov.qcow2").is_symlink()
