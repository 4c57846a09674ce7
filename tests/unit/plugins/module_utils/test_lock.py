# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Real flock() locks between real processes, and the lock folder's checks (the tests run as root)."""

from __future__ import annotations

import multiprocessing
import os
import stat
import time

import pytest

from ansible_collections.vmsnap.qemu.plugins.module_utils import _lock
from ansible_collections.vmsnap.qemu.plugins.module_utils._errors import LockTimeoutError
from ansible_collections.vmsnap.qemu.plugins.module_utils._lock import (
    LockFolderError,
    acquire,
    default_lock_dir,
    holder_of,
    image_locks,
    lock_file_for,
    release,
)

NOBODY = 65534


def _hold(paths, lock_dir, seconds, ready) -> None:
    with image_locks(paths, timeout=5, lock_dir=lock_dir):
        ready.set()
        time.sleep(seconds)


@pytest.fixture
def holder(tmp_path):
    ctx = multiprocessing.get_context("fork")
    procs = []

    def start(paths, seconds):
        ready = ctx.Event()
        proc = ctx.Process(target=_hold, args=(paths, str(tmp_path / "locks"), seconds, ready))
        proc.start()
        procs.append(proc)
        assert ready.wait(5)
        return proc

    yield start
    for proc in procs:
        proc.join(10)


def test_second_locker_times_out_with_clear_message(tmp_path, holder) -> None:
    image = str(tmp_path / "a.qcow2")
    holder([image], seconds=2)
    started = time.monotonic()
    expected = "Another vmsnap.qemu task is changing .*a.qcow2"
    locks = str(tmp_path / "locks")
    with pytest.raises(LockTimeoutError, match=expected), image_locks([image], timeout=0.3, lock_dir=locks):
        pass
    assert 0.25 <= time.monotonic() - started < 1.5


def test_second_locker_waits_and_then_proceeds(tmp_path, holder) -> None:
    image = str(tmp_path / "a.qcow2")
    holder([image], seconds=0.5)
    started = time.monotonic()
    with image_locks([image], timeout=5, lock_dir=str(tmp_path / "locks")):
        waited = time.monotonic() - started
    assert waited >= 0.3


def test_other_images_are_not_blocked(tmp_path, holder) -> None:
    locks = str(tmp_path / "locks")
    holder([str(tmp_path / "a.qcow2")], seconds=2)
    started = time.monotonic()
    with image_locks([str(tmp_path / "b.qcow2")], timeout=1.5, lock_dir=locks):
        assert time.monotonic() - started < 0.5  # no wait at all for b, although a is held
        assert acquire(lock_file_for(str(tmp_path / "a.qcow2"), locks), 0) is False  # a is really held meanwhile


def test_symlink_and_real_path_share_one_lock(tmp_path, holder) -> None:
    real = tmp_path / "a.qcow2"
    real.write_bytes(b"")
    link = tmp_path / "link.qcow2"
    os.symlink(real, link)
    locks = str(tmp_path / "locks")
    assert lock_file_for(str(link), locks) == lock_file_for(str(real), locks)
    holder([str(real)], seconds=1)
    with pytest.raises(LockTimeoutError), image_locks([str(link)], timeout=0.2, lock_dir=locks):
        pass


def _lock_once(image: str, locks: str) -> None:
    with image_locks([image], timeout=1, lock_dir=locks):
        pass


def test_the_timeout_names_the_holder(tmp_path, holder) -> None:
    image = str(tmp_path / "a.qcow2")
    proc = holder([image], seconds=2)
    locks = str(tmp_path / "locks")
    with pytest.raises(LockTimeoutError) as info, image_locks([image], timeout=0.2, lock_dir=locks):
        pass
    assert f"(held by pid {proc.pid} (" in info.value.msg and " UTC). Nothing was changed" in info.value.msg
    assert info.value.details["lock_holder"].startswith(f"pid {proc.pid} (")


def test_a_waiter_gets_the_lock_after_the_holder_unlinks_it(tmp_path, holder) -> None:
    image = str(tmp_path / "a.qcow2")
    locks = str(tmp_path / "locks")
    lock = lock_file_for(image, locks)
    holder([image], seconds=0.5)
    with image_locks([image], timeout=5, lock_dir=locks):
        assert holder_of(lock).startswith(f"pid {os.getpid()} (")  # the file at the path is this task's
        assert stat.S_IMODE(os.stat(lock).st_mode) == 0o600
    assert not os.path.exists(lock)  # released locks leave no files behind


def test_locks_are_reentrant_within_a_process(tmp_path) -> None:
    image = str(tmp_path / "a.qcow2")
    locks = str(tmp_path / "locks")
    with image_locks([image], timeout=0.2, lock_dir=locks), image_locks([image], timeout=0.2, lock_dir=locks):
        assert os.path.exists(lock_file_for(image, locks))
    assert not os.path.exists(lock_file_for(image, locks))


def test_the_folder_is_0700_whatever_the_umask(tmp_path) -> None:
    locks = tmp_path / "locks"
    old = os.umask(0o777)
    try:
        with image_locks([str(tmp_path / "a.qcow2")], timeout=1, lock_dir=str(locks)):
            pass
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(locks).st_mode) == 0o700
    locks.chmod(0o1777)  # as an older release left it
    with image_locks([str(tmp_path / "a.qcow2")], timeout=1, lock_dir=str(locks)):
        pass
    assert stat.S_IMODE(os.stat(locks).st_mode) == 0o700


def test_a_folder_that_is_a_symlink_is_refused(tmp_path) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o755)
    locks = tmp_path / "locks"
    locks.symlink_to(target)
    with pytest.raises(LockFolderError, match="is not a plain folder .* Nothing was changed"):
        _lock_once(str(tmp_path / "a.qcow2"), str(locks))
    assert os.listdir(target) == [] and stat.S_IMODE(os.stat(target).st_mode) == 0o755


def test_a_folder_of_another_user_is_refused(tmp_path) -> None:
    locks = tmp_path / "locks"
    locks.mkdir()
    locks.chmod(0o1777)
    os.chown(locks, NOBODY, NOBODY)
    with pytest.raises(LockFolderError, match=f"belongs to uid {NOBODY}, not to this task's user .* Nothing was"):
        _lock_once(str(tmp_path / "a.qcow2"), str(locks))
    assert os.listdir(locks) == [] and stat.S_IMODE(os.stat(locks).st_mode) == 0o1777


def test_a_planted_symlink_at_a_lock_file_is_not_followed(tmp_path) -> None:
    image = str(tmp_path / "a.qcow2")
    locks = tmp_path / "locks"
    locks.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    os.symlink(victim, lock_file_for(image, str(locks)))
    missing = tmp_path / "would-be-created"
    os.symlink(missing, lock_file_for(str(tmp_path / "b.qcow2"), str(locks)))
    with pytest.raises(LockFolderError, match="is a symbolic link: refusing to follow it. Nothing was changed"):
        _lock_once(image, str(locks))
    with pytest.raises(LockFolderError, match="is a symbolic link"):
        _lock_once(str(tmp_path / "b.qcow2"), str(locks))
    assert victim.read_bytes() == b"precious" and stat.S_IMODE(victim.stat().st_mode) == 0o644
    assert not missing.exists()


def test_a_lock_file_of_another_user_or_not_a_file_is_refused(tmp_path) -> None:
    locks = tmp_path / "locks"
    locks.mkdir(mode=0o700)
    planted = lock_file_for(str(tmp_path / "a.qcow2"), str(locks))
    with open(planted, "wb") as handle:
        handle.write(b"theirs")
    os.chown(planted, NOBODY, NOBODY)
    with pytest.raises(LockFolderError, match=f"not a regular file of this task's user .*uid {NOBODY}"):
        _lock_once(str(tmp_path / "a.qcow2"), str(locks))
    with open(planted, "rb") as handle:
        assert handle.read() == b"theirs"
    os.mkfifo(lock_file_for(str(tmp_path / "b.qcow2"), str(locks)))
    with pytest.raises(LockFolderError, match="not a regular file"):
        _lock_once(str(tmp_path / "b.qcow2"), str(locks))


def test_default_folder_per_user(monkeypatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert default_lock_dir() == "/run/lock/vmsnap.qemu"
    monkeypatch.setattr(os, "geteuid", lambda: 1234)
    assert default_lock_dir() == "/run/lock/vmsnap.qemu-1234"
    monkeypatch.setattr(os.path, "isdir", lambda path: False)  # no /run/lock
    assert default_lock_dir().endswith("/vmsnap.qemu-1234") and not default_lock_dir().startswith("/run/lock")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert default_lock_dir().endswith("/vmsnap.qemu-0")


def test_task_name_under_ansible(monkeypatch) -> None:
    path = "/tmp/ansible_x/ansible_x_payload.zip/ansible_collections/vmsnap/qemu/plugins/modules/qmp_vm_state.py"
    monkeypatch.setattr(_lock.sys, "argv", [path])
    assert _lock.task_name() == "vmsnap.qemu.qmp_vm_state"
    monkeypatch.setattr(_lock.sys, "argv", ["/usr/bin/foo"])
    assert _lock.task_name() == "foo"


def test_acquire_and_release_count(tmp_path) -> None:
    locks = tmp_path / "locks"
    locks.mkdir(mode=0o700)
    lock = str(locks / "x.lock")
    assert acquire(lock, 0) and acquire(lock, 0)
    release(lock)
    assert os.path.exists(lock)  # still held once
    release(lock)
    assert not os.path.exists(lock)
    release(lock)  # releasing what is not held is harmless


def test_a_folder_that_cannot_be_made_and_a_lock_file_that_cannot_be_opened(tmp_path) -> None:
    too_long = str(tmp_path / ("x" * 300))
    with pytest.raises(LockFolderError, match="cannot be created or opened: File name too long. Nothing was changed"):
        _lock_once(str(tmp_path / "a.qcow2"), too_long)
    locks = tmp_path / "locks"
    locks.mkdir(mode=0o700)
    os.mkdir(lock_file_for(str(tmp_path / "a.qcow2"), str(locks)))  # a folder where the lock file belongs
    with pytest.raises(LockFolderError, match="The lock file .* cannot be opened: Is a directory. Nothing was changed"):
        _lock_once(str(tmp_path / "a.qcow2"), str(locks))
    file_in_the_way = tmp_path / "file"
    file_in_the_way.write_bytes(b"x")
    with pytest.raises(LockFolderError, match="is not a plain folder"):
        _lock_once(str(tmp_path / "a.qcow2"), str(file_in_the_way))
    assert file_in_the_way.read_bytes() == b"x"
