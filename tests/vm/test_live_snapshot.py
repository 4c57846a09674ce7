# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""vmsnap.qemu.qmp_live_snapshot against a real running Linux guest, through ansible itself.

What the guest sees is checked inside the guest: its files, its shell, its guest agent's freeze state.
The collection is taken from $ANSIBLE_COLLECTIONS_PATH (`make vm-tests` points it at build/src).
"""

from __future__ import annotations

import json
import subprocess
import typing as t
from pathlib import Path

import pytest
from conftest import guest_ok, read_fresh
from conftest import run_module as run_vmsnap_module
from tiny_guest import GuestVM

MODULE = "vmsnap.qemu.qmp_live_snapshot"


def run_module(**args: t.Any) -> dict[str, t.Any]:
    return run_vmsnap_module(MODULE, **args)


def test_internal_vmstate_revert_brings_back_disk_and_running_guest(vm: GuestVM) -> None:
    guest_ok(vm, "echo old > /mnt/data/state.txt; sync")
    guest_ok(vm, "echo 'shell state before' > /run/in-ram.txt")
    taken = run_module(socket=str(vm.qmp_socket), name="pre-upgrade")
    assert not taken["failed"], taken
    assert taken["changed"] and taken["downtime_ms"] > 0
    assert [device["action"] for device in taken["devices"]] == ["create"]

    guest_ok(vm, "echo new > /mnt/data/state.txt; echo broken > /mnt/data/upgrade.txt; sync")
    guest_ok(vm, "echo 'shell state after' > /run/in-ram.txt")

    reverted = run_module(socket=str(vm.qmp_socket), name="pre-upgrade", state="reverted")
    assert not reverted["failed"], reverted
    assert reverted["changed"] and reverted["vm_status"] == "running"
    assert reverted["downtime_ms"] > 0
    # The same running guest answers, with its RAM (a tmpfs file) and its disk as they were.
    assert guest_ok(vm, "echo alive") == "alive\n"
    assert guest_ok(vm, "cat /run/in-ram.txt") == "shell state before\n"
    assert read_fresh(vm, "/mnt/data/state.txt") == "old\n"
    rc, out = vm.run("cat /mnt/data/upgrade.txt")
    assert rc != 0, out
    assert vm.poweroff() == 0


def test_external_quiesced_snapshot_freezes_and_merge_keeps_new_data(vm: GuestVM, disk: Path) -> None:
    guest_ok(vm, "echo before > /mnt/data/a.txt; sync")
    taken = run_module(
        socket=str(vm.qmp_socket),
        name="nightly",
        mode="external",
        quiesce="required",
        guest_agent_socket=str(vm.qga_socket),
    )
    assert not taken["failed"], taken
    assert taken["changed"] and taken["frozen"] is True
    assert taken["frozen_filesystems"] == 1  # /dev/vda on /mnt/data
    assert 0 < taken["frozen_ms"] < 10_000
    assert taken["downtime_ms"] == 0
    overlay = disk.with_name("data.vmsnap-nightly.qcow2")
    assert taken["devices"][0]["overlay"] == str(overlay)
    assert overlay.is_file()
    # Thawed afterwards: the agent says so and the guest can write again.
    assert vm.agent("guest-fsfreeze-status") == {"return": "thawed"}
    guest_ok(vm, "echo during > /mnt/data/b.txt; sync")

    merged = run_module(socket=str(vm.qmp_socket), name="nightly", mode="external", state="absent")
    assert not merged["failed"], merged
    assert merged["changed"] and merged["deleted_overlays"] == [str(overlay)]
    assert not overlay.exists()
    # The guest now reads from the base disk only, and sees what it wrote while the overlay was on top.
    assert read_fresh(vm, "/mnt/data/a.txt") == "before\n"
    assert read_fresh(vm, "/mnt/data/b.txt") == "during\n"
    assert vm.poweroff() == 0
    check = subprocess.run(
        ["qemu-img", "info", "--output=json", str(disk)], capture_output=True, text=True, check=True, timeout=60
    )
    assert "backing-filename" not in json.loads(check.stdout)


@pytest.mark.parametrize("quiesce", ["required", "best_effort"])
def test_disk_only_snapshot_with_agent_is_frozen(vm: GuestVM, quiesce: str) -> None:
    taken = run_module(
        socket=str(vm.qmp_socket),
        name=f"quick-{quiesce}",
        vmstate=False,
        quiesce=quiesce,
        guest_agent_socket=str(vm.qga_socket),
    )
    assert not taken["failed"], taken
    assert taken["frozen"] is True and taken["frozen_filesystems"] == 1
    assert taken["downtime_ms"] == 0
    assert vm.agent("guest-fsfreeze-status") == {"return": "thawed"}
    guest_ok(vm, "echo writable > /mnt/data/c.txt; sync")
    assert vm.poweroff() == 0


def test_guest_frozen_by_someone_else_is_refused_and_left_frozen(vm: GuestVM) -> None:
    assert vm.agent("guest-fsfreeze-freeze") == {"return": 1}
    vm.agent_disconnect()  # QEMU serves one client at a time on the agent's socket
    refused = run_module(
        socket=str(vm.qmp_socket),
        name="overlay",
        mode="external",
        quiesce="required",
        guest_agent_socket=str(vm.qga_socket),
    )
    assert refused["failed"] and not refused["changed"]
    assert "already frozen" in refused["msg"]
    assert "no snapshot was taken" in refused["msg"]
    assert vm.agent("guest-fsfreeze-status") == {"return": "frozen"}  # not ours to thaw
    assert vm.agent("guest-fsfreeze-thaw") == {"return": 1}
    assert vm.poweroff() == 0
