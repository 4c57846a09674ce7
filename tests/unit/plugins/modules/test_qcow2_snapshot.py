# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""qcow2_snapshot's main() in this process (real AnsibleModule, real qemu-img, real images) where the real world
rarely goes: the read after a successful change fails. The four runs per state are in the integration target."""

from __future__ import annotations

import json
import subprocess
import typing as t
from pathlib import Path
from unittest import mock

import pytest
from ansible.module_utils import _internal
from ansible.module_utils.common import warnings as ansible_warnings
from ansible.module_utils.testing import patch_module_args

from ansible_collections.vmsnap.qemu.plugins.module_utils._errors import QemuImgError
from ansible_collections.vmsnap.qemu.plugins.module_utils._qemu_img import QemuImg
from ansible_collections.vmsnap.qemu.plugins.modules import qcow2_snapshot


def run(capsys: pytest.CaptureFixture[str], **params: t.Any) -> dict[str, t.Any]:
    for name in ("_global_warnings", "_global_deprecations"):
        getattr(ansible_warnings, name).clear()
    with patch_module_args(params), mock.patch.object(_internal, "is_controller", False), pytest.raises(SystemExit):
        qcow2_snapshot.main()
    return t.cast("dict[str, t.Any]", json.loads(capsys.readouterr().out))


def snapshot_names(path: Path) -> list[str]:
    out = subprocess.run(["qemu-img", "info", "--output=json", str(path)], check=True, capture_output=True).stdout
    return [snap["name"] for snap in json.loads(out).get("snapshots", [])]


def test_a_failed_read_after_the_change_still_reports_changed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    disks = [tmp_path / "a.qcow2", tmp_path / "b.qcow2"]
    for disk in disks:
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
    real = QemuImg.read_top_many
    reads: list[list[str]] = []

    def read_top_many(self: QemuImg, paths: list[str]) -> list[t.Any]:
        reads.append(paths)
        if len(reads) == 2:  # the planning read works; the one after the change meets a storage error
            raise QemuImgError("Cannot read image: Input/output error", ["qemu-img"], 1, "", "Input/output error")
        return real(self, paths)

    monkeypatch.setattr(QemuImg, "read_top_many", read_top_many)
    result = run(capsys, paths=[str(disk) for disk in disks], name="s1", state="present")
    assert result["failed"] and result["changed"], result
    assert result["msg"] == (
        f"The snapshots were changed as requested on {disks[0]}, {disks[1]}, but reading the images again "
        "afterwards failed: Cannot read image: Input/output error"
    )
    assert result["changed_paths"] == [str(disk) for disk in disks]
    assert [snapshot_names(disk) for disk in disks] == [["s1"], ["s1"]]
