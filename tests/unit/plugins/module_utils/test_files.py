# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Files the collection creates: exclusive create, explicit modes, planted files and symlinks never followed."""

from __future__ import annotations

import os
import stat
import typing as t
from pathlib import Path

import pytest

from ansible_collections.vmsnap.qemu.plugins.module_utils import _files
from ansible_collections.vmsnap.qemu.plugins.module_utils._errors import VmsnapError
from ansible_collections.vmsnap.qemu.plugins.module_utils._files import (
    PrivateFolder,
    create_exclusive,
    write_bytes_atomic,
    write_json_atomic,
)

SECRET = b"the link's target: must never change\n"


@pytest.fixture
def target(tmp_path: Path) -> Path:
    """A file elsewhere that planted symlinks point to."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    path = elsewhere / "target"
    path.write_bytes(SECRET)
    os.chmod(path, 0o644)
    return path


@pytest.fixture
def shared(tmp_path: Path) -> Path:
    path = tmp_path / "shared"
    path.mkdir()
    return path


@pytest.fixture
def tight_umask() -> t.Iterator[None]:
    old = os.umask(0o277)
    yield
    os.umask(old)


def unchanged(target: Path) -> bool:
    return target.read_bytes() == SECRET and stat.S_IMODE(target.stat().st_mode) == 0o644


def test_create_exclusive_sets_the_mode_whatever_the_umask(shared: Path, tight_umask: None) -> None:
    fd = create_exclusive(str(shared / "new"), 0o640)
    os.close(fd)
    assert stat.S_IMODE((shared / "new").stat().st_mode) == 0o640


@pytest.mark.parametrize("dangling", [False, True])
def test_create_exclusive_refuses_a_planted_symlink(shared: Path, target: Path, dangling: bool) -> None:
    pointee = target.parent / "missing" if dangling else target
    (shared / "new").symlink_to(pointee)
    with pytest.raises(VmsnapError, match="new exists .*refusing to overwrite or follow it; nothing was changed"):
        create_exclusive(str(shared / "new"))
    assert unchanged(target)
    assert not (target.parent / "missing").exists()
    assert os.readlink(shared / "new") == str(pointee)


def test_create_exclusive_refuses_a_planted_file(shared: Path) -> None:
    (shared / "new").write_bytes(SECRET)
    with pytest.raises(VmsnapError, match="refusing to overwrite or follow it; nothing was changed"):
        create_exclusive(str(shared / "new"))
    assert (shared / "new").read_bytes() == SECRET


def test_atomic_write_refuses_a_symlink_planted_at_its_temp_name(shared: Path, target: Path) -> None:
    (shared / ".tmp-index").symlink_to(target)
    with pytest.raises(VmsnapError, match=r"\.tmp-index exists .*nothing was changed"):
        write_json_atomic(str(shared / "index.json"), {"a": 1}, temp=str(shared / ".tmp-index"))
    assert unchanged(target)
    assert not (shared / "index.json").exists()
    assert (shared / ".tmp-index").is_symlink()  # not ours: left alone


def test_atomic_write_replaces_a_symlink_at_the_final_name_never_its_target(
    shared: Path, target: Path, tight_umask: None
) -> None:
    (shared / "index.json").symlink_to(target)
    write_bytes_atomic(str(shared / "index.json"), b"{}\n", temp=str(shared / ".tmp-index"))
    assert unchanged(target)
    assert not (shared / "index.json").is_symlink()
    assert (shared / "index.json").read_bytes() == b"{}\n"
    assert stat.S_IMODE((shared / "index.json").stat().st_mode) == 0o600


def test_private_folder_is_0700_and_replaces_leftovers_without_following_links(shared: Path, target: Path) -> None:
    image = shared / "disk.qcow2"
    (shared / ".disk.qcow2.x").symlink_to(target.parent)  # a planted symlink at the folder's name
    with PrivateFolder(str(image), ".x") as folder:
        assert folder.path == str(shared / ".disk.qcow2.x")
        st = os.lstat(folder.path)
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.geteuid()
        assert unchanged(target)
        (Path(folder.path) / "partial").write_bytes(b"killed run")  # a killed run's leftover folder
        os.close(os.dup(folder.fd))
        leftover = folder.path
    assert not os.path.lexists(leftover)  # closing removes it
    os.mkdir(leftover, 0o700)
    (Path(leftover) / "partial").write_bytes(b"killed run")
    with PrivateFolder(str(image), ".x") as folder:
        assert os.listdir(folder.path) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a folder owned by another user")
def test_private_folder_refuses_another_users_folder(shared: Path) -> None:
    (shared / ".disk.qcow2.x").mkdir()
    (shared / ".disk.qcow2.x" / "keep").write_bytes(SECRET)
    os.chown(shared / ".disk.qcow2.x", 4242, 4242)
    with pytest.raises(VmsnapError, match="belongs to another user .*nothing was changed"):
        PrivateFolder(str(shared / "disk.qcow2"), ".x")
    assert (shared / ".disk.qcow2.x" / "keep").read_bytes() == SECRET


@pytest.mark.parametrize("planted", ["symlink", "dangling", "file"])
def test_link_out_never_replaces_or_follows_what_is_planted(shared: Path, target: Path, planted: str) -> None:
    final = shared / "overlay.qcow2"
    if planted == "file":
        final.write_bytes(SECRET)
    else:
        final.symlink_to(target if planted == "symlink" else target.parent / "missing")
    with PrivateFolder(str(final), ".x") as folder:
        Path(folder.create("overlay.qcow2")).write_bytes(b"new")
        with pytest.raises(VmsnapError, match="overlay.qcow2 exists .*refusing to overwrite or follow it"):
            folder.link_out("overlay.qcow2", str(final))
    assert unchanged(target)
    assert not (target.parent / "missing").exists()
    if planted == "file":
        assert final.read_bytes() == SECRET
    assert sorted(os.listdir(shared)) == ["overlay.qcow2"]  # the private folder is gone


def test_link_out_gives_the_name(shared: Path) -> None:
    with PrivateFolder(str(shared / "overlay.qcow2"), ".x") as folder:
        Path(folder.create("overlay.qcow2")).write_bytes(b"new")
        folder.link_out("overlay.qcow2", str(shared / "overlay.qcow2"))
    assert (shared / "overlay.qcow2").read_bytes() == b"new"
    assert sorted(os.listdir(shared)) == ["overlay.qcow2"]


@pytest.mark.parametrize("step", ["link_out", "replace_out"])
def test_a_private_folder_swapped_for_a_planted_one_redirects_nothing(shared: Path, target: Path, step: str) -> None:
    image = shared / "disk.qcow2"
    image.write_bytes(b"old image")
    with PrivateFolder(str(image), ".x") as folder:
        through = folder.create("disk.qcow2")
        # another user renames the private folder away and plants their own, with a symlink at the file's name
        os.rename(folder.path, str(shared / "moved"))
        os.mkdir(folder.path)
        os.symlink(target, os.path.join(folder.path, "disk.qcow2"))
        Path(through).write_bytes(b"new image")  # what qemu-img writes through /proc/<pid>/fd/<n>
        if step == "link_out":
            folder.link_out("disk.qcow2", str(shared / "new.qcow2"))
            assert (shared / "new.qcow2").read_bytes() == b"new image"
        else:
            folder.replace_out("disk.qcow2", str(image))
            assert image.read_bytes() == b"new image" and not image.is_symlink()
    assert unchanged(target)
    assert os.path.islink(os.path.join(folder.path, "disk.qcow2"))  # the planted folder is not ours to remove


def test_private_folder_refuses_a_name_planted_while_it_removed_a_leftover(
    shared: Path, target: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = shared / ".disk.qcow2.x"

    def plant_after_removal(path: str) -> None:
        name.symlink_to(target.parent)  # another user wins the race

    monkeypatch.setattr(_files, "remove_private_folder", plant_after_removal)
    with pytest.raises(VmsnapError, match=r"\.disk\.qcow2\.x exists \(it appeared while .*nothing was changed"):
        PrivateFolder(str(shared / "disk.qcow2"), ".x")
    assert unchanged(target) and name.is_symlink()


def test_a_private_folder_that_cannot_be_made_is_an_error_of_the_family(tmp_path: Path) -> None:
    with pytest.raises(VmsnapError, match=r"Cannot create the private folder .*nothing was changed"):
        PrivateFolder(str(tmp_path / "missing" / "disk.qcow2"), ".x")
