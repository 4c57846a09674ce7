# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Dirty bitmaps in the way of an internal snapshot revert: who owns them, the messages, and the offline and live
plans (backup_bitmaps fail | drop). Offline execution with a runner that records calls; the live execution is in
test_live_execute.py, the real thing in tests/vm/test_revert_bitmaps.py."""

from __future__ import annotations

import copy
import typing as t

import pytest

from ansible_collections.vmsnap.qemu.plugins.module_utils._errors import QemuImgError
from ansible_collections.vmsnap.qemu.plugins.module_utils._image import parse_info
from ansible_collections.vmsnap.qemu.plugins.module_utils._live import LiveRequest, plan_live
from ansible_collections.vmsnap.qemu.plugins.module_utils._revert_bitmaps import (
    BlockingBitmap,
    RevertBlockedError,
    blocking_bitmaps,
    check_revert_bitmaps,
    drop_warning,
)
from ansible_collections.vmsnap.qemu.plugins.module_utils._snapshot import execute, plan_image

NOW = 1_900_000_000.0
OURS = "vmsnap-backup-web01-disk0-0123abcd"
OURS_TOO = "vmsnap-backup-web01-disk1-89abcdef"
QEMU_WORDS = "Device has active dirty bitmaps"


def owners(*names: str | None, busy: bool = False) -> list[BlockingBitmap]:
    return blocking_bitmaps((name, busy) for name in names)


# --- whose bitmaps, and what the messages say ------------------------------------------------------------------


def test_bitmaps_are_told_apart_by_the_backup_name_pattern_alone() -> None:
    found = owners(OURS, "vmsnap-backup-x-0123ABCD", "bm0", None)
    assert [(b.name, b.backup_set, b.droppable) for b in found] == [
        (OURS, "web01-disk0", True),
        ("vmsnap-backup-x-0123ABCD", None, False),  # upper-case chain: not ours, never touched
        ("bm0", None, False),
        (None, None, False),
    ]
    assert owners(OURS, busy=True)[0].droppable is False


def test_no_bitmaps_never_block() -> None:
    for mode in ("fail", "drop"):
        check_revert_bitmaps([("image /v/a.qcow2", [])], "cp", mode)


def test_fail_names_the_backup_set_and_points_to_drop() -> None:
    with pytest.raises(RevertBlockedError) as info:
        check_revert_bitmaps([("image /v/a.qcow2", owners(OURS))], "pre-upgrade", "fail")
    assert info.value.msg == (
        "Cannot revert to snapshot 'pre-upgrade': QEMU refuses to revert an internal snapshot while a dirty bitmap "
        f"is on the image. On image /v/a.qcow2, bitmap '{OURS}' belongs to the backup set 'web01-disk0' of "
        "vmsnap.qemu.qcow2_backup. Nothing was changed. Set backup_bitmaps=drop (in the rollback role, "
        "vmsnap_rollback_backup_bitmaps) to remove the backup bitmaps before the revert; the next backup of set "
        "'web01-disk0' is then a full one."
    )
    assert info.value.details == {"bitmaps": [OURS], "backup_sets": ["web01-disk0"], "foreign_bitmaps": []}


def test_drop_still_refuses_another_tools_bitmap_and_says_so() -> None:
    blocked = [("disk drive0", owners(OURS, "incremental-0")), ("disk drive1", owners(None))]
    with pytest.raises(RevertBlockedError) as info:
        check_revert_bitmaps(blocked, "cp", "drop")
    msg = info.value.msg
    assert QEMU_WORDS not in msg
    assert (
        f"On disk drive0, bitmap '{OURS}' belongs to the backup set 'web01-disk0' of vmsnap.qemu.qcow2_backup; "
        "bitmap 'incremental-0' belongs to another tool (not vmsnap.qemu). On disk drive1, an unnamed bitmap "
        "belongs to a running block job (mirror or commit). Nothing was changed." in msg
    )
    assert "backup_bitmaps=drop removes only the bitmaps of vmsnap.qemu.qcow2_backup's backup sets." in msg
    assert "Bitmaps of other tools are never removed by vmsnap.qemu" in msg
    assert "Set backup_bitmaps=drop" not in msg
    assert info.value.details["foreign_bitmaps"] == ["incremental-0", None]


def test_a_busy_backup_bitmap_waits_for_its_backup() -> None:
    with pytest.raises(RevertBlockedError) as info:
        check_revert_bitmaps([("disk drive0", owners(OURS, busy=True))], "cp", "drop")
    assert "and a backup job is using it right now" in info.value.msg
    assert "Wait until the backup of set 'web01-disk0' has finished, then revert." in info.value.msg


def test_drop_warning_names_every_bitmap_and_set_and_says_would_in_check_mode() -> None:
    dropped = [("disk drive0", owners(OURS)), ("disk drive1", owners(OURS_TOO))]
    assert drop_warning(dropped, "cp", done=True) == (
        f"Removed the backup bitmaps '{OURS}' (disk drive0), '{OURS_TOO}' (disk drive1) to revert to snapshot 'cp' "
        "(QEMU cannot revert an internal snapshot while a dirty bitmap is on the image): the next "
        "vmsnap.qemu.qcow2_backup run of backup set 'web01-disk0', 'web01-disk1' takes a full backup."
    )
    assert drop_warning(dropped[:1], "cp", done=False).startswith(f"Would remove the backup bitmap '{OURS}'")


# --- offline: plan_image and execute ---------------------------------------------------------------------------


@pytest.fixture
def image_doc(recorded) -> dict[str, t.Any]:
    """The recorded base image (snapshot pre-upgrade and others), with the bitmaps each test sets."""
    return t.cast("dict[str, t.Any]", recorded.json("info-chain-top-over-base-with-snapshots-and-bitmap.json")[1])


def with_image_bitmaps(doc: dict[str, t.Any], *names: str) -> dict[str, t.Any]:
    doc = copy.deepcopy(doc)
    doc["format-specific"]["data"]["bitmaps"] = [{"name": n, "granularity": 65536, "flags": ["auto"]} for n in names]
    return doc


def test_offline_fail_refuses_before_anything_with_the_image_named(image_doc) -> None:
    info = parse_info(with_image_bitmaps(image_doc, OURS))
    with pytest.raises(RevertBlockedError, match=f"On image /v/a.qcow2, bitmap '{OURS}' belongs") as err:
        plan_image("/v/a.qcow2", info, "reverted", "pre-upgrade", None, NOW)
    assert err.value.details["image_path"] == "/v/a.qcow2"


def test_offline_drop_plans_the_backup_bitmaps_only_for_a_revert(image_doc) -> None:
    info = parse_info(with_image_bitmaps(image_doc, OURS, OURS_TOO))
    plan = plan_image("/v/a.qcow2", info, "reverted", "pre-upgrade", None, NOW, backup_bitmaps="drop")
    assert [b.name for b in plan.drop_bitmaps] == [OURS, OURS_TOO] and plan.changed
    with pytest.raises(RevertBlockedError, match="bitmap 'bm0' belongs to another tool"):
        plan_image("/v/a.qcow2", parse_info(with_image_bitmaps(image_doc, OURS, "bm0")), "reverted", "pre-upgrade",
                   None, NOW, backup_bitmaps="drop")  # fmt: skip
    other = plan_image("/v/a.qcow2", info, "present", "new", None, NOW, backup_bitmaps="drop")
    assert other.drop_bitmaps == []  # taking a snapshot works with bitmaps: nothing is dropped


class Runner:
    """Records qemu-img calls; snapshot_apply fails with QEMU's bitmap error while fail_apply is set."""

    map_parallel = staticmethod(lambda func, items: [func(item) for item in items])

    def __init__(self, fail_apply: bool = False, bitmaps_later: t.Sequence[str] = ()) -> None:
        self.calls: list[list[str]] = []
        self.fail_apply = fail_apply
        self.bitmaps_later = bitmaps_later
        self.doc: dict[str, t.Any] = {}

    def run(self, args: list[str]) -> str:
        self.calls.append(args)
        return ""

    def snapshot_apply(self, path: str, name: str) -> None:
        self.calls.append(["apply", path, name])
        if self.fail_apply:
            stderr = f"qemu-img: Could not apply snapshot '{name}': {QEMU_WORDS}\n"
            raise QemuImgError(f"qemu-img failed: {stderr}", ["qemu-img"], 1, "", stderr)

    def read_top(self, path: str) -> t.Any:
        return parse_info(with_image_bitmaps(self.doc, *self.bitmaps_later))


def test_offline_drop_removes_each_bitmap_before_the_snapshot_is_applied(image_doc, tmp_path) -> None:
    path = str(tmp_path / "a.qcow2")
    (tmp_path / "a.qcow2").write_bytes(b"")
    info = parse_info(with_image_bitmaps(image_doc, OURS, OURS_TOO))
    runner = Runner()
    execute(runner, [plan_image(path, info, "reverted", "pre-upgrade", None, NOW, backup_bitmaps="drop")])
    assert runner.calls == [
        ["bitmap", "--remove", "-f", "qcow2", "--", path, OURS],
        ["bitmap", "--remove", "-f", "qcow2", "--", path, OURS_TOO],
        ["apply", path, "pre-upgrade"],
    ]


def test_offline_bitmap_that_appears_after_the_plan_is_named_not_qemus_words(image_doc, tmp_path) -> None:
    path = str(tmp_path / "a.qcow2")
    (tmp_path / "a.qcow2").write_bytes(b"")
    runner = Runner(fail_apply=True, bitmaps_later=[OURS])
    runner.doc = image_doc
    plan = plan_image(path, parse_info(with_image_bitmaps(image_doc)), "reverted", "pre-upgrade", None, NOW)
    with pytest.raises(RevertBlockedError) as info:
        execute(runner, [plan])
    msg = info.value.msg
    assert QEMU_WORDS not in msg and f"bitmap '{OURS}' belongs to the backup set 'web01-disk0'" in msg
    assert "Nothing was changed" not in msg and "appeared after the task had checked the image" in msg


# --- live: plan_live -------------------------------------------------------------------------------------------


def live_plan(recording: t.Any, **kwargs: t.Any) -> t.Any:
    request = LiveRequest(name="ckpt", state="reverted", devices=("drive0", "disk2"), **kwargs)
    return plan_live(request, recording.vm, recording.version, recording.nodes)


def test_live_plan_drops_only_backup_bitmaps(live) -> None:
    recording = live("mixed-bitmap")
    recording.disk("drive0")["bitmaps"][0]["name"] = OURS
    with pytest.raises(RevertBlockedError, match=f"On disk drive0, bitmap '{OURS}' belongs to the backup set"):
        live_plan(recording)
    planned = live_plan(recording, backup_bitmaps="drop")
    assert [device.result()["dropped_bitmaps"] for device in planned.devices] == [
        [{"name": OURS, "set": "web01-disk0"}],
        [],
    ]
    assert [device.action for device in planned.devices] == ["revert", "revert"]
    foreign = live("mixed-bitmap")  # bm0: another tool's
    with pytest.raises(RevertBlockedError, match="bitmap 'bm0' belongs to another tool"):
        live_plan(foreign, backup_bitmaps="drop")
