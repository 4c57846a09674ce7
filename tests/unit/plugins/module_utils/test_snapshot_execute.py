# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""execute(): ordering, all-or-nothing creation and honest reporting of half-done work.

The runner is replaced by one that records calls and fails where told, with qemu-img's recorded error text.
The integration tests do the same against real qemu-img (read-only mount, full filesystem).
"""

from __future__ import annotations

import threading

import pytest

from ansible_collections.vmsnap.qemu.plugins.module_utils._errors import QemuImgError
from ansible_collections.vmsnap.qemu.plugins.module_utils._image import parse_info
from ansible_collections.vmsnap.qemu.plugins.module_utils._qemu_img import QemuImg
from ansible_collections.vmsnap.qemu.plugins.module_utils._retention import RetentionPolicy
from ansible_collections.vmsnap.qemu.plugins.module_utils._snapshot import execute, plan_image

NOW = 1_900_000_000.0


class RecordingQemuImg:
    """Records snapshot calls; raises qemu-img's recorded ENOSPC error for the (verb, path) pairs in fail_on."""

    map_parallel = staticmethod(QemuImg.map_parallel)

    def __init__(self, stderr: str, fail_on: set[tuple[str, str]]) -> None:
        self.stderr = stderr
        self.fail_on = fail_on
        self.calls: list[tuple[str, str, str]] = []
        self._mutex = threading.Lock()

    def _call(self, verb: str, path: str, name: str) -> None:
        with self._mutex:
            self.calls.append((verb, path, name))
        if (verb, path) in self.fail_on:
            raise QemuImgError(f"qemu-img failed (rc=1): {self.stderr.strip()}", ["qemu-img"], 1, "", self.stderr)

    def snapshot_create(self, path: str, name: str) -> None:
        self._call("create", path, name)

    def snapshot_delete(self, path: str, name: str) -> None:
        self._call("delete", path, name)

    def snapshot_apply(self, path: str, name: str) -> None:
        self._call("apply", path, name)


@pytest.fixture
def base_info(recorded):
    doc = recorded.json("info-chain-top-over-base-with-snapshots-and-bitmap.json")[1]
    doc["format-specific"]["data"].pop("bitmaps")
    return parse_info(doc)


@pytest.fixture
def enospc(recorded) -> str:
    return recorded.text("stderr-snapshot-create-enospc.txt")


def test_failed_create_removes_every_snapshot_made_and_reports_nothing_changed(base_info, enospc) -> None:
    paths = ["/vm/a.qcow2", "/vm/b.qcow2", "/vm/c.qcow2"]
    plans = [plan_image(path, base_info, "present", "pre-upgrade-2", None, NOW) for path in paths]
    runner = RecordingQemuImg(enospc, fail_on={("create", "/vm/b.qcow2")})
    with pytest.raises(QemuImgError) as info:
        execute(runner, plans)
    err = info.value
    assert sorted(c for c in runner.calls if c[0] == "create") == [("create", p, "pre-upgrade-2") for p in paths]
    assert sorted(c for c in runner.calls if c[0] == "delete") == [
        ("delete", "/vm/a.qcow2", "pre-upgrade-2"),
        ("delete", "/vm/c.qcow2", "pre-upgrade-2"),
    ]
    assert err.details["failed_paths"] == ["/vm/b.qcow2"]
    assert err.details["rolled_back"] == ["/vm/a.qcow2", "/vm/c.qcow2"]
    assert err.details["rollback_failed"] == []
    assert "changed_paths" not in err.details
    assert "Creating snapshot 'pre-upgrade-2' on /vm/b.qcow2 failed" in err.msg
    assert "No space left on device" in err.msg


def test_a_rollback_that_fails_is_reported(base_info, enospc) -> None:
    plans = [plan_image(p, base_info, "present", "new", None, NOW) for p in ("/vm/a.qcow2", "/vm/b.qcow2")]
    runner = RecordingQemuImg(enospc, fail_on={("create", "/vm/b.qcow2"), ("delete", "/vm/a.qcow2")})
    with pytest.raises(QemuImgError) as info:
        execute(runner, plans)
    assert info.value.details["rolled_back"] == []
    assert info.value.details["rollback_failed"][0].startswith("/vm/a.qcow2 (")
    assert "Could NOT remove the snapshot made on: /vm/a.qcow2" in info.value.msg


def test_half_done_reverts_list_the_images_already_changed(base_info, enospc) -> None:
    plans = [plan_image(p, base_info, "reverted", "pre-upgrade", None, NOW) for p in ("/vm/a.qcow2", "/vm/b.qcow2")]
    runner = RecordingQemuImg(enospc, fail_on={("apply", "/vm/b.qcow2")})
    with pytest.raises(QemuImgError) as info:
        execute(runner, plans)
    assert info.value.details["changed_paths"] == ["/vm/a.qcow2"]
    assert "Images already changed by this task before the failure: /vm/a.qcow2." in info.value.msg


def test_created_snapshots_count_as_changed_when_pruning_fails(base_info, enospc) -> None:
    policy = RetentionPolicy(match="pre-*", keep=1)
    plan = plan_image("/vm/a.qcow2", base_info, "present", "pre-2", policy, NOW)
    assert [snap.name for snap in plan.prune] == ["pre-upgrade"]
    runner = RecordingQemuImg(enospc, fail_on={("delete", "/vm/a.qcow2")})
    with pytest.raises(QemuImgError) as info:
        execute(runner, [plan])
    assert runner.calls == [("create", "/vm/a.qcow2", "pre-2"), ("delete", "/vm/a.qcow2", "pre-upgrade")]
    assert info.value.details["changed_paths"] == ["/vm/a.qcow2"]


def test_nothing_to_do_calls_nothing(base_info) -> None:
    plan = plan_image("/vm/a.qcow2", base_info, "present", "pre-upgrade", None, NOW)
    runner = RecordingQemuImg("", fail_on=set())
    execute(runner, [plan])
    assert runner.calls == []
