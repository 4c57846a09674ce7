# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The chain core: pure helpers, and planning/execution on real files with the real qemu-img (hostile neighbours,
planted files and symlinks, failures after a change). The four-run pattern is in the qcow2_chain integration target."""

from __future__ import annotations

import os
import stat
import subprocess
import typing as t
from pathlib import Path

import pytest

from ansible_collections.vmsnap.qemu.plugins.module_utils import _chain, _files
from ansible_collections.vmsnap.qemu.plugins.module_utils._chain import (
    ChainRequest,
    execute_chain,
    flatten_temp_path,
    plan_chain,
    scan_dependants,
    validate_size,
)
from ansible_collections.vmsnap.qemu.plugins.module_utils._errors import ValidationError, VmsnapError
from ansible_collections.vmsnap.qemu.plugins.module_utils._qemu_img import QemuImg
from ansible_collections.vmsnap.qemu.plugins.modules import qcow2_chain
from ansible_collections.vmsnap.qemu.tests.unit.plugins.module_utils.real_tools import real_qemu_img

SECRET = b"the link's target: must never change\n"


@pytest.fixture
def qemu_img() -> QemuImg:
    return real_qemu_img()


def img(*args: str) -> str:
    return subprocess.run(["qemu-img", *args], check=True, capture_output=True, text=True).stdout


def make(path: Path, backing: Path | None = None) -> str:
    extra = ["-b", str(backing), "-F", "qcow2"] if backing else []
    img("create", "-q", "-f", "qcow2", *extra, str(path), "1M")
    return str(path)


def request(path: str, state: str, backing: str | None = None, **kwargs: t.Any) -> ChainRequest:
    return ChainRequest(
        path=path,
        state=state,
        backing=backing,
        max_depth=10,
        search_dirs=[os.path.dirname(path)],
        **kwargs,
    )


def snapshot(folder: Path) -> dict[str, bytes]:
    return {entry.name: entry.read_bytes() for entry in sorted(folder.iterdir()) if entry.is_file()}


@pytest.fixture
def target(tmp_path: Path) -> Path:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    path = elsewhere / "target"
    path.write_bytes(SECRET)
    return path


@pytest.fixture
def vms(tmp_path: Path) -> Path:
    path = tmp_path / "vms"
    path.mkdir()
    return path


@pytest.mark.parametrize("size", [None, "20G", "512M", "1073741824", "1T"])
def test_good_sizes(size) -> None:
    assert validate_size(size) == size


@pytest.mark.parametrize("size", ["", "20 G", "-1G", "1.5G", "20GB", "size", "20G;rm"])
def test_bad_sizes(size: str) -> None:
    with pytest.raises(ValidationError, match="is not a qemu-img size"):
        validate_size(size)


def test_flatten_temp_file_is_a_hidden_sibling_with_a_fixed_name() -> None:
    assert flatten_temp_path("/var/lib/vms/web02.qcow2") == "/var/lib/vms/.web02.qcow2.vmsnap-flatten.tmp"


def nul_backing_neighbour(vms: Path, base: str) -> Path:
    """An overlay on base whose stored backing name has a NUL byte in the middle (same length, header patched)."""
    neighbour = vms / "neighbour.qcow2"
    make(neighbour, Path(base))
    data = bytearray(neighbour.read_bytes())
    start = data.index(base.encode())
    data[start + len(base) - 3] = 0
    neighbour.write_bytes(bytes(data))
    return neighbour


def garbage_qcow2(vms: Path) -> Path:
    """A file with the qcow2 magic that neither the native reader nor qemu-img can read."""
    bad = vms / "damaged.qcow2"
    bad.write_bytes(b"QFI\xfb" + b"\xff" * 60)
    return bad


@pytest.mark.parametrize("neighbour", ["nul", "garbage"])
def test_absent_refuses_while_an_unreadable_neighbour_may_use_the_overlay(
    qemu_img: QemuImg, vms: Path, neighbour: str
) -> None:
    base = make(vms / "base.qcow2")
    overlay = make(vms / "overlay.qcow2", Path(base))
    odd = nul_backing_neighbour(vms, overlay) if neighbour == "nul" else garbage_qcow2(vms)
    before = snapshot(vms)
    scan = scan_dependants(qemu_img, overlay, [str(vms)])
    assert str(odd) in scan.found + scan.unreadable
    with pytest.raises(ValidationError, match=f"Refusing to delete {overlay}: .*{odd.name}.*Nothing was changed"):
        plan_chain(qemu_img, request(overlay, "absent"))
    assert snapshot(vms) == before


def test_absent_with_force_goes_on_past_unreadable_images_with_a_warning(qemu_img: QemuImg, vms: Path) -> None:
    base = make(vms / "base.qcow2")
    overlay = make(vms / "overlay.qcow2", Path(base))
    bad = garbage_qcow2(vms)
    plan = plan_chain(qemu_img, request(overlay, "absent", force=True))
    assert plan.action == "delete" and plan.unreadable == [str(bad)]
    assert any(str(bad) in warning for warning in plan.warnings)


def test_commit_refuses_while_an_unreadable_neighbour_may_use_the_backing_file(qemu_img: QemuImg, vms: Path) -> None:
    base = make(vms / "base.qcow2")
    overlay = make(vms / "overlay.qcow2", Path(base))
    bad = nul_backing_neighbour(vms, base)
    before = snapshot(vms)
    with pytest.raises(ValidationError, match=f"Refusing to commit {overlay} into {base}: .*{bad.name}"):
        plan_chain(qemu_img, request(overlay, "committed"))
    assert snapshot(vms) == before


def test_committed_on_a_missing_overlay_warns_naming_both_paths(qemu_img: QemuImg, vms: Path) -> None:
    base = make(vms / "base.qcow2")
    typo = str(vms / "overlya.qcow2")
    plan = plan_chain(qemu_img, request(typo, "committed", backing=base))
    assert not plan.changed
    assert len(plan.warnings) == 1 and typo in plan.warnings[0] and base in plan.warnings[0]


def test_present_refuses_a_dangling_symlink_at_path(qemu_img: QemuImg, vms: Path, target: Path) -> None:
    base = make(vms / "base.qcow2")
    missing = target.parent / "missing"
    (vms / "overlay.qcow2").symlink_to(missing)
    with pytest.raises(ValidationError, match="symlink to a missing file; refusing to overwrite or follow it"):
        plan_chain(qemu_img, request(str(vms / "overlay.qcow2"), "present", backing=base))
    assert not missing.exists()


@pytest.mark.parametrize("planted", ["symlink", "dangling", "file"])
def test_overlay_create_never_writes_over_or_through_a_name_planted_after_the_plan(
    qemu_img: QemuImg, vms: Path, target: Path, planted: str
) -> None:
    base = make(vms / "base.qcow2")
    overlay = vms / "overlay.qcow2"
    plan = plan_chain(qemu_img, request(str(overlay), "present", backing=base))
    assert plan.action == "create"
    if planted == "file":
        overlay.write_bytes(SECRET)
    else:
        overlay.symlink_to(target if planted == "symlink" else target.parent / "missing")
    with pytest.raises(VmsnapError, match="overlay.qcow2 exists .*refusing to overwrite or follow it"):
        execute_chain(qemu_img, plan, keep=False, compress=False, unsafe=False, verify=True)
    assert target.read_bytes() == SECRET
    assert not (target.parent / "missing").exists()
    if planted == "file":
        assert overlay.read_bytes() == SECRET
    assert sorted(os.listdir(vms)) == ["base.qcow2", "overlay.qcow2"]  # no private folder left


def test_overlay_gets_the_backing_files_mode_whatever_the_umask(qemu_img: QemuImg, vms: Path) -> None:
    base = make(vms / "base.qcow2")
    os.chmod(base, 0o660)
    overlay = str(vms / "overlay.qcow2")
    plan = plan_chain(qemu_img, request(overlay, "present", backing=base))
    old = os.umask(0o077)
    try:
        execute_chain(qemu_img, plan, keep=False, compress=False, unsafe=False, verify=True)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(overlay).st_mode) == 0o660
    assert qemu_img.info(overlay).filenames() == [overlay, base]


def test_an_overlay_on_a_read_only_golden_image_is_writable_by_its_owner(qemu_img: QemuImg, vms: Path) -> None:
    base = make(vms / "base.qcow2")
    os.chmod(base, 0o444)
    overlay = str(vms / "overlay.qcow2")
    execute_chain(
        qemu_img,
        plan_chain(qemu_img, request(overlay, "present", backing=base)),
        keep=False,
        compress=False,
        unsafe=False,
        verify=True,
    )
    assert stat.S_IMODE(os.stat(overlay).st_mode) == 0o644
    assert stat.S_IMODE(os.stat(base).st_mode) == 0o444


@pytest.mark.parametrize("leftover", ["symlink", "file", "folder"])
def test_flatten_removes_what_sits_at_its_temp_name_without_following_it(
    qemu_img: QemuImg, vms: Path, target: Path, leftover: str
) -> None:
    base = make(vms / "base.qcow2")
    overlay = make(vms / "overlay.qcow2", Path(base))
    os.chmod(overlay, 0o640)
    temp = Path(flatten_temp_path(overlay))
    if leftover == "symlink":
        temp.symlink_to(target)
    elif leftover == "file":
        temp.write_bytes(b"a killed run's partial copy")
    else:
        temp.mkdir()
        (temp / "overlay.qcow2").symlink_to(target)
    plan = plan_chain(qemu_img, request(overlay, "flattened"))
    execute_chain(qemu_img, plan, keep=False, compress=False, unsafe=False, verify=True)
    assert target.read_bytes() == SECRET
    assert qemu_img.info(overlay).filenames() == [overlay]
    assert stat.S_IMODE(os.stat(overlay).st_mode) == 0o640
    assert not os.path.lexists(temp)


def test_flatten_refuses_a_temp_folder_of_another_user(qemu_img: QemuImg, vms: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to make a folder owned by another user")
    base = make(vms / "base.qcow2")
    overlay = make(vms / "overlay.qcow2", Path(base))
    temp = Path(flatten_temp_path(overlay))
    temp.mkdir()
    os.chown(temp, 4242, 4242)
    before = snapshot(vms)
    plan = plan_chain(qemu_img, request(overlay, "flattened"))
    with pytest.raises(VmsnapError, match="belongs to another user .*nothing was changed"):
        execute_chain(qemu_img, plan, keep=False, compress=False, unsafe=False, verify=True)
    assert snapshot(vms) == before and temp.is_dir()


def test_a_failed_delete_after_a_successful_commit_reports_changed(
    qemu_img: QemuImg, vms: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = make(vms / "base.qcow2")
    overlay = make(vms / "overlay.qcow2", Path(base))
    img("create", "-q", "-f", "raw", str(vms / "ref.raw"), "1M")
    plan = plan_chain(qemu_img, request(overlay, "committed"))

    def unlink_fails(path: str) -> None:
        raise PermissionError(1, "Operation not permitted", path)

    monkeypatch.setattr(_chain.os, "unlink", unlink_fails)  # the one failure real files cannot give root
    with pytest.raises(VmsnapError, match=f"{overlay} was committed into {base}, but deleting it failed") as caught:
        execute_chain(qemu_img, plan, keep=False, compress=False, unsafe=False, verify=True)
    assert caught.value.details["changed"] is True


def test_a_failed_read_after_a_change_reports_changed(qemu_img: QemuImg, vms: Path) -> None:
    base = make(vms / "base.qcow2")
    overlay = str(vms / "overlay.qcow2")
    plan = plan_chain(qemu_img, request(overlay, "present", backing=base))
    execute_chain(qemu_img, plan, keep=False, compress=False, unsafe=False, verify=True)
    (vms / "overlay.qcow2").write_bytes(b"QFI\xfb" + b"\xff" * 60)  # what the re-read finds is unreadable
    with pytest.raises(VmsnapError, match=f"The create of {overlay} is done, but reading the chain") as caught:
        qcow2_chain._read_chain_after(qemu_img, plan, base)  # pylint: disable=protected-access
    assert caught.value.details["changed"] is True


def test_a_failed_delete_is_an_error_that_changed_nothing(
    qemu_img: QemuImg, vms: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = make(vms / "base.qcow2")
    overlay = make(vms / "overlay.qcow2", Path(base))
    plan = plan_chain(qemu_img, request(overlay, "absent"))

    def unlink_fails(path: str) -> None:
        raise PermissionError(1, "Operation not permitted", path)

    monkeypatch.setattr(_chain.os, "unlink", unlink_fails)
    with pytest.raises(VmsnapError, match=f"Cannot delete {overlay}: Operation not permitted; nothing was changed"):
        execute_chain(qemu_img, plan, keep=False, compress=False, unsafe=False, verify=True)
    assert os.path.exists(overlay)


def test_a_flatten_that_cannot_rename_leaves_the_overlay_and_no_temp_folder(
    qemu_img: QemuImg, vms: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = make(vms / "base.qcow2")
    overlay = make(vms / "overlay.qcow2", Path(base))
    before = snapshot(vms)
    plan = plan_chain(qemu_img, request(overlay, "flattened"))

    def replace_fails(source: str, dest: str, **dummy: t.Any) -> None:
        raise OSError(5, "Input/output error", dest)

    monkeypatch.setattr(_chain.os, "replace", replace_fails)
    with pytest.raises(VmsnapError, match=f"Cannot put the flattened copy of {overlay} in place: Input/output error"):
        execute_chain(qemu_img, plan, keep=False, compress=False, unsafe=False, verify=True)
    assert snapshot(vms) == before and sorted(os.listdir(vms)) == ["base.qcow2", "overlay.qcow2"]


def test_a_flatten_whose_folder_sync_fails_reports_changed(
    qemu_img: QemuImg, vms: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = make(vms / "base.qcow2")
    overlay = make(vms / "overlay.qcow2", Path(base))
    plan = plan_chain(qemu_img, request(overlay, "flattened"))

    def sync_fails(folder: str) -> None:
        raise OSError(5, "Input/output error", folder)

    monkeypatch.setattr(_chain, "fsync_folder", sync_fails)
    with pytest.raises(VmsnapError, match=f"{overlay} was flattened, but syncing its folder failed") as caught:
        execute_chain(qemu_img, plan, keep=False, compress=False, unsafe=False, verify=True)
    assert caught.value.details["changed"] is True
    assert qemu_img.info(overlay).filenames() == [overlay]


def test_an_overlay_on_a_file_system_without_hard_links_is_an_error_that_changed_nothing(
    qemu_img: QemuImg, vms: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = make(vms / "base.qcow2")
    overlay = str(vms / "overlay.qcow2")
    plan = plan_chain(qemu_img, request(overlay, "present", backing=base))

    def link_fails(source: str, dest: str, **dummy: t.Any) -> None:
        raise PermissionError(1, "Operation not permitted", dest)

    monkeypatch.setattr(_files.os, "link", link_fails)  # vfat and some FUSE file systems answer so
    with pytest.raises(VmsnapError, match=f"Cannot create the overlay {overlay}: Operation not permitted; nothing"):
        execute_chain(qemu_img, plan, keep=False, compress=False, unsafe=False, verify=True)
    assert sorted(os.listdir(vms)) == ["base.qcow2"]


def test_an_overlay_whose_folder_sync_fails_reports_changed(
    qemu_img: QemuImg, vms: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = make(vms / "base.qcow2")
    overlay = str(vms / "overlay.qcow2")
    plan = plan_chain(qemu_img, request(overlay, "present", backing=base))

    def sync_fails(folder: str) -> None:
        raise OSError(5, "Input/output error", folder)

    monkeypatch.setattr(_chain, "fsync_folder", sync_fails)
    with pytest.raises(VmsnapError, match=f"The overlay {overlay} was created, but syncing its folder") as caught:
        execute_chain(qemu_img, plan, keep=False, compress=False, unsafe=False, verify=True)
    assert caught.value.details["changed"] is True
    assert sorted(os.listdir(vms)) == ["base.qcow2", "overlay.qcow2"]


@pytest.mark.parametrize("state", ["present", "rebased"])
def test_a_state_that_needs_backing_is_refused_without_it(qemu_img: QemuImg, vms: Path, state: str) -> None:
    base = make(vms / "base.qcow2")
    overlay = make(vms / "overlay.qcow2", Path(base))
    before = {name: (vms / name).read_bytes() for name in os.listdir(vms)}
    with pytest.raises(ValidationError, match=f"^state={state} needs backing.$"):
        plan_chain(qemu_img, request(overlay, state))
    assert {name: (vms / name).read_bytes() for name in os.listdir(vms)} == before


def test_a_missing_backing_file_is_refused(qemu_img: QemuImg, vms: Path) -> None:
    overlay = str(vms / "overlay.qcow2")
    missing = str(vms / "missing.qcow2")
    with pytest.raises(ValidationError, match=f"^Backing file {missing} does not exist.$"):
        plan_chain(qemu_img, request(overlay, "present", backing=missing))
    assert os.listdir(vms) == []
