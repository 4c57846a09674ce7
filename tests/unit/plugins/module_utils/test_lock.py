# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Real flock() locks between real processes."""

from __future__ import annotations

import multiprocessing
import os
import time

import pytest

from ansible_collections.vmsnap.qemu.plugins.module_utils._errors import LockTimeoutError
from ansible_collections.vmsnap.qemu.plugins.module_utils._lock import image_locks, lock_file_for


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
    holder([str(tmp_path / "a.qcow2")], seconds=1)
    with image_locks([str(tmp_path / "b.qcow2")], timeout=0.2, lock_dir=str(tmp_path / "locks")):
        pass


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
