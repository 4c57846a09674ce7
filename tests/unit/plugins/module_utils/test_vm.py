# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""describe_vm() over QEMU 7.2's recorded replies (fixtures/qemu-7.2.22/qmp-describe-vm.json), then over every
alteration of them: each key dropped, null, wrong JSON types, empty containers, huge numbers. The result is the
description or VmDescriptionError naming the command and the field, never KeyError/TypeError/AttributeError.
The pre-flight's view of each disk (disk_from_qmp) is built from every description that succeeds."""

from __future__ import annotations

import copy
import typing as t

import pytest

from ansible_collections.vmsnap.qemu.plugins.module_utils._errors import VmsnapError
from ansible_collections.vmsnap.qemu.plugins.module_utils._preflight import disk_from_qmp
from ansible_collections.vmsnap.qemu.plugins.module_utils._vm import VmDescriptionError, describe_vm, status_or_none

RECORDING = "qmp-describe-vm.json"
COMMANDS = ("query-status", "query-block", "query-jobs")
ODD_VALUES: list[t.Any] = [None, "x", "", [], {}, 2**70, 10**400, -1, True, 1.5]


class RepliesQmp:
    """Stands in for QmpClient (pure logic under test): answers each query with its recorded 'return' value."""

    def __init__(self, replies: dict[str, t.Any]) -> None:
        self.replies = replies
        self.version = (7, 2, 22)

    def execute(self, command: str, *args: t.Any, **kwargs: t.Any) -> t.Any:
        return copy.deepcopy(self.replies[command])


def replies(recorded: t.Any) -> dict[str, t.Any]:
    recording = recorded.json(RECORDING)
    return {command: recording[command] for command in COMMANDS}


def paths(value: t.Any, prefix: tuple[t.Any, ...] = ()) -> t.Iterator[tuple[t.Any, ...]]:
    """Every key and list index below value, outermost first."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else []
    for key, child in items:
        yield prefix + (key,)
        yield from paths(child, prefix + (key,))


def altered(document: t.Any, path: tuple[t.Any, ...], value: t.Any) -> t.Any:
    """A copy of document with the element at path replaced by value (or removed when value is _DROP)."""
    result = copy.deepcopy(document)
    parent = result
    for key in path[:-1]:
        parent = parent[key]
    if value is _DROP:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return result


_DROP = object()


def test_the_recorded_vm(recorded) -> None:
    vm = describe_vm(RepliesQmp(replies(recorded)))
    assert (vm["status"], vm["running"], vm["qemu_version"]) == ("running", True, "7.2.22")
    (disk,) = vm["block_devices"]
    assert (disk["device"], disk["node_name"], disk["file"], disk["format"]) == (
        "drive0",
        "#block182",
        "/vms/top.qcow2",
        "qcow2",
    )
    assert [layer["filename"] for layer in disk["chain"]] == ["/vms/top.qcow2", "/vms/base.qcow2"]
    assert [snap["name"] for snap in disk["snapshots"]] == ["snap1"]
    assert [bitmap.get("name") for bitmap in disk["bitmaps"]] == [None, "bm0"]  # the commit job's own has no name
    assert vm["jobs"] == [
        {
            "id": "commit0",
            "type": "commit",
            "status": "ready",
            "current_progress": 0,
            "total_progress": 0,
            "error": None,
        }
    ]
    assert disk_from_qmp(disk).bitmaps == ("(unnamed)", "bm0")


def cases(recorded_replies: dict[str, t.Any]) -> t.Iterator[tuple[str, tuple[t.Any, ...], t.Any]]:
    for command in COMMANDS:
        yield command, (), None
        for odd in ODD_VALUES:
            yield command, (), odd
        for path in paths(recorded_replies[command]):
            yield command, path, _DROP
            for odd in ODD_VALUES:
                yield command, path, odd


def test_every_alteration_is_described_or_refused_by_name(recorded) -> None:
    original = replies(recorded)
    outcomes = {"described": 0, "refused": 0}
    for command, path, value in cases(original):
        changed = dict(original)
        changed[command] = value if not path else altered(original[command], path, value)
        try:
            vm = describe_vm(RepliesQmp(changed))
        except VmDescriptionError as exc:
            outcomes["refused"] += 1
            assert exc.msg.startswith(f"QEMU answered {command} "), (command, path, value, exc.msg)
            assert exc.details["qmp_command"] == command
            assert "cannot be read" in exc.msg or "does not understand" in exc.msg
            continue
        outcomes["described"] += 1
        for disk in vm["block_devices"]:
            disk_from_qmp(disk)  # the pre-flight's reading of what describe_vm accepted never raises either
    # Both sides are exercised: required keys refuse, optional ones (and same-typed values) are described.
    assert outcomes["refused"] > 500 and outcomes["described"] > 100, outcomes


@pytest.mark.parametrize(
    ("command", "path", "value", "message"),
    [
        ("query-status", ("status",), _DROP, "QEMU answered query-status without the field 'status'"),
        ("query-status", ("running",), "yes", "QEMU answered query-status with running = 'yes', which is not a bool"),
        ("query-block", (0, "inserted", "node-name"), None, "with node-name = None, which is not a str"),
        ("query-block", (0, "inserted", "dirty-bitmaps"), {}, "with dirty-bitmaps = {}, which is not a JSON list"),
        ("query-block", (0, "inserted", "dirty-bitmaps", 1, "count"), "7", "with count = '7', which is not a int"),
        ("query-block", (0, "inserted"), [], "with a device's inserted = [], which is not a JSON object"),
        ("query-block", (0, "inserted", "image", "virtual-size"), _DROP, "an image this collection does not"),
        ("query-jobs", (0, "id"), _DROP, "QEMU answered query-jobs without the field 'id'"),
        ("query-jobs", (0, "current-progress"), True, "with current-progress = True, which is not a int"),
        ("query-jobs", (0,), "commit0", "with a job = 'commit0', which is not a JSON object"),
    ],
)
def test_the_message_names_command_and_field(recorded, command, path, value, message) -> None:
    changed = replies(recorded)
    changed[command] = altered(changed[command], path, value)
    with pytest.raises(VmDescriptionError) as info:
        describe_vm(RepliesQmp(changed))
    assert message in info.value.msg
    assert isinstance(info.value, VmsnapError)


def test_a_whole_reply_of_the_wrong_type_is_refused(recorded) -> None:
    changed = replies(recorded)
    changed["query-block"] = None
    with pytest.raises(VmDescriptionError, match="QEMU answered query-block with the reply = None, which is not a"):
        describe_vm(RepliesQmp(changed))


@pytest.mark.parametrize("reply", [None, [], "running", {"status": 5}, {}])
def test_status_or_none_never_raises(reply: t.Any) -> None:
    assert status_or_none(RepliesQmp({"query-status": reply})) is None  # type: ignore[arg-type]
