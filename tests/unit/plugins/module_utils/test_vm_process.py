# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The pure parts of _vm_process (plan, unit names, quoting for systemd) and its readings of real processes and
real sockets. Starting and stopping real QEMU is tested in tests/vm/test_qemu_vm.py."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import time
import typing as t
from pathlib import Path

import pytest

from ansible_collections.vmsnap.qemu.plugins.module_utils._errors import ValidationError, VmsnapError
from ansible_collections.vmsnap.qemu.plugins.module_utils._vm_process import (
    ENV_VAR,
    Plan,
    StartMethod,
    VmProcessError,
    VmState,
    env_file_text,
    nobody_listens,
    plan,
    probe,
    process_gone,
    systemd_word,
    unit_name,
    write_env_file,
)


def _load_reference() -> t.Any:
    """tests/vm/fake_systemctl.py: systemd's EnvironmentFile= and $VAR splitting rules, written from its sources."""
    path = Path(__file__).resolve().parents[3] / "vm" / "fake_systemctl.py"
    spec = importlib.util.spec_from_file_location("fake_systemctl", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


REFERENCE = _load_reference()
SOCK = "/run/vms/web01.qmp"


def systemd_args(text: str) -> list[str]:
    """What ExecStart=... $VMSNAP_QEMU_ARGS gets from an environment file's text."""
    return t.cast("list[str]", REFERENCE.expand_exec_start([f"${ENV_VAR}"], REFERENCE.parse_env_file(text)))


# --- quoting -----------------------------------------------------------------------------------------------------


def test_incoming_defer_becomes_two_arguments_and_reads_plainly() -> None:
    text = env_file_text(["-incoming", "defer"])
    assert f'{ENV_VAR}="-incoming defer"\n' in text
    assert systemd_args(text) == ["-incoming", "defer"]


TRICKY = [
    "-loadvm",
    "pre upgrade",
    "it's",
    'say "hi"',
    "$HOME",
    "${HOME}",
    "`id`",
    "back\\slash",
    "\\",
    '"',
    "'",
    "",
    "%n",
    "a  b",
    "trailing ",
    " leading",
    "ünïcode €",
    "file=/var/lib/vms/a b.qcow2,if=virtio",
    "#not-a-comment",
    ";",
    "x=y",
]


@pytest.mark.parametrize("arg", TRICKY)
def test_every_argument_comes_back_as_one(arg: str) -> None:
    assert systemd_args(env_file_text(["-a", arg, "-b"])) == ["-a", arg, "-b"]


def test_all_tricky_arguments_together() -> None:
    assert systemd_args(env_file_text(TRICKY)) == TRICKY


def test_no_arguments_expand_to_nothing() -> None:
    text = env_file_text([])
    assert f'{ENV_VAR}=""\n' in text
    assert systemd_args(text) == []


def test_plain_words_are_not_quoted() -> None:
    assert systemd_word("file=/a/b.qcow2,if=virtio") == "file=/a/b.qcow2,if=virtio"
    assert systemd_word("a b") == '"a b"'
    assert systemd_word('a"b\\') == '"a\\"b\\\\"'


@pytest.mark.parametrize("arg", ["two\nlines", "cr\r", "tab\there", "esc\x1b", "del\x7f"])
def test_control_characters_are_refused(arg: str) -> None:
    with pytest.raises(ValidationError, match="control character"):
        env_file_text(["-name", arg])


def test_env_file_is_written_atomically_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "run" / "vmsnap" / "qemu@web01.service.env"
    write_env_file(str(path), ["-incoming", "defer"])
    assert systemd_args(path.read_text()) == ["-incoming", "defer"]
    assert path.stat().st_mode & 0o777 == 0o600
    write_env_file(str(path), [])
    assert systemd_args(path.read_text()) == []
    assert sorted(os.listdir(path.parent)) == ["qemu@web01.service.env"]  # no temporary files left


# --- unit names --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "full"),
    [("qemu@web01", "qemu@web01.service"), ("qemu@web01.service", "qemu@web01.service"), ("vm1", "vm1.service")],
)
def test_unit_names(given: str, full: str) -> None:
    assert unit_name(given) == full


@pytest.mark.parametrize("bad", ["", "../etc/x", "a/b", "-x", ".hidden", "qemu@.service", "web01.timer", "a b"])
def test_bad_unit_names(bad: str) -> None:
    with pytest.raises(ValidationError, match="start_unit"):
        unit_name(bad)


def test_start_method_describes_what_runs() -> None:
    argv = StartMethod(argv=["/usr/bin/qemu-system-x86_64", "-m", "64"])
    assert argv.describe(["-incoming", "defer"]) == {
        "argv": ["/usr/bin/qemu-system-x86_64", "-m", "64", "-incoming", "defer"]
    }
    unit = StartMethod(unit="qemu@a.service", systemctl="/bin/systemctl", env_file="/run/vmsnap/qemu@a.service.env")
    assert unit.describe([]) == {"unit": "qemu@a.service", "args": [], "env_file": "/run/vmsnap/qemu@a.service.env"}


# --- plan --------------------------------------------------------------------------------------------------------

RUNNING = VmState(True, "running", 42)
PAUSED = VmState(True, "paused", 42)
WAITING = VmState(True, "inmigrate", 42)
DOWN = VmState(False, "stopped")


@pytest.mark.parametrize(
    ("state", "vm", "action", "args"),
    [
        ("stopped", DOWN, "none", []),
        ("stopped", RUNNING, "stop", []),
        ("stopped", WAITING, "stop", []),
        ("started", RUNNING, "none", []),
        ("started", PAUSED, "none", []),
        ("started", WAITING, "none", []),
        ("started", DOWN, "start", ["-loadvm", "s1"]),
        ("incoming", WAITING, "none", []),
        ("incoming", DOWN, "start", ["-incoming", "defer", "-loadvm", "s1"]),
    ],
)
def test_plan(state: str, vm: VmState, action: str, args: list[str]) -> None:
    decided = plan(state, vm, ["-loadvm", "s1"], SOCK, can_start=True)
    assert isinstance(decided, Plan)
    assert (decided.action, decided.args) == (action, args)
    assert SOCK in decided.msg


@pytest.mark.parametrize("vm", [RUNNING, PAUSED, VmState(True, "postmigrate", 42)])
def test_incoming_refuses_a_qemu_that_runs_otherwise(vm: VmState) -> None:
    with pytest.raises(VmProcessError, match=f"running with status {vm.status}.*stop it first") as err:
        plan("incoming", vm, [], SOCK, can_start=True)
    assert err.value.details["pid"] == 42


@pytest.mark.parametrize("state", ["started", "incoming"])
def test_a_start_needs_a_method(state: str) -> None:
    with pytest.raises(ValidationError) as err:
        plan(state, DOWN, [], SOCK, can_start=False)
    assert err.value.msg.startswith(
        f"The QEMU of VM at {SOCK} is not running and no start method was given (vmsnap_vm_start)"
    )


def test_no_method_needed_when_nothing_starts() -> None:
    assert plan("started", RUNNING, [], SOCK, can_start=False).action == "none"
    assert plan("stopped", RUNNING, [], SOCK, can_start=False).action == "stop"


# --- real processes and sockets ----------------------------------------------------------------------------------


def test_a_zombie_counts_as_gone() -> None:
    child = subprocess.Popen(["true"])  # noqa: S603, S607
    try:
        deadline = time.monotonic() + 10
        while Path(f"/proc/{child.pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0] != b"Z":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert process_gone(child.pid)
    finally:
        child.wait()
    assert process_gone(child.pid)  # reaped: no /proc entry


def test_a_live_process_is_not_gone() -> None:
    child = subprocess.Popen(["sleep", "30"])  # noqa: S603, S607
    try:
        assert not process_gone(child.pid)
    finally:
        child.kill()
        child.wait()


def test_sockets(tmp_path: Path) -> None:
    missing = tmp_path / "missing.qmp"
    assert nobody_listens(str(missing))
    assert probe(str(missing), 1.0) == VmState(False, "stopped")

    stale = tmp_path / "stale.qmp"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(stale))
    server.close()  # the file stays, nobody listens: a QEMU killed with SIGKILL
    assert stale.exists()
    assert nobody_listens(str(stale))
    assert probe(str(stale), 1.0) == VmState(False, "stopped")

    live = tmp_path / "live.qmp"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(live))
    server.listen(1)
    try:
        assert not nobody_listens(str(live))
    finally:
        server.close()

    regular = tmp_path / "file.qmp"
    regular.write_text("")
    assert not nobody_listens(str(regular))
    with pytest.raises(VmsnapError, match="is not a socket"):
        probe(str(regular), 1.0)
