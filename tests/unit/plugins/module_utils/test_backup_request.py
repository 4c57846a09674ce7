# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""qcow2_backup's argument checks: each bad combination is refused with its message before anything is touched."""

from __future__ import annotations

import hashlib
import subprocess
import typing as t
from pathlib import Path

import pytest

from ansible_collections.vmsnap.qemu.plugins.module_utils._backup_execute import Request, validate_request
from ansible_collections.vmsnap.qemu.plugins.module_utils._errors import ValidationError

BAD: dict[str, tuple[dict[str, t.Any], str]] = {
    "empty dest_dir": ({"state": "present", "dest_dir": "", "path": "{disk}"}, "dest_dir must be a non-empty path."),
    "path and socket": (
        {"state": "present", "path": "{disk}", "socket": "{folder}/vm.qmp"},
        "path and socket are mutually exclusive.",
    ),
    "empty set_name": ({"state": "verified", "set_name": ""}, "set_name must be a non-empty string."),
    "present without a disk": (
        {"state": "present"},
        "state=present needs the disk: path (an offline image) or socket (a running VM).",
    ),
    "verified without a set": ({"state": "verified"}, "state=verified needs the set: set_name, or the disk"),
    "devices without socket": (
        {"state": "present", "path": "{disk}", "devices": ["virtio0"]},
        "devices applies to a running VM (socket).",
    ),
    "backup_id with present": (
        {"state": "present", "path": "{disk}", "backup_id": "20261202T010203Z"},
        "backup_id applies to state=restored and state=verified, not state=present.",
    ),
    "restored without restore_to": ({"state": "restored", "set_name": "disk"}, "state=restored needs restore_to."),
    "restore_to with verified": (
        {"state": "verified", "set_name": "disk", "restore_to": "{folder}/new.qcow2"},
        "restore_to applies to state=restored only.",
    ),
    "restore_to in a missing folder": (
        {"state": "restored", "set_name": "disk", "restore_to": "{folder}/nowhere/new.qcow2"},
        "The folder of restore_to ({folder}/nowhere) does not exist.",
    ),
    "restore_to a folder": (
        {"state": "restored", "set_name": "disk", "restore_to": "{folder}"},
        "restore_to {folder} exists and is not a regular file.",
    ),
    "retention with verified": (
        {"state": "verified", "set_name": "disk", "retention": {"keep": 2}},
        "retention applies to state=present and state=pruned, not state=verified.",
    ),
    "pruned without retention": (
        {"state": "pruned", "set_name": "disk"},
        "state=pruned needs retention (keep, keep_daily, keep_weekly, keep_monthly, max_age).",
    ),
    "zero timeout": (
        {"state": "present", "path": "{disk}", "timeout": 0},
        "timeout and connect_timeout must be greater than zero.",
    ),
}


def _filled(value: t.Any, folder: Path, disk: Path) -> t.Any:
    if isinstance(value, str):
        return value.replace("{folder}", str(folder)).replace("{disk}", str(disk))
    return value


@pytest.mark.parametrize(("args", "message"), list(BAD.values()), ids=list(BAD))
def test_a_bad_combination_is_refused_before_anything_is_touched(
    tmp_path: Path, args: dict[str, t.Any], message: str
) -> None:
    disk = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
    before = hashlib.sha256(disk.read_bytes()).hexdigest()
    dest = tmp_path / "backups"
    dest.mkdir()
    params = {"dest_dir": str(dest), **{key: _filled(value, tmp_path, disk) for key, value in args.items()}}
    with pytest.raises(ValidationError) as info:
        validate_request(Request(**params))
    assert _filled(message, tmp_path, disk) in info.value.msg
    assert hashlib.sha256(disk.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backups", "disk.qcow2"]
    assert list(dest.iterdir()) == []
