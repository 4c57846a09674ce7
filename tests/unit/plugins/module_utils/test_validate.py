# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

import os

import pytest

from ansible_collections.vmsnap.qemu.plugins.module_utils._errors import ValidationError
from ansible_collections.vmsnap.qemu.plugins.module_utils._validate import (
    validate_image_path,
    validate_snapshot_name,
)


@pytest.mark.parametrize(
    "name", ["pre-upgrade", "auto-20261127T020000Z", "a b", 'quo"te', "ünïcødé", "x" * 255, "1a", "v1.2"]
)
def test_good_snapshot_names_pass(name: str) -> None:
    assert validate_snapshot_name(name) == name


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "must not be empty"),
        ("0", "purely numeric"),
        ("12345", "purely numeric"),
        ("x" * 256, "256 bytes long"),
        ("é" * 128, "256 bytes long"),
        ("bad\nname", "control"),
        ("tab\tname", "control"),
        ("nul\x00name", "control"),
        ("del\x7fname", "control"),
        ("zero\u200bwidth", "invisible"),
    ],
)
def test_bad_snapshot_names_are_refused(name: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        validate_snapshot_name(name)


def test_numeric_name_message_explains_the_id_trap() -> None:
    with pytest.raises(ValidationError) as info:
        validate_snapshot_name("1")
    assert "matches snapshot IDs before names" in info.value.msg


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("", "non-empty"),
        ("relative/disk.qcow2", "relative"),
        ("disk.qcow2", "relative"),
        ('json:{"file":{"driver":"file","filename":"/etc/passwd"}}', "json:"),
        ("/var/lib/vms/a\nb.qcow2", "newline"),
    ],
)
def test_bad_paths_are_refused(path: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        validate_image_path(path)


def test_missing_path(tmp_path) -> None:
    with pytest.raises(ValidationError, match="does not exist"):
        validate_image_path(str(tmp_path / "nope.qcow2"))


def test_directory(tmp_path) -> None:
    with pytest.raises(ValidationError, match="is a directory"):
        validate_image_path(str(tmp_path))


def test_fifo_is_refused(tmp_path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(ValidationError, match="neither a regular file nor a block device"):
        validate_image_path(str(fifo))


def test_existing_file_passes(tmp_path) -> None:
    image = tmp_path / "disk.qcow2"
    image.write_bytes(b"")
    assert validate_image_path(str(image)) == str(image)


def test_missing_file_allowed_when_not_required(tmp_path) -> None:
    target = str(tmp_path / "new.qcow2")
    assert validate_image_path(target, must_exist=False) == target
