# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""checkpoint_manifest through ansible: four runs per state (check, real, repeat, repeat in check mode), query with
keep_for and verify against a real qcow2 image, and --diff. No guest is needed. Bad inputs, refused transitions and
verify failures run in-process in tests/unit/plugins/modules/test_checkpoint_manifest.py."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import typing as t
from pathlib import Path

import pytest
from conftest import run_module

MODULE = "vmsnap.qemu.checkpoint_manifest"
VM = "web01"
NAME = "pre-upgrade"


def snapshot_of(folder: Path) -> dict[str, tuple[int, str]]:
    """Every file and folder below folder with its mode and content hash: 'nothing changed' means equal."""
    seen: dict[str, tuple[int, str]] = {}
    for root, dirs, files in os.walk(folder):
        for entry in dirs + files:
            path = os.path.join(root, entry)
            st = os.lstat(path)
            digest = hashlib.sha256(Path(path).read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else ""
            seen[os.path.relpath(path, folder)] = (stat.S_IMODE(st.st_mode), digest)
    return seen


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


@pytest.fixture
def disk(tmp_path: Path) -> str:
    path = str(tmp_path / "web01.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", path, "16M")
    qemu_img("snapshot", "-c", NAME, path)
    return path


def four_runs(folder: Path, **args: t.Any) -> list[dict[str, t.Any]]:
    """check, real, repeat, repeat in check mode; the first run must not touch anything."""
    before = snapshot_of(folder)
    results = [run_module(MODULE, check=True, **args)]
    assert snapshot_of(folder) == before, "check mode changed files"
    results += [run_module(MODULE, **args), run_module(MODULE, **args), run_module(MODULE, check=True, **args)]
    assert [result["failed"] for result in results] == [False] * 4, results
    assert [result["changed"] for result in results] == [True, True, False, False], results
    return results


def test_four_runs_per_state(tmp_path: Path, disk: str) -> None:
    folder = tmp_path / "manifests"
    base = dict(dir=str(folder), vm=VM, name=NAME)
    path = folder / VM / f"{NAME}.json"
    record = {"method": "offline", "hypervisor": "hv1", "snapshot": NAME, "disks": [{"file": disk, "format": "qcow2"}]}

    check, real, again, dummy = four_runs(folder, state="pending", record=record, **base)
    assert (check["exists"], check["previous_state"], check["manifest"]["state"]) == (True, None, "pending")
    assert real["msg"] == "Checkpoint pre-upgrade of VM web01 is now pending."
    assert again["msg"] == "Checkpoint pre-upgrade of VM web01 is pending already, with the same record."
    assert again["manifest"] == real["manifest"] and real["path"] == str(path)
    assert real["manifest"]["disks"][0]["inode"] == os.stat(disk).st_ino
    modes = (stat.S_IMODE(os.stat(folder).st_mode), stat.S_IMODE(os.stat(folder / VM).st_mode))
    assert modes == (0o700, 0o700) and stat.S_IMODE(os.stat(path).st_mode) == 0o600

    dummy, real, again, dummy = four_runs(folder, state="open", record={"result": {"downtime_ms": 0}}, **base)
    assert (real["previous_state"], real["manifest"]["state"]) == ("pending", "open")
    assert real["manifest"]["hypervisor"] == "hv1" and real["manifest"]["result"] == {"downtime_ms": 0}
    assert again["msg"] == "Checkpoint pre-upgrade of VM web01 is open already."

    query = run_module(MODULE, verify=True, keep_for="1h", **base)
    assert (query["failed"], query["changed"], query["verified"], query["young"]) == (False, False, True, True)
    assert query["mismatches"] == [] and query["age_seconds"] < 600

    dummy, real, dummy, dummy = four_runs(folder, state="rolled_back", **base)
    assert (real["previous_state"], real["manifest"]["state"]) == ("open", "rolled_back")

    dummy, real, again, dummy = four_runs(folder, state="released", **base)
    assert (real["previous_state"], real["manifest"]["state"]) == ("rolled_back", "released")
    history = [entry["state"] for entry in again["manifest"]["history"]]
    assert history == ["pending", "open", "rolled_back", "released"]


def test_diff_and_release_of_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "manifests"
    base = dict(dir=str(folder), vm=VM, name=NAME)
    result = run_module(MODULE, check=True, diff=True, state="pending", record={"method": "internal"}, **base)
    assert result["changed"] and not folder.exists()
    assert '-    "exists": false' in result["_stdout"] and '+    "state": "pending"' in result["_stdout"]
    assert '+    "method": "internal"' in result["_stdout"]
    result = run_module(MODULE, state="released", **base)
    assert (result["failed"], result["changed"], result["exists"]) == (False, False, False)
    assert result["msg"] == "VM web01 has no checkpoint pre-upgrade: nothing to release."
    assert not folder.exists()
