# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Fixtures shared by the tiny-guest tests: the guest is built once per session into a cache folder."""

from __future__ import annotations

import json
import os
import typing as t
from pathlib import Path

import pytest
from ansible_server import run_ansible
from tiny_guest import GuestImage, GuestVM, build_tiny_guest, default_cache_dir, make_ext4_qcow2

REPO = Path(__file__).resolve().parents[2]
BOOT_TIMEOUT = 90.0
ANSIBLE = Path(os.environ.get("VMSNAP_ANSIBLE") or REPO / ".venv" / "bin" / "ansible")


def run_module(module: str, *, check: bool = False, diff: bool = False, **args: t.Any) -> dict[str, t.Any]:
    """Run a module as an ad-hoc task on localhost and return its result (failed ones too).

    The collection is taken from $ANSIBLE_COLLECTIONS_PATH (`make vm-tests` points it at build/src). The command
    runs through ansible_server.py: ansible's own CLI without its start-up cost.
    """
    env = dict(os.environ, ANSIBLE_LOCALHOST_WARNING="0", ANSIBLE_INVENTORY_UNPARSED_WARNING="0", LANG="C.UTF-8")
    env.setdefault("ANSIBLE_COLLECTIONS_PATH", str(REPO / "build" / "src"))
    env.setdefault("ANSIBLE_PIPELINING", "1")  # one process per task instead of a temp file and three commands
    argv = [str(ANSIBLE), "localhost", "-c", "local", "-m", module, "-a", json.dumps(args)]
    argv += ["--check"] if check else []
    argv += ["--diff"] if diff else []
    proc = run_ansible(argv, env, timeout=300)
    marker = proc.stdout.find(" => {")
    assert marker >= 0, f"no result from ansible (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    end = proc.stdout.rfind("\n}") + 2  # --diff prints the diff before the result
    result = json.loads(proc.stdout[marker + len(" => ") : end])
    result["failed"] = bool(result.get("failed")) or "| FAILED" in proc.stdout[:marker]
    result["_stdout"] = proc.stdout
    return t.cast("dict[str, t.Any]", result)


def cache_dir() -> Path:
    return default_cache_dir()


def guest_ok(vm: GuestVM, cmd: str) -> str:
    rc, out = vm.run(cmd)
    assert rc == 0, f"{cmd!r} failed in the guest ({rc}): {out}"
    return out


def read_fresh(vm: GuestVM, path: str) -> str:
    """Read a guest file from the disk, not from the guest's page cache."""
    return guest_ok(vm, f"sync; echo 3 > /proc/sys/vm/drop_caches; cat {path}")


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    return build_tiny_guest(cache_dir())


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    return make_ext4_qcow2(tmp_path / "data.qcow2", size_mib=64)


@pytest.fixture
def vm(guest_image: GuestImage, disk: Path, tmp_path: Path) -> t.Iterator[GuestVM]:
    work = tmp_path / "vm"
    with GuestVM(guest_image, [disk], work) as guest:
        guest.wait_ready(BOOT_TIMEOUT)
        yield guest
    # __exit__ killed QEMU by PID if a test left it running
    assert guest.returncode is not None


@pytest.fixture
def fleet_dir(tmp_path: Path) -> t.Iterator[Path]:
    """A folder for a fleet of VMs without a guest OS (tests/vm/fleet.py) and their manifests; kills its VMs."""
    from fleet import NoOsVM

    (tmp_path / "manifests").mkdir()
    yield tmp_path
    for vm_dir in tmp_path.iterdir():
        if (vm_dir / "qemu.pid").exists():
            NoOsVM(tmp_path, vm_dir.name).kill()
