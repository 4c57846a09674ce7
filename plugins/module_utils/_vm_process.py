# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!

"""Start and stop a VM's QEMU process for qemu_vm: is it there (does its QMP socket answer), the plan, the acts.

A VM runs when its QMP socket answers. A missing socket file, or one that refuses connections (a QEMU killed with
SIGKILL leaves its socket file behind), means it does not. QEMU is started either from an argv (detached, in its
own session) or through a systemd unit that expands $VMSNAP_QEMU_ARGS from an EnvironmentFile this module writes.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import stat
import subprocess
import tempfile
import time
import typing as t
from dataclasses import dataclass, field

from ansible_collections.vmsnap.qemu.plugins.module_utils._errors import ValidationError, VmsnapError
from ansible_collections.vmsnap.qemu.plugins.module_utils._files import write_bytes_atomic
from ansible_collections.vmsnap.qemu.plugins.module_utils._qemu_img import C_LOCALE
from ansible_collections.vmsnap.qemu.plugins.module_utils._qmp import QmpClient, QmpConnectionError

ENV_VAR = "VMSNAP_QEMU_ARGS"
INCOMING_ARGS = ("-incoming", "defer")
STOPPED = "stopped"

_POLL_SECONDS = 0.1
_UNIT_POLL_SECONDS = 0.5
_KILL_GRACE_SECONDS = 10.0
_OUTPUT_TAIL_BYTES = 2000
# Words that need no quoting in systemd's split of $VAR (and in a shell): no whitespace, quotes or backslashes.
_PLAIN_WORD = re.compile(r"[A-Za-z0-9_@%+=:,./-]+\Z")
_UNIT_NAME = re.compile(r"[A-Za-z0-9:_.\\@-]+\Z")


class VmProcessError(VmsnapError):
    """Starting or stopping QEMU failed, or the VM is not in a state the task can work from."""


@dataclass(frozen=True)
class VmState:
    """What the QMP socket says: running (it answers), QEMU's run status (or 'stopped') and QEMU's pid."""

    running: bool
    status: str
    pid: int | None = None


@dataclass(frozen=True)
class Plan:
    """action: 'none', 'start' or 'stop'; args: what a start adds to the VM's own command line."""

    action: str
    msg: str
    args: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class StartMethod:
    """How to start the VM: an argv (argv[0] resolved already) or a systemd unit (systemctl resolved)."""

    argv: list[str] | None = None
    unit: str | None = None
    systemctl: str | None = None
    env_file: str | None = None

    def describe(self, args: list[str]) -> dict[str, t.Any]:
        if self.unit is not None:
            return {"unit": self.unit, "args": list(args), "env_file": self.env_file}
        return {"argv": list(self.argv or []) + list(args)}


# --- pure parts -------------------------------------------------------------------------------------------------


def plan(state: str, vm: VmState, extra_args: list[str], socket_path: str, can_start: bool) -> Plan:
    """What state needs, from what the socket says. Raises when the task must not go on."""
    if state == STOPPED:
        if not vm.running:
            return Plan("none", f"The QEMU of VM at {socket_path} is not running.")
        return Plan("stop", f"The QEMU of VM at {socket_path} ({vm.status}) is stopped.")
    if vm.running:
        if state == "started":
            return Plan("none", f"The QEMU of VM at {socket_path} is running already ({vm.status}).")
        if vm.status == "inmigrate":
            return Plan("none", f"The QEMU of VM at {socket_path} waits for an incoming state already.")
        raise VmProcessError(
            f"The QEMU of VM at {socket_path} is running with status {vm.status}, so it cannot wait for an incoming "
            "state; stop it first (state=stopped). It was left untouched.",
            status=vm.status,
            pid=vm.pid,
        )
    if not can_start:
        raise ValidationError(
            f"The QEMU of VM at {socket_path} is not running and no start method was given (vmsnap_vm_start); "
            "set start_unit or start_argv."
        )
    args = (list(INCOMING_ARGS) if state == "incoming" else []) + list(extra_args)
    waits = " to wait for an incoming state" if state == "incoming" else ""
    return Plan("start", f"The QEMU of VM at {socket_path} is started{waits}.", args)


def unit_name(name: str) -> str:
    """The full name of a service unit (systemctl adds .service to a bare name; %n in the unit has it too)."""
    if not _UNIT_NAME.match(name) or name.startswith(("-", ".")) or "@." in name:
        raise ValidationError(f"start_unit {name!r} is not a valid systemd unit name (e.g. qemu@web01.service).")
    if "." not in name.rsplit("@", 1)[-1]:
        return name + ".service"
    if not name.endswith(".service"):
        raise ValidationError(f"start_unit {name!r} is not a service unit; give a .service unit that starts QEMU.")
    return name


def systemd_word(arg: str) -> str:
    """arg quoted so that systemd's split of an unquoted $VAR in ExecStart= gives it back as one argument.

    systemd splits at whitespace, removes quotes, and takes the character after a backslash literally, also
    inside quotes (extract_first_word with EXTRACT_UNQUOTE|EXTRACT_RELAX).
    """
    _refuse_control(arg)
    if _PLAIN_WORD.match(arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def env_file_text(args: list[str]) -> str:
    """The EnvironmentFile= contents that set $VMSNAP_QEMU_ARGS to args (or to nothing).

    The value is double-quoted for the env file parser, where a backslash keeps one of " \\ ` $ literally.
    """
    value = " ".join(systemd_word(arg) for arg in args)
    escaped = re.sub(r'(["\\`$])', r"\\\1", value)
    return f'# Written by vmsnap.qemu.qemu_vm for one start; emptied after it.\n{ENV_VAR}="{escaped}"\n'


def _refuse_control(arg: str) -> None:
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in arg):
        raise ValidationError(f"Argument {arg!r} contains a newline or another control character.")
    try:
        arg.encode("utf-8")
    except UnicodeEncodeError:
        raise ValidationError(f"Argument {arg!r} is not valid UTF-8.") from None


def output_tail(data: bytes) -> str:
    return data[-_OUTPUT_TAIL_BYTES:].decode("utf-8", "replace").strip()


# --- the VM's state ---------------------------------------------------------------------------------------------


def probe(socket_path: str, connect_timeout: float) -> VmState:
    """Whether QEMU answers on the socket, its status and pid. Errors other than 'nobody listens' are raised."""
    try:
        with QmpClient(socket_path, connect_timeout, connect_timeout) as qmp:
            status = str((qmp.execute("query-status") or {}).get("status"))
            return VmState(True, status, qmp.peer_pid())
    except QmpConnectionError:
        if nobody_listens(socket_path):
            return VmState(False, STOPPED)
        raise


def nobody_listens(socket_path: str) -> bool:
    """A missing socket file, or a socket file that refuses connections (its QEMU is gone)."""
    try:
        mode = os.stat(socket_path).st_mode
    except FileNotFoundError:
        return True
    except OSError:
        return False
    if not stat.S_ISSOCK(mode):
        return False  # connect() to a regular file is refused too, but that is a wrong path, not a stopped VM
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(1.0)
    try:
        sock.connect(socket_path)
    except (ConnectionRefusedError, FileNotFoundError):
        return True
    except OSError:
        return False
    finally:
        sock.close()
    return False


def process_gone(pid: int) -> bool:
    """Whether pid has ended; a zombie nobody has reaped yet (state Z or X in /proc/PID/stat) has."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat_file:
            fields = stat_file.read().rsplit(b")", 1)[1].split()
    except FileNotFoundError:
        return True
    except (OSError, IndexError):
        return False
    return bool(fields) and fields[0] in (b"Z", b"X")


# --- acts -------------------------------------------------------------------------------------------------------


def run_argv(argv: list[str], timeout: float) -> tuple[int, str, str]:
    """Run a short command (systemctl): argv, C locale, no shell. subprocess.TimeoutExpired after timeout."""
    proc = subprocess.run(
        argv,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env=dict(os.environ, **C_LOCALE),
        timeout=timeout,
        check=False,
    )
    return proc.returncode, proc.stdout.decode("utf-8", "replace"), proc.stderr.decode("utf-8", "replace")


def start(
    method: StartMethod, args: list[str], socket_path: str, timeout: float, connect_timeout: float, incoming: bool
) -> VmState:
    """Start QEMU with method plus args and wait until its QMP socket answers (and, for incoming, is inmigrate)."""
    if method.unit is not None:
        vm = _start_unit(method, args, socket_path, timeout, connect_timeout)
    else:
        vm = _start_argv(list(method.argv or []) + args, socket_path, timeout, connect_timeout)
    if incoming and vm.status != "inmigrate":
        raise VmProcessError(
            f"The QEMU of VM at {socket_path} started with status {vm.status}, not inmigrate, although it was given "
            "-incoming defer. It was left running.",
            status=vm.status,
            pid=vm.pid,
        )
    return vm


def _start_argv(argv: list[str], socket_path: str, timeout: float, connect_timeout: float) -> VmState:
    with tempfile.TemporaryFile(prefix="vmsnap-qemu-start-") as log:
        try:
            # Detached in its own session: a QEMU in the foreground outlives this task; one that daemonizes exits 0.
            proc = subprocess.Popen(  # pylint: disable=consider-using-with
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
                env=dict(os.environ, **C_LOCALE),
            )
        except OSError as exc:
            raise VmProcessError(
                f"Cannot start the QEMU of VM at {socket_path}: {argv[0]}: {exc.strerror or exc}.", started_with=argv
            ) from None

        def output() -> str:
            log.seek(0)
            return output_tail(log.read())

        def check() -> None:
            rc = proc.poll()
            if rc is not None and rc != 0:
                tail = output()
                raise VmProcessError(
                    f"The start command of VM at {socket_path} exited with {_describe_rc(rc)} before QMP answered: "
                    f"{tail or '(no output)'}",
                    rc=rc,
                    output=tail,
                    started_with=argv,
                    changed=False,  # nothing is left running
                )

        try:
            return _wait_until_answers(socket_path, time.monotonic() + timeout, connect_timeout, check)
        except _StartTimeout as exc:
            rc = proc.poll()
            if rc is None:
                left = f"the process is left running with pid {proc.pid} (it was not killed)"
            else:
                left = f"the start command exited with {rc} (a QEMU it daemonized may still be starting)"
            tail = output()
            raise VmProcessError(
                f"The QEMU of VM at {socket_path} did not answer on QMP within {timeout:g} s after the start; {left}. "
                f"{exc.last_error}Output: {tail or '(none)'}",
                pid=proc.pid if rc is None else None,
                output=tail,
                started_with=argv,
            ) from None


def _describe_rc(rc: int) -> str:
    if rc < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-rc).name}"
    return f"exit code {rc}"


def _start_unit(
    method: StartMethod, args: list[str], socket_path: str, timeout: float, connect_timeout: float
) -> VmState:
    unit, systemctl, env_file = str(method.unit), str(method.systemctl), str(method.env_file)
    write_env_file(env_file, args)
    try:
        vm = _run_unit_start(unit, systemctl, socket_path, timeout, connect_timeout)
    except (VmsnapError, OSError, subprocess.SubprocessError):
        with contextlib.suppress(OSError):
            write_env_file(env_file, [])
        raise
    try:
        write_env_file(env_file, [])
    except OSError as exc:
        raise VmProcessError(
            f"The QEMU of VM at {socket_path} started, but emptying {env_file} failed: {exc.strerror or exc}. "
            f"A later plain restart of {unit} would get the same extra arguments; empty it by hand.",
            pid=vm.pid,
            status=vm.status,
        ) from None
    return vm


def _run_unit_start(unit: str, systemctl: str, socket_path: str, timeout: float, connect_timeout: float) -> VmState:
    deadline = time.monotonic() + timeout
    try:
        rc, out, err = run_argv([systemctl, "start", unit], timeout)
    except subprocess.TimeoutExpired:
        raise VmProcessError(
            f"systemctl start {unit} (VM at {socket_path}) did not return within {timeout:g} s.", unit=unit
        ) from None
    if rc != 0:
        raise VmProcessError(
            f"systemctl start {unit} (VM at {socket_path}) failed with exit code {rc}: {(err or out).strip()}",
            unit=unit,
            rc=rc,
            stdout=out,
            stderr=err,
        )
    next_check = [time.monotonic() + _UNIT_POLL_SECONDS]

    def check() -> None:
        if time.monotonic() < next_check[0]:
            return
        next_check[0] = time.monotonic() + _UNIT_POLL_SECONDS
        dummy, state, dummy_err = run_argv([systemctl, "is-active", unit], timeout)
        if state.strip() == "failed":
            raise VmProcessError(
                f"Unit {unit} failed before the QEMU of VM at {socket_path} answered on QMP; see systemctl status "
                f"{unit} and journalctl -u {unit}.",
                unit=unit,
            )

    try:
        return _wait_until_answers(socket_path, deadline, connect_timeout, check)
    except _StartTimeout as exc:
        raise VmProcessError(
            f"The QEMU of VM at {socket_path} did not answer on QMP within {timeout:g} s after systemctl start "
            f"{unit}; the unit was left as it is. {exc.last_error}",
            unit=unit,
        ) from None


class _StartTimeout(Exception):
    def __init__(self, last_error: str) -> None:
        super().__init__(last_error)
        self.last_error = last_error


def _wait_until_answers(
    socket_path: str, deadline: float, connect_timeout: float, check: t.Callable[[], None]
) -> VmState:
    """Poll the socket until QEMU answers; check() raises when the start has failed. _StartTimeout at deadline."""
    last_error = ""
    while True:
        check()
        try:
            vm = probe(socket_path, min(connect_timeout, max(deadline - time.monotonic(), 0.1)))
        except VmsnapError as exc:
            vm, last_error = VmState(False, STOPPED), f"Last QMP error: {exc.msg} "
        if vm.running:
            return vm
        if time.monotonic() >= deadline:
            check()
            raise _StartTimeout(last_error)
        time.sleep(_POLL_SECONDS)


def write_env_file(path: str, args: list[str]) -> None:
    """Atomically (temp file, fsync, rename, fsync folder) write the unit's EnvironmentFile with mode 0600."""
    folder = os.path.dirname(path)
    os.makedirs(folder, mode=0o755, exist_ok=True)
    temp = os.path.join(folder, f".vmsnap-env-{os.getpid()}-{time.monotonic_ns()}")
    write_bytes_atomic(path, env_file_text(args).encode("utf-8"), temp)


def stop(
    vm: VmState,
    method: StartMethod | None,
    socket_path: str,
    timeout: float,
    connect_timeout: float,
    kill_after_timeout: bool,
) -> bool:
    """Stop QEMU (systemctl stop for a unit, QMP quit otherwise) and wait until it is gone. Returns whether it
    had to be killed (SIGKILL after timeout, only with kill_after_timeout)."""
    deadline = time.monotonic() + timeout
    if method is not None and method.unit is not None:
        how = f"systemctl stop {method.unit}"
        _systemctl_stop(str(method.systemctl), method.unit, socket_path, timeout)
    else:
        how = "QMP quit"
        _quit(socket_path, connect_timeout)
    if _wait_gone(vm.pid, socket_path, deadline):
        return False
    if not kill_after_timeout or vm.pid is None:
        known = f"pid {vm.pid}" if vm.pid is not None else "its pid is unknown"
        raise VmProcessError(
            f"The QEMU of VM at {socket_path} ({known}) did not end within {timeout:g} s after {how}; it was "
            "not killed. kill_after_timeout=true sends it SIGKILL after the timeout.",
            pid=vm.pid,
        )
    with contextlib.suppress(ProcessLookupError):
        os.kill(vm.pid, signal.SIGKILL)
    if not _wait_gone(vm.pid, socket_path, time.monotonic() + _KILL_GRACE_SECONDS):
        raise VmProcessError(
            f"The QEMU of VM at {socket_path} (pid {vm.pid}) did not end within {timeout:g} s after {how}, and "
            f"was still there {_KILL_GRACE_SECONDS:g} s after SIGKILL.",
            pid=vm.pid,
        )
    return True


def _systemctl_stop(systemctl: str, unit: str, socket_path: str, timeout: float) -> None:
    try:
        rc, out, err = run_argv([systemctl, "stop", unit], timeout)
    except subprocess.TimeoutExpired:
        return  # systemd keeps stopping it; the wait below decides (and may SIGKILL)
    if rc != 0:
        raise VmProcessError(
            f"systemctl stop {unit} (VM at {socket_path}) failed with exit code {rc}: {(err or out).strip()}",
            unit=unit,
            rc=rc,
            stdout=out,
            stderr=err,
        )


def _quit(socket_path: str, connect_timeout: float) -> None:
    # QEMU may close the socket before its reply to quit arrives.
    with QmpClient(socket_path, connect_timeout, connect_timeout) as qmp, contextlib.suppress(QmpConnectionError):
        qmp.execute("quit")


def _wait_gone(pid: int | None, socket_path: str, deadline: float) -> bool:
    while True:
        if (pid is None or process_gone(pid)) and nobody_listens(socket_path):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_SECONDS)
