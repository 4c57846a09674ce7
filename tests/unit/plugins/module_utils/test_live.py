# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Planning of live snapshots (plan_live and its helpers) over VMs recorded from a real QEMU 7.2.22.

Each fixtures/qemu-7.2.22/live-*.json holds describe_vm() of a real VM, its query-named-block-nodes (trimmed to
the keys planning reads), qmp.version and, for some, the STOP/RESUME events QEMU sent; its "_recorded" key says
how the VM was set up. The recording's temp dir became /vms; tests that need real folders move /vms to tmp_path.
"""

from __future__ import annotations

import copy
import os
import typing as t

import pytest

from ansible_collections.vmsnap.qemu.plugins.module_utils._errors import ValidationError
from ansible_collections.vmsnap.qemu.plugins.module_utils._live import (
    LivePlan,
    LiveRequest,
    choose_disks,
    disk_stem,
    find_overlay,
    overlay_path,
    plan_live,
    vm_fingerprint,
)
from ansible_collections.vmsnap.qemu.plugins.module_utils._qmp import pause_ms, still_paused
from ansible_collections.vmsnap.qemu.tests.unit.plugins.module_utils.qmp_fakes import Recording

OLD_QEMU = (5, 2, 0)


Load = t.Callable[..., Recording]


def plan(
    recording: Recording, name: str = "new", version: tuple[int, int, int] | None = None, **kwargs: t.Any
) -> LivePlan:
    request = LiveRequest(name=name, **kwargs)
    return plan_live(request, recording.vm, version or recording.version, recording.nodes)


def actions(live_plan: LivePlan) -> dict[str, str]:
    return {device.label: device.action for device in live_plan.devices}


# --- the recordings are what the tests assume ----------------------------------------------------------------


def test_the_recordings_are_qemu_7_2_and_hold_the_disks_the_tests_assume(live: Load) -> None:
    fresh = live("mixed-fresh")
    assert fresh.version == (7, 2, 22)
    assert fresh.vm["status"] == "running"
    assert [
        (d["device"], d["node_name"] == "disk2", d["format"], d["writable"]) for d in fresh.vm["block_devices"]
    ] == [
        ("drive0", False, "qcow2", True),
        ("drive1", False, "raw", True),
        ("drive2", False, "qcow2", False),
        (None, True, "qcow2", True),
    ]
    assert fresh.disk("drive0")["chain_depth"] == 1
    assert fresh.disk("disk2")["qdev"] == "/machine/peripheral/vd2/virtio-backend"
    snaps = live("mixed-snapshots")
    assert [(s["name"], s["vm_state_size"] > 0) for s in snaps.disk("drive0")["snapshots"]] == [
        ("ckpt", True),
        ("diskonly", False),
        ("partial", False),
        ("ckpt2", False),
    ]
    assert [(s["name"], s["vm_state_size"] > 0) for s in snaps.disk("disk2")["snapshots"]] == [
        ("dup", False),
        ("dup", False),
        ("ckpt", False),
        ("diskonly", False),
        ("ckpt2", True),
    ]


# --- which disks --------------------------------------------------------------------------------------------


def test_default_devices_are_every_writable_disk(live: Load) -> None:
    fresh = live("mixed-fresh")
    chosen = choose_disks(fresh.vm["block_devices"], None, fresh.nodes)
    # drive2 is read-only; the -blockdev disk has no drive id and is named by its -device id
    assert [label for label, dummy in chosen] == ["drive0", "drive1", "vd2"]
    assert [disk["file"] for dummy, disk in chosen] == ["/vms/disk0.qcow2", "/vms/data.raw", "/vms/disk2.qcow2"]
    assert list(actions(plan(fresh, state="absent"))) == ["drive0", "drive1", "vd2"]


def test_a_vm_without_writable_disks_is_refused(live: Load) -> None:
    fresh = live("mixed-fresh")
    read_only = [disk for disk in fresh.vm["block_devices"] if not disk["writable"]]
    with pytest.raises(ValidationError, match="no writable disk") as info:
        choose_disks(read_only, None, fresh.nodes)
    assert "drive2 (node" in info.value.details["vm_disks"]


def test_an_empty_devices_list_is_refused(live: Load) -> None:
    with pytest.raises(ValidationError, match="at least one disk"):
        plan(live("mixed-fresh"), devices=())


@pytest.mark.parametrize(
    "wanted, expected_file",
    [
        pytest.param("drive0", "/vms/disk0.qcow2", id="drive-id"),
        pytest.param("drive1", "/vms/data.raw", id="drive-id-raw"),
        pytest.param("disk2", "/vms/disk2.qcow2", id="blockdev-node-name"),
        pytest.param("NODE:/vms/disk0.qcow2", "/vms/disk0.qcow2", id="auto-node-name-of-a-drive"),
        pytest.param("/machine/peripheral/vd2/virtio-backend", "/vms/disk2.qcow2", id="qdev-path"),
        pytest.param("/machine/peripheral-anon/device[0]/virtio-backend", "/vms/disk0.qcow2", id="qdev-path-anon"),
    ],
)
def test_devices_by_drive_id_node_name_and_qdev(live: Load, wanted: str, expected_file: str) -> None:
    fresh = live("mixed-fresh")
    if wanted.startswith("NODE:"):
        wanted = fresh.node(wanted[len("NODE:") :])
    live_plan = plan(fresh, mode="external", state="absent", devices=(wanted,))
    assert [(d.label, d.disk["file"]) for d in live_plan.devices] == [(wanted, expected_file)]


def test_devices_by_qdev_id_of_a_virtio_blk_pci_device(live: Load) -> None:
    live_plan = plan(live("mixed-fresh"), mode="external", state="absent", devices=("vd2",))
    assert [d.disk["node_name"] for d in live_plan.devices] == ["disk2"]


def test_old_node_names_find_the_disk_after_external_overlays(live: Load) -> None:
    chain = live("chain-two-overlays")
    blockdev_disk = chain.vm["block_devices"][1]
    assert blockdev_disk["file"] == "/vms/b.vmsnap-e2.qcow2" and blockdev_disk["node_name"] != "disk2"
    by_old_name = {
        "disk2": "/vms/b.vmsnap-e2.qcow2",  # -blockdev node-name=disk2, now the base of two overlays
        chain.node("/vms/a.qcow2"): "/vms/a.vmsnap-e2.qcow2",  # drive0's first node, now its base
        chain.node("/vms/a.vmsnap-e1.qcow2"): "/vms/a.vmsnap-e2.qcow2",  # an intermediate overlay's node
    }
    for wanted, active_file in by_old_name.items():
        live_plan = plan(chain, mode="external", state="absent", name="e1", devices=(wanted,))
        assert [(d.label, d.disk["file"], d.action) for d in live_plan.devices] == [(wanted, active_file, "merge")]


def test_an_unknown_device_is_refused_with_the_vms_disks(live: Load) -> None:
    fresh = live("mixed-fresh")
    with pytest.raises(ValidationError) as info:
        plan(fresh, devices=("drive0", "vda"))
    message = info.value.msg
    assert "Device 'vda' is not a disk of this VM" in message
    assert f"drive0 (node {fresh.disk('drive0')['node_name']}, qcow2, writable, /vms/disk0.qcow2)" in message
    assert f"drive1 (node {fresh.disk('drive1')['node_name']}, raw, writable, /vms/data.raw)" in message
    assert "read-only, /vms/seed.qcow2)" in message
    assert "vd2 (node disk2, qcow2, writable, /vms/disk2.qcow2)" in message
    assert info.value.details["device"] == "vda"


@pytest.mark.parametrize("recording", ["mixed-fresh", "chain-two-overlays"])
def test_the_same_disk_twice_is_refused(live: Load, recording: str) -> None:
    vm = live(recording)
    other_name = vm.disk("drive0")["node_name"] if recording == "mixed-fresh" else vm.node("/vms/a.qcow2")
    with pytest.raises(ValidationError, match="more than once") as info:
        plan(vm, mode="external", state="absent", devices=("drive0", other_name))
    assert info.value.details["device"] == other_name


# --- internal: present and absent -----------------------------------------------------------------------------


def test_a_raw_disk_is_refused_for_internal_snapshots_and_named(live: Load) -> None:
    with pytest.raises(ValidationError) as info:
        plan(live("mixed-fresh"))  # the default includes the raw drive1
    assert "Disk drive1 (/vms/data.raw) is raw; internal snapshots need qcow2" in info.value.msg
    assert info.value.details["device"] == "drive1"


def test_a_raw_disk_is_fine_for_external_snapshots(live: Load, tmp_path: t.Any) -> None:
    fresh = live("mixed-fresh", root=tmp_path)
    live_plan = plan(fresh, mode="external")
    assert actions(live_plan) == {"drive0": "create", "drive1": "create", "vd2": "create"}
    assert live_plan.devices[1].overlay == f"{tmp_path}/data.raw.vmsnap-new.qcow2"


@pytest.mark.parametrize("mode", ["internal", "external"])
def test_a_read_only_disk_named_explicitly_is_refused(live: Load, mode: str) -> None:
    with pytest.raises(ValidationError, match="Disk drive2 is read-only in the VM"):
        plan(live("mixed-fresh"), mode=mode, devices=("drive0", "drive2"))


def test_absent_on_a_read_only_disk_named_explicitly_is_a_no_op(live: Load) -> None:
    live_plan = plan(live("mixed-fresh"), state="absent", devices=("drive2",))
    assert actions(live_plan) == {"drive2": "none"} and not live_plan.changed


def test_internal_present_creates_on_every_chosen_disk_with_vmstate_in_the_first(live: Load) -> None:
    fresh = live("mixed-fresh")
    live_plan = plan(fresh, devices=("disk2", "drive0"))
    assert actions(live_plan) == {"disk2": "create", "drive0": "create"}
    assert live_plan.changed and live_plan.vmstate_node == "disk2"
    assert [d.result()["changed"] for d in live_plan.devices] == [True, True]


def test_internal_present_without_vmstate_names_no_vmstate_node(live: Load) -> None:
    live_plan = plan(live("mixed-fresh"), devices=("drive0", "disk2"), vmstate=False)
    assert actions(live_plan) == {"drive0": "create", "disk2": "create"}
    assert live_plan.vmstate_node is None


@pytest.mark.parametrize("name, vmstate", [("ckpt", True), ("diskonly", False), ("ckpt2", True), ("ckpt", False)])
def test_internal_present_is_unchanged_when_the_snapshot_is_on_every_disk(live: Load, name: str, vmstate: bool) -> None:
    live_plan = plan(live("mixed-snapshots"), name=name, devices=("drive0", "disk2"), vmstate=vmstate)
    assert actions(live_plan) == {"drive0": "none", "disk2": "none"}
    assert not live_plan.changed and live_plan.vmstate_node is None


def test_internal_present_with_vmstate_refuses_an_existing_disk_only_snapshot(live: Load) -> None:
    # "present" must not claim a checkpoint that a later live revert cannot load.
    with pytest.raises(ValidationError, match="exists on every chosen disk, but holds no RAM state"):
        plan(live("mixed-snapshots"), name="diskonly", devices=("drive0", "disk2"))


@pytest.mark.parametrize(
    "name, present_on, missing_on",
    [("partial", ["drive0"], ["disk2"]), ("dup", ["disk2"], ["drive0"])],
)
def test_internal_present_on_some_disks_only_is_inconsistent(
    live: Load, name: str, present_on: list[str], missing_on: list[str]
) -> None:
    with pytest.raises(ValidationError, match="the checkpoint is inconsistent") as info:
        plan(live("mixed-snapshots"), name=name, devices=("drive0", "disk2"))
    assert info.value.details["present_on"] == present_on
    assert info.value.details["missing_on"] == missing_on


def test_internal_absent_deletes_only_where_present(live: Load) -> None:
    snaps = live("mixed-snapshots")
    live_plan = plan(snaps, name="partial", state="absent")  # every writable disk, the raw one included
    assert actions(live_plan) == {"drive0": "delete", "drive1": "none", "vd2": "none"}
    both = plan(snaps, name="ckpt", state="absent")
    assert actions(both) == {"drive0": "delete", "drive1": "none", "vd2": "delete"}
    nowhere = plan(snaps, name="never-taken", state="absent")
    assert not nowhere.changed and set(actions(nowhere).values()) == {"none"}


# --- internal: reverted --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, devices, holder",
    [
        ("ckpt", ("drive0", "disk2"), "drive0"),
        ("ckpt", ("disk2", "drive0"), "drive0"),
        ("ckpt2", ("drive0", "disk2"), "disk2"),  # saved with vmstate in disk2, not in the first disk
    ],
)
def test_reverted_loads_from_the_disk_that_holds_the_vmstate(
    live: Load, name: str, devices: tuple[str, ...], holder: str
) -> None:
    snaps = live("mixed-snapshots")
    live_plan = plan(snaps, name=name, state="reverted", devices=devices)
    assert live_plan.vmstate_node == snaps.disk(holder)["node_name"]
    assert actions(live_plan) == dict.fromkeys(devices, "revert") and live_plan.changed


def test_reverted_of_a_disk_only_snapshot_is_refused(live: Load) -> None:
    with pytest.raises(ValidationError, match="holds no RAM state on the chosen disks \\(it is disk-only"):
        plan(live("mixed-snapshots"), name="diskonly", state="reverted", devices=("drive0", "disk2"))


def test_reverted_warns_about_writable_disks_left_out(live: Load) -> None:
    live_plan = plan(live("mixed-snapshots"), name="ckpt", state="reverted", devices=("drive0", "disk2"))
    assert actions(live_plan) == {"drive0": "revert", "disk2": "revert"}
    (warning,) = live_plan.warnings
    assert warning.startswith("The revert brings back RAM but leaves the writable disks drive1 out.")
    without_raw = live("mixed-snapshots")
    without_raw.vm["block_devices"] = [d for d in without_raw.vm["block_devices"] if d["device"] != "drive1"]
    assert plan(without_raw, name="ckpt", state="reverted", devices=("drive0", "disk2")).warnings == []


def test_reverted_when_missing_on_a_disk_is_refused(live: Load) -> None:
    with pytest.raises(ValidationError, match="does not exist on disk2; nothing was reverted") as info:
        plan(live("mixed-snapshots"), name="partial", state="reverted", devices=("drive0", "disk2"))
    assert info.value.details["missing_on"] == ["disk2"]


def test_reverted_with_duplicate_names_is_refused(live: Load) -> None:
    with pytest.raises(ValidationError, match="has 2 snapshots named 'dup' \\(IDs 1, 2\\); refusing to guess"):
        plan(live("mixed-snapshots"), name="dup", state="reverted", devices=("disk2",))


def test_reverted_with_a_dirty_bitmap_is_refused_as_qemu_would(live: Load) -> None:
    with pytest.raises(ValidationError) as info:
        plan(live("mixed-bitmap"), name="ckpt", state="reverted", devices=("drive0", "disk2"))
    assert "On disk drive0, bitmap 'bm0' belongs to another tool (not vmsnap.qemu)." in info.value.msg
    assert "Device has active dirty bitmaps" not in info.value.msg  # named, not QEMU's words
    assert info.value.details["bitmaps"] == ["bm0"] and info.value.details["foreign_bitmaps"] == ["bm0"]
    # The same load, sent to the recorded VM, failed with that error and left it paused in restore-vm.
    after = live("mixed-restore-vm")
    assert after.load_error is not None and "Device has active dirty bitmaps" in after.load_error
    assert after.vm["status"] == "restore-vm"


def test_reverted_with_a_block_jobs_unnamed_bitmap_is_refused_cleanly(live: Load) -> None:
    mirror = live("mixed-mirror-job")
    assert mirror.disk("drive0")["bitmaps"] and "name" not in mirror.disk("drive0")["bitmaps"][0]
    with pytest.raises(ValidationError, match="dirty bitmap"):
        plan(mirror, name="ckpt", state="reverted", devices=("drive0", "disk2"))


def test_reverted_without_vmstate_is_refused(live: Load) -> None:
    with pytest.raises(ValidationError, match="disk-only internal snapshot cannot be reverted in a running VM"):
        plan(live("mixed-snapshots"), name="ckpt", state="reverted", vmstate=False, devices=("drive0", "disk2"))


def test_external_reverted_is_refused(live: Load) -> None:
    with pytest.raises(ValidationError, match="External snapshots cannot be reverted in a running VM"):
        plan(live("chain-two-overlays"), name="e1", mode="external", state="reverted")


# --- QEMU versions -------------------------------------------------------------------------------------------


def test_old_qemu_refuses_an_internal_snapshot_with_vmstate(live: Load) -> None:
    with pytest.raises(ValidationError, match="this VM runs QEMU 5.2.0"):
        plan(live("mixed-fresh"), devices=("drive0", "disk2"), version=OLD_QEMU)


def test_old_qemu_refuses_reverted(live: Load) -> None:
    with pytest.raises(ValidationError, match="Reverting a running VM needs QMP snapshot-save/snapshot-load"):
        plan(live("mixed-snapshots"), name="ckpt", state="reverted", devices=("drive0", "disk2"), version=OLD_QEMU)


def test_old_qemu_allows_disk_only_snapshots_and_deletes(live: Load) -> None:
    fresh = live("mixed-fresh")
    disk_only = plan(fresh, devices=("drive0", "disk2"), vmstate=False, version=OLD_QEMU)
    assert actions(disk_only) == {"drive0": "create", "disk2": "create"}
    absent = plan(live("mixed-snapshots"), name="ckpt", state="absent", devices=("drive0",), version=OLD_QEMU)
    assert actions(absent) == {"drive0": "delete"}


def test_old_qemu_is_not_asked_about_an_unchanged_snapshot(live: Load) -> None:
    live_plan = plan(live("mixed-snapshots"), name="ckpt", devices=("drive0", "disk2"), version=OLD_QEMU)
    assert not live_plan.changed


# --- external ------------------------------------------------------------------------------------------------


def test_external_present_puts_each_overlay_beside_the_disks_active_file(live: Load, tmp_path: t.Any) -> None:
    chain = live("chain-two-overlays", root=tmp_path)
    live_plan = plan(chain, name="e3", mode="external")
    assert [(d.action, d.overlay, d.overlay_index) for d in live_plan.devices] == [
        ("create", f"{tmp_path}/a.vmsnap-e3.qcow2", None),  # the stem of a.vmsnap-e2.qcow2 is a
        ("create", f"{tmp_path}/b.vmsnap-e3.qcow2", None),
    ]
    assert live_plan.vmstate_node is None and live_plan.changed


def test_external_with_vmstate_plans_a_state_file_beside_the_first_disk(live: Load, tmp_path: t.Any) -> None:
    chain = live("chain-two-overlays", root=tmp_path)
    live_plan = plan(chain, name="e3", mode="external", vmstate=True)
    assert live_plan.state_file == f"{tmp_path}/a.vmsnap-e3.vmstate" and live_plan.state_file_action == "create"
    assert [d.action for d in live_plan.devices] == ["create", "create"] and live_plan.changed
    assert live_plan.diff()["before"]["vmstate_file"] is None
    assert live_plan.diff()["after"]["vmstate_file"] == f"{tmp_path}/a.vmsnap-e3.vmstate"


def test_external_with_vmstate_warns_about_writable_disks_left_out(live: Load, tmp_path: t.Any) -> None:
    fresh = live("mixed-fresh", root=tmp_path)
    live_plan = plan(fresh, name="ckpt", mode="external", vmstate=True, devices=("drive0",))
    (warning,) = live_plan.warnings
    assert warning.startswith("The checkpoint saves RAM but leaves the writable disks drive1, vd2 out.")
    assert plan(fresh, name="ckpt", mode="external", devices=("drive0",)).warnings == []  # disk-only: no RAM


def test_external_vmstate_defaults_to_false_and_internal_to_true() -> None:
    assert LiveRequest(name="x", mode="external").vmstate is False
    assert LiveRequest(name="x").vmstate is True
    assert LiveRequest(name="x", mode="external", vmstate=True).vmstate is True


def test_external_checkpoint_with_ram_needs_its_state_file(live: Load, tmp_path: t.Any) -> None:
    chain = live("chain-two-overlays", root=tmp_path)
    with pytest.raises(ValidationError, match="has its overlays, but no RAM state file .*a.vmsnap-e1.vmstate"):
        plan(chain, name="e1", mode="external", vmstate=True)
    (tmp_path / "a.vmsnap-e1.vmstate").write_bytes(b"QEVM")
    (tmp_path / "a.vmsnap-e1.vmstate.json").write_text("{}")
    complete = plan(chain, name="e1", mode="external", vmstate=True)
    assert not complete.changed and complete.state_file == f"{tmp_path}/a.vmsnap-e1.vmstate"
    assert not plan(chain, name="e1", mode="external").changed  # disk-only asks nothing of a state file


def test_external_with_vmstate_refuses_a_state_file_without_overlays(live: Load, tmp_path: t.Any) -> None:
    chain = live("chain-two-overlays", root=tmp_path)
    (tmp_path / "a.vmsnap-e3.vmstate").write_bytes(b"QEVM")
    with pytest.raises(ValidationError, match="already exists, but the disks have no overlays"):
        plan(chain, name="e3", mode="external", vmstate=True)


def test_external_absent_deletes_the_state_file_when_there_is_one(live: Load, tmp_path: t.Any) -> None:
    chain = live("chain-two-overlays", root=tmp_path)
    without = plan(chain, name="e1", mode="external", state="absent")
    assert without.state_file is None and without.state_file_action == "none"
    (tmp_path / "a.vmsnap-e1.vmstate.json").write_text("{}")  # a sidecar alone is removed too
    with_state = plan(chain, name="e1", mode="external", state="absent")
    assert with_state.state_file_action == "delete" and with_state.state_file == f"{tmp_path}/a.vmsnap-e1.vmstate"
    # Overlays already merged away, state file left: absent still removes it.
    gone = plan(chain, name="e9", mode="external", state="absent")
    assert not gone.changed
    (tmp_path / "a.vmsnap-e9.vmstate").write_bytes(b"QEVM")
    assert plan(chain, name="e9", mode="external", state="absent").state_file_action == "delete"


@pytest.mark.parametrize("status", ["prelaunch", "postmigrate"])
def test_external_with_vmstate_refuses_a_vm_that_cannot_be_saved(live: Load, tmp_path: t.Any, status: str) -> None:
    chain = live("chain-two-overlays", root=tmp_path)
    chain.vm["status"] = status
    with pytest.raises(ValidationError, match=f"status '{status}'; a checkpoint with RAM needs it running or paused"):
        plan(chain, name="e3", mode="external", vmstate=True)
    assert plan(chain, name="e3", mode="external").changed  # without RAM there is nothing to save


def test_external_with_vmstate_is_not_quiesced(live: Load, tmp_path: t.Any) -> None:
    chain = live("chain-two-overlays", root=tmp_path)
    with pytest.raises(ValidationError, match="quiesce does not apply to snapshots with vmstate"):
        plan(chain, name="e3", mode="external", vmstate=True, quiesce="required", guest_agent_socket=AGENT)


def test_external_present_in_overlay_dir(live: Load, tmp_path: t.Any) -> None:
    (tmp_path / "ov").mkdir()
    live_plan = plan(live("mixed-fresh", root=tmp_path), mode="external", overlay_dir=f"{tmp_path}/ov")
    assert [d.overlay for d in live_plan.devices] == [
        f"{tmp_path}/ov/disk0.vmsnap-new.qcow2",
        f"{tmp_path}/ov/data.raw.vmsnap-new.qcow2",
        f"{tmp_path}/ov/disk2.vmsnap-new.qcow2",
    ]


def test_external_present_in_a_missing_folder_is_refused(live: Load) -> None:
    with pytest.raises(ValidationError, match="The overlay folder /vms does not exist"):
        plan(live("mixed-fresh"), mode="external", devices=("drive0",))


@pytest.mark.parametrize("kind", ["file", "dangling-symlink"])
def test_external_present_refuses_an_existing_overlay_file(live: Load, tmp_path: t.Any, kind: str) -> None:
    existing = tmp_path / "disk2.vmsnap-new.qcow2"
    if kind == "file":
        existing.write_bytes(b"someone else's data")
    else:
        existing.symlink_to(tmp_path / "nowhere")
    with pytest.raises(ValidationError, match="already exists but is not part of that disk's chain") as info:
        plan(live("mixed-fresh", root=tmp_path), mode="external", devices=("drive0", "disk2"))
    assert info.value.details["overlay"] == str(existing)
    assert os.path.lexists(existing)


@pytest.mark.parametrize("name", ["a/b", "../up", "/abs", ".", ".."])
@pytest.mark.parametrize("state", ["present", "absent"])
def test_external_names_that_are_not_file_names_are_refused(live: Load, tmp_path: t.Any, name: str, state: str) -> None:
    with pytest.raises(ValidationError, match="must not contain '/'"):
        plan(live("mixed-fresh", root=tmp_path), name=name, mode="external", state=state)


def test_internal_names_may_contain_a_slash(live: Load) -> None:
    live_plan = plan(live("mixed-fresh"), name="a/b", devices=("drive0",))
    assert actions(live_plan) == {"drive0": "create"}


def test_external_overlay_file_names_longer_than_255_bytes_are_refused(live: Load, tmp_path: t.Any) -> None:
    fresh = live("mixed-fresh", root=tmp_path)
    fits = "x" * (255 - len("disk0.vmsnap-.qcow2"))
    assert plan(fresh, name=fits, mode="external", devices=("drive0",)).changed
    with pytest.raises(ValidationError, match="longer than 255 bytes"):
        plan(fresh, name=fits + "x", mode="external", devices=("drive0",))


@pytest.mark.parametrize("name, index", [("e1", 1), ("e2", 0)])
def test_external_present_is_unchanged_when_every_chain_has_the_overlay(live: Load, name: str, index: int) -> None:
    live_plan = plan(live("chain-two-overlays"), name=name, mode="external")  # /vms need not exist: nothing is new
    assert not live_plan.changed
    assert [(d.overlay, d.overlay_index) for d in live_plan.devices] == [
        (f"/vms/a.vmsnap-{name}.qcow2", index),
        (f"/vms/b.vmsnap-{name}.qcow2", index),
    ]


def test_external_absent_merges_only_existing_overlays(live: Load) -> None:
    chain = live("chain-two-overlays")
    live_plan = plan(chain, name="e1", mode="external", state="absent", devices=("drive0",))
    assert [(d.action, d.overlay, d.overlay_index) for d in live_plan.devices] == [
        ("merge", "/vms/a.vmsnap-e1.qcow2", 1)
    ]
    merged = plan(live("chain-e1-merged"), name="e1", mode="external", state="absent")
    assert not merged.changed and [d.overlay for d in merged.devices] == [None, None]


def test_external_present_on_some_disks_only_is_inconsistent(live: Load) -> None:
    chain = live("chain-two-overlays")
    chain.vm["block_devices"][1]["chain"] = chain.vm["block_devices"][1]["chain"][1:]  # drop b.vmsnap-e2 only
    with pytest.raises(ValidationError, match="the checkpoint is inconsistent") as info:
        plan(chain, name="e2", mode="external")
    assert info.value.details["present_on"] == ["drive0"]


def test_two_disks_are_never_given_the_same_overlay_file(live: Load, tmp_path: t.Any) -> None:
    twins = live("twins", root=tmp_path)
    for folder in ("ov", "web", "db"):
        (tmp_path / folder).mkdir()
    beside = plan(twins, name="s", mode="external")
    assert [d.overlay for d in beside.devices] == [
        f"{tmp_path}/web/disk.vmsnap-s.qcow2",
        f"{tmp_path}/db/disk.vmsnap-s.qcow2",
    ]
    with pytest.raises(ValidationError, match="would both get the overlay file"):
        plan(twins, name="s", mode="external", overlay_dir=f"{tmp_path}/ov")


# --- overlay names -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "disk_file, stem",
    [
        ("/vms/a.qcow2", "a"),
        ("/vms/a.vmsnap-e1.qcow2", "a"),
        ("/ov/a.vmsnap-e1.vmsnap-x.qcow2", "a"),
        ("/vms/data.raw", "data.raw"),
        ("/vms/data.raw.vmsnap-e1.qcow2", "data.raw"),
        ("/vms/disk.img", "disk.img"),
    ],
)
def test_disk_stem(disk_file: str, stem: str) -> None:
    assert disk_stem(disk_file) == stem


def test_overlay_path_beside_the_file_or_in_overlay_dir() -> None:
    assert overlay_path("/vms/a.vmsnap-e1.qcow2", "e2", None) == "/vms/a.vmsnap-e2.qcow2"
    assert overlay_path("/vms/a.qcow2", "e2", "/ov") == "/ov/a.vmsnap-e2.qcow2"
    assert overlay_path("/vms/data.raw", "pre upgrade", None) == "/vms/data.raw.vmsnap-pre upgrade.qcow2"


def test_find_overlay_in_recorded_chains(live: Load) -> None:
    two = live("chain-two-overlays").disk("drive0")["chain"]
    assert [layer["filename"] for layer in two] == ["/vms/a.vmsnap-e2.qcow2", "/vms/a.vmsnap-e1.qcow2", "/vms/a.qcow2"]
    assert (find_overlay(two, "e2"), find_overlay(two, "e1"), find_overlay(two, "a")) == (0, 1, None)
    merged = live("chain-e1-merged").disk("drive0")["chain"]
    assert [layer["filename"] for layer in merged] == ["/vms/a.vmsnap-e2.qcow2", "/vms/a.qcow2"]
    assert (find_overlay(merged, "e2"), find_overlay(merged, "e1")) == (0, None)


def test_find_overlay_finds_an_intermediate_overlay_after_the_one_below_it_was_merged(live: Load) -> None:
    recording = live("chain-e3-over-merged")
    for disk, stem in zip(recording.vm["block_devices"], ("a", "b")):
        chain = disk["chain"]
        assert [layer["filename"] for layer in chain] == [
            f"/vms/{stem}.vmsnap-e3.qcow2",
            f"/vms/{stem}.vmsnap-e2.qcow2",
            f"/vms/{stem}.qcow2",
        ]
        assert (find_overlay(chain, "e3"), find_overlay(chain, "e2"), find_overlay(chain, "e1")) == (0, 1, None)
    live_plan = plan(recording, name="e2", mode="external", state="absent")
    assert [(d.action, d.overlay_index) for d in live_plan.devices] == [("merge", 1), ("merge", 1)]


def test_find_overlay_matches_file_names_not_folders() -> None:
    chain = [{"filename": "/ov/a.vmsnap-e1.qcow2"}, {"filename": "/vms/a.qcow2"}]
    assert find_overlay(chain, "e1") == 0
    assert find_overlay([{"filename": "/vms/b.vmsnap-e1.qcow2"}, {"filename": "/vms/a.qcow2"}], "e1") is None
    assert find_overlay([{"filename": "/vms/a.vmsnap-e1.qcow2"}], "e1") is None  # a lone file is no overlay


# --- quiesce -------------------------------------------------------------------------------------------------

AGENT = "/run/vms/web01.qga"


@pytest.mark.parametrize("quiesce", ["best_effort", "required"])
@pytest.mark.parametrize("kwargs", [{"mode": "internal", "vmstate": False}, {"mode": "external"}])
def test_quiesce_with_an_agent_socket_is_planned(
    live: Load, tmp_path: t.Any, quiesce: str, kwargs: dict[str, t.Any]
) -> None:
    live_plan = plan(
        live("mixed-fresh", root=tmp_path),
        devices=("drive0", "disk2"),
        quiesce=quiesce,
        guest_agent_socket=AGENT,
        **kwargs,
    )
    assert live_plan.changed and live_plan.quiesce and live_plan.warnings == []


def test_quiesce_off_is_not_planned(live: Load) -> None:
    live_plan = plan(live("mixed-fresh"), devices=("drive0",), vmstate=False, guest_agent_socket=AGENT)
    assert not live_plan.quiesce and live_plan.warnings == []


def test_quiesce_with_vmstate_required_is_refused_and_best_effort_warns(live: Load) -> None:
    fresh = live("mixed-fresh")
    with pytest.raises(ValidationError, match="quiesce does not apply to snapshots with vmstate"):
        plan(fresh, devices=("drive0",), quiesce="required", guest_agent_socket=AGENT)
    live_plan = plan(fresh, devices=("drive0",), quiesce="best_effort", guest_agent_socket=AGENT)
    assert not live_plan.quiesce and live_plan.changed
    assert len(live_plan.warnings) == 1 and live_plan.warnings[0].endswith("Not quiescing.")


def test_quiesce_without_an_agent_socket(live: Load) -> None:
    fresh = live("mixed-fresh")
    with pytest.raises(ValidationError, match="quiesce=required needs guest_agent_socket"):
        plan(fresh, devices=("drive0",), vmstate=False, quiesce="required")
    live_plan = plan(fresh, devices=("drive0",), vmstate=False, quiesce="best_effort")
    assert not live_plan.quiesce
    assert live_plan.warnings == ["quiesce=best_effort without guest_agent_socket: the snapshot is crash-consistent."]


@pytest.mark.parametrize("state", ["present", "absent"])
def test_quiesce_is_not_used_when_nothing_is_taken(live: Load, state: str) -> None:
    # ckpt is on both disks: present changes nothing, absent deletes; neither freezes, and neither needs the agent.
    live_plan = plan(
        live("mixed-snapshots"),
        name="ckpt",
        state=state,
        vmstate=False,
        devices=("drive0", "disk2"),
        quiesce="required",
    )
    assert live_plan.changed is (state == "absent")
    assert not live_plan.quiesce and live_plan.warnings == []


# --- VM status and jobs --------------------------------------------------------------------------------------


@pytest.mark.parametrize("state", ["present", "reverted"])
def test_a_vm_left_in_restore_vm_is_refused(live: Load, state: str) -> None:
    restore = live("mixed-restore-vm")
    with pytest.raises(ValidationError, match="The VM is in status 'restore-vm'; refusing") as info:
        plan(restore, name="ckpt", state=state, vmstate=False, devices=("drive0", "disk2"))
    assert info.value.details["vm_status"] == "restore-vm"


def test_a_vm_left_in_restore_vm_may_still_delete(live: Load) -> None:
    live_plan = plan(live("mixed-restore-vm"), name="ckpt", state="absent", devices=("drive0", "disk2"))
    assert actions(live_plan) == {"drive0": "delete", "disk2": "delete"}
    assert live_plan.vm_running is False


@pytest.mark.parametrize("state", ["present", "absent"])
def test_a_running_vmsnap_job_is_refused(live: Load, state: str) -> None:
    with pytest.raises(ValidationError, match="vmsnap job vmsnap-commit-4242-17 \\(commit\\) is still ready") as info:
        plan(live("chain-job-ready"), name="e2", mode="external", state=state)
    assert info.value.details["job_id"] == "vmsnap-commit-4242-17"


def test_a_concluded_vmsnap_job_is_not_in_the_way(live: Load) -> None:
    recording = live("chain-job-concluded")
    assert recording.vm["jobs"][0]["status"] == "concluded"
    live_plan = plan(recording, name="e2", mode="external", state="absent")
    assert actions(live_plan) == {"drive0": "merge", "vd2": "merge"}


def test_someone_elses_running_job_is_not_refused(live: Load) -> None:
    mirror = live("mixed-mirror-job")
    assert [(job["id"], job["status"]) for job in mirror.vm["jobs"]] == [("nightly-copy", "ready")]
    assert actions(plan(mirror, devices=("drive0", "disk2"))) == {"drive0": "create", "disk2": "create"}


# --- pause_ms ------------------------------------------------------------------------------------------------


def test_pause_ms_of_two_recorded_snapshot_saves(live: Load) -> None:
    events = live("mixed-snapshots").events
    assert [event["event"] for event in events] == ["STOP", "RESUME", "STOP", "RESUME"]
    assert pause_ms(events[:2]) == 52.774
    assert pause_ms(events[2:]) == 21.675
    assert pause_ms(events) == 74.449


def test_pause_ms_of_a_recorded_stop_without_resume(live: Load) -> None:
    events = live("mixed-restore-vm").events
    assert [event["event"] for event in events] == ["STOP"]
    assert pause_ms(events) == 0.0
    pairs = live("mixed-snapshots").events
    assert pause_ms([*pairs[:2], *events]) == 52.774


def test_pause_ms_pairs_each_stop_with_the_next_resume() -> None:
    def event(name: str, seconds: int, microseconds: int) -> dict[str, t.Any]:
        return {"event": name, "timestamp": {"seconds": seconds, "microseconds": microseconds}}

    assert pause_ms([]) == 0.0
    assert pause_ms([event("RESUME", 5, 0), event("STOP", 10, 999_000), event("RESUME", 11, 1_000)]) == 2.0
    assert pause_ms([event("STOP", 10, 0), event("STOP", 10, 500_000), event("RESUME", 11, 0)]) == 1000.0
    assert pause_ms([event("STOP", 1, 0), event("SHUTDOWN", 1, 5), event("RESUME", 1, 250)]) == 0.25


# --- diff ----------------------------------------------------------------------------------------------------


def test_diff_of_internal_present(live: Load) -> None:
    live_plan = plan(live("mixed-fresh"), devices=("drive0", "disk2"))
    assert live_plan.diff() == {
        "before": {"drive0": [], "disk2": ["dup", "dup"]},
        "after": {"drive0": ["new"], "disk2": ["dup", "dup", "new"]},
    }


def test_diff_of_internal_absent_and_reverted(live: Load) -> None:
    snaps = live("mixed-snapshots")
    absent = plan(snaps, name="partial", state="absent", devices=("drive0", "disk2")).diff()
    assert absent["before"]["drive0"] == ["ckpt", "diskonly", "partial", "ckpt2"]
    assert absent["after"] == {"drive0": ["ckpt", "diskonly", "ckpt2"], "disk2": absent["before"]["disk2"]}
    reverted = plan(snaps, name="ckpt", state="reverted", devices=("drive0", "disk2")).diff()
    assert reverted["after"] == reverted["before"]


def test_diff_of_external_present(live: Load, tmp_path: t.Any) -> None:
    live_plan = plan(live("chain-two-overlays", root=tmp_path), name="e3", mode="external", devices=("drive0",))
    files = [f"{tmp_path}/a.vmsnap-e2.qcow2", f"{tmp_path}/a.vmsnap-e1.qcow2", f"{tmp_path}/a.qcow2"]
    assert live_plan.diff() == {
        "before": {"drive0": files},
        "after": {"drive0": [f"{tmp_path}/a.vmsnap-e3.qcow2", *files]},
    }


@pytest.mark.parametrize(
    "name, after", [("e1", ["a.vmsnap-e2.qcow2", "a.qcow2"]), ("e2", ["a.vmsnap-e1.qcow2", "a.qcow2"])]
)
def test_diff_of_external_absent(live: Load, name: str, after: list[str]) -> None:
    live_plan = plan(live("chain-two-overlays"), name=name, mode="external", state="absent", devices=("drive0",))
    diff = live_plan.diff()
    assert diff["before"]["drive0"] == ["/vms/a.vmsnap-e2.qcow2", "/vms/a.vmsnap-e1.qcow2", "/vms/a.qcow2"]
    assert diff["after"]["drive0"] == [f"/vms/{file}" for file in after]


def test_diff_of_an_unchanged_plan_is_empty(live: Load) -> None:
    diff = plan(live("chain-two-overlays"), name="e1", mode="external").diff()
    assert diff["before"] == diff["after"] and len(diff["before"]) == 2


def test_pause_ms_counts_an_open_stop_until_the_given_moment() -> None:
    def event(name: str, seconds: int, micro: int) -> dict[str, t.Any]:
        return {"event": name, "timestamp": {"seconds": seconds, "microseconds": micro}}

    open_stop = [event("STOP", 1, 0), event("RESUME", 1, 500_000), event("STOP", 10, 0)]
    assert pause_ms(open_stop) == 500.0
    assert pause_ms(open_stop, until=12.25) == 2750.0
    assert still_paused(open_stop) is True
    assert still_paused(open_stop[:2]) is False
    assert still_paused([]) is False


def test_the_fingerprint_sees_new_snapshots_and_overlays(live: Load) -> None:
    fresh, snaps, chain = live("mixed-fresh"), live("mixed-snapshots"), live("chain-two-overlays")
    # What a task does not change (run status, jobs, bitmaps, sizes, snapshot dates) leaves it as it was ...
    unchanged = copy.deepcopy(fresh.vm)
    unchanged["status"], unchanged["running"] = "paused", False
    unchanged["jobs"] = [{"id": "j", "type": "mirror", "status": "running"}]
    for disk in unchanged["block_devices"]:
        disk["bitmaps"] = [{"name": "other", "count": 5}]
        for layer in disk["chain"]:
            layer["actual_size"] = (layer.get("actual_size") or 0) + 65536
        for snap in disk["snapshots"]:
            snap["date_epoch"] += 1
    assert vm_fingerprint(unchanged) == vm_fingerprint(fresh.vm)
    # ... and each thing it can change, on one disk, changes it.
    for change in ("snapshot", "overlay", "device"):
        changed = copy.deepcopy(fresh.vm)
        disk = changed["block_devices"][-1]
        if change == "snapshot":
            disk["snapshots"].append({"name": "new"})
        elif change == "overlay":
            disk["chain"].insert(0, {"filename": "/vms/overlay.qcow2"})
        else:
            disk["device"] = "renamed"
        assert vm_fingerprint(changed) != vm_fingerprint(fresh.vm), change
    assert vm_fingerprint(fresh.vm) != vm_fingerprint(snaps.vm)
    merged = live("chain-e1-merged")
    assert vm_fingerprint(chain.vm) != vm_fingerprint(merged.vm)
