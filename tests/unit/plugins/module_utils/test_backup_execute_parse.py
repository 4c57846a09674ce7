# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""qcow2_backup's reading of qemu-img map and measure output: recorded real replies, altered."""

from __future__ import annotations

import copy
import typing as t

import pytest

from ansible_collections.vmsnap.qemu.plugins.module_utils import _backup_execute as X
from ansible_collections.vmsnap.qemu.plugins.module_utils._backup_qmp import BackupError

# qemu-img 7.2 `map --output=json` of a 4 MiB qcow2 layer with 1 MiB written at 1 MiB, and `measure` of it
RECORDED_MAP: list[dict[str, t.Any]] = [
    {"start": 0, "length": 1048576, "depth": 0, "present": False, "zero": False, "data": False},
    {"start": 1048576, "length": 1048576, "depth": 0, "present": True, "zero": False, "data": True, "offset": 327680},
    {"start": 2097152, "length": 2097152, "depth": 0, "present": False, "zero": False, "data": False},
]
RECORDED_MEASURE = {"bitmaps": 0, "required": 1441792, "fully-allocated": 4521984}


class Replay:
    """Stands in for QemuImg.run_json with one recorded (or altered) reply."""

    def __init__(self, reply: t.Any) -> None:
        self.reply = reply

    def run_json(self, args: list[str]) -> t.Any:
        return copy.deepcopy(self.reply)


def test_the_recorded_measure_reads() -> None:
    assert X.measure_required(t.cast(t.Any, Replay(RECORDED_MEASURE)), "/vm/disk.qcow2", False) == 1441792


@pytest.mark.parametrize(
    "reply",
    [{}, {"required": None}, {"required": "1"}, {"required": -1}, {"required": True}, [], None, "x", 5],
    ids=repr,
)
def test_odd_measure_output_is_a_backup_error(reply: t.Any) -> None:
    with pytest.raises(BackupError, match=r"Unexpected qemu-img measure output for /vm/disk.qcow2: no 'required'"):
        X.measure_required(t.cast(t.Any, Replay(reply)), "/vm/disk.qcow2", False)


def test_the_recorded_map_passes() -> None:
    assert X._checked_extents(copy.deepcopy(RECORDED_MAP), "/b/1.full.qcow2") == RECORDED_MAP


def _altered_maps() -> t.Iterator[tuple[str, t.Any]]:
    yield "not a list", {"start": 0}
    yield "null", None
    yield "an extent that is not an object", [1]
    for key in ("start", "length", "offset"):
        for value in (None, "0", -1, 1.5, True, [], {}):
            extents = copy.deepcopy(RECORDED_MAP)
            extents[1][key] = value
            yield f"{key}={value!r}", extents
        extents = copy.deepcopy(RECORDED_MAP)
        if key != "offset":
            del extents[1][key]
            yield f"{key} dropped", extents


@pytest.mark.parametrize(("what", "extents"), list(_altered_maps()), ids=[w for w, dummy in _altered_maps()])
def test_odd_map_output_is_a_backup_error(what: str, extents: t.Any) -> None:
    with pytest.raises(BackupError, match=r"Unexpected qemu-img map output for /b/1.full.qcow2"):
        X._checked_extents(extents, "/b/1.full.qcow2")


def test_layer_digest_refuses_an_odd_map_before_reading_anything(tmp_path: t.Any) -> None:
    with pytest.raises(BackupError, match="an extent without start/length/offset"):
        X.layer_digest(t.cast(t.Any, Replay([dict(RECORDED_MAP[1], offset="x")])), "/nonexistent", str(tmp_path))
    assert list(tmp_path.iterdir()) == []
