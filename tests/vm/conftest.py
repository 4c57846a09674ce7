# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Fixtures shared by the tiny-guest tests: the guest is built once per session into a cache folder."""

from __future__ import annotations

import typing as t
from pathlib import Path

import pytest
from tiny_guest import GuestImage, GuestVM, build_tiny_guest, default_cache_dir, make_ext4_qcow2

REPO = Path(__file__).resolve().parents[2]
BOOT_TIMEOUT = 90.0


def cache_dir() -> Path:
    return default_cache_dir()


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    return build_tiny_guest(cache_dir())


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    return make_ext4_qcow2(tmp_path / "data.qcow2", size_mib=64)


@pytest.fixture
def vm(guest_image: GuestImage, disk: Path, tmp_path: Path) -> t.Iterator[GuestVM]:
    work = tmp_path / "vm"
    with GuestVM(guest_image, [disk], work) as guest:
        guest.wait_ready(BOOT_TIMEOUT)
        yield guest
    # __exit__ killed QEMU by PID if a test left it running
    assert guest.returncode is not None
