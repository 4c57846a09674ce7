# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!

"""A small synchronous QMP client (standard library only) with a job helper.

Timeouts are kept apart: lock_timeout bounds waiting for another vmsnap task that is using the same socket
(QEMU serves one QMP client at a time, so tasks on one VM take turns through a per-socket lock, see _lock.py),
connect_timeout bounds reaching the socket and the greeting, command_timeout bounds waiting for one reply, and
each job wait has its own timeout. A job that outlives its timeout is reported as still running, never as done.

What a peer sends is bounded: one message at most MAX_MESSAGE_BYTES, JSON nesting as deep as Python's parser
manages; anything else ends the connection with the error family, never an unbounded buffer or a traceback.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import socket
import stat
import struct
import time
import typing as t

from ansible_collections.vmsnap.qemu.plugins.module_utils._errors import LockTimeoutError, VmsnapError
from ansible_collections.vmsnap.qemu.plugins.module_utils._lock import (
    acquire,
    default_lock_dir,
    describe_holder,
    holder_of,
    prepare_lock_dir,
    release,
    vm_lock_file_for,
)

DEFAULT_LOCK_TIMEOUT = 60.0
# The largest real message is a guest agent's guest-exec-status output (16 MiB as base64 ~ 22 MB); QMP's replies
# of a large VM are a few MB.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_JOB_POLL_SECONDS = 0.5
_DEATH_GRACE_SECONDS = 1.0
_LATE_RESUME_SECONDS = 2.0
_COMPLETE_GRACE_SECONDS = 10.0


class QmpError(VmsnapError):
    """QEMU answered a command with an error."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(
            f"QMP {command} failed: {desc} ({error_class})", qmp_command=command, qmp_error_class=error_class
        )
        self.command = command
        self.error_class = error_class
        self.desc = desc


class QmpConnectionError(VmsnapError):
    """The socket cannot be reached, or QEMU closed it."""


class QmpTimeoutError(VmsnapError):
    """No answer in time. For a job: it is still running."""


class QmpJobError(VmsnapError):
    """A job concluded with an error of its own."""


class QmpVmDiedError(QmpConnectionError):
    """The QEMU behind the socket exited (was killed) while this task waited for it."""


class QmpClient:
    kind = "QMP socket"

    def __init__(
        self,
        path: str,
        connect_timeout: float = 5.0,
        command_timeout: float = 30.0,
        lock_timeout: float | None = DEFAULT_LOCK_TIMEOUT,
        lock_dir: str | None = None,
    ) -> None:
        """lock_timeout: how long to wait for another vmsnap task using this socket; None takes no lock (a private
        socket this task created itself)."""
        self.path = path
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.lock_timeout = lock_timeout
        self.lock_dir = lock_dir
        self._lock_path: str | None = None
        self._peer: int | None = None
        self.events: collections.deque[dict[str, t.Any]] = collections.deque()
        self.greeting: dict[str, t.Any] = {}
        self._sock: socket.socket | None = None
        self._buffer = b""
        self._next_id = 0

    def __enter__(self) -> QmpClient:
        try:
            self.connect()
        except BaseException:
            self.close()  # __exit__ does not run when __enter__ fails: the socket and the lock must not stay held
            raise
        return self

    def __exit__(self, *exc_info: t.Any) -> None:
        self.close()

    def connect(self) -> None:
        self._open_socket()
        try:
            self._handshake()
        except BaseException:
            self.close()
            raise

    def _handshake(self) -> None:
        deadline = time.monotonic() + self.connect_timeout
        try:
            greeting = self._read_message(deadline, waiting_for="the QMP greeting")
        except QmpTimeoutError:
            raise QmpTimeoutError(
                f"No QMP greeting from {self.path} within {self.connect_timeout:g} s: another client probably holds "
                f"the socket {self.path} (QEMU serves one QMP client at a time), such as libvirt, socat or a human "
                "at the monitor; or QEMU is hung. Nothing was sent to it.",
                socket=self.path,
            ) from None
        if not isinstance(greeting.get("QMP"), dict):
            raise QmpConnectionError(
                f"{self.path} did not greet like a QMP monitor: {str(greeting)[:200]!r}", socket=self.path
            )
        self.greeting = greeting["QMP"]
        self.execute("qmp_capabilities", timeout=self.connect_timeout)

    def _take_turn(self) -> None:
        """Wait for other vmsnap tasks on this socket (per-socket flock); held until close()."""
        if self.lock_timeout is None or self._lock_path is not None:
            return
        directory = self.lock_dir or default_lock_dir()
        prepare_lock_dir(directory)
        lock_path = vm_lock_file_for(self.path, directory)
        if not acquire(lock_path, self.lock_timeout):
            raise LockTimeoutError(
                f"Another vmsnap.qemu task is using the VM behind {self.path} ({describe_holder(lock_path)}): it was "
                f"still busy after lock_timeout {self.lock_timeout:g} s (QEMU serves one QMP client at a time, so "
                f"tasks on one VM take turns; lock file {lock_path}). Nothing was changed; retry later or raise "
                "lock_timeout.",
                socket=self.path,
                lock_file=lock_path,
                lock_holder=holder_of(lock_path),
            )
        self._lock_path = lock_path

    def _open_socket(self) -> None:
        _require_socket(self.path, self.kind)
        self._take_turn()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.connect_timeout)
        try:
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            self._release_turn()
            raise QmpConnectionError(
                f"Cannot connect to the socket {self.path}: {exc.strerror or exc}. Is its QEMU still running?",
                socket=self.path,
            ) from None
        self._sock = sock
        self._buffer = b""
        self._peer = self.peer_pid()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._buffer = b""
        self._release_turn()

    def _release_turn(self) -> None:
        if self._lock_path is not None:
            lock_path, self._lock_path = self._lock_path, None
            release(lock_path)

    @property
    def version(self) -> tuple[int, int, int]:
        qemu = _as_dict(_as_dict(self.greeting.get("version")).get("qemu"))
        try:
            return (int(qemu.get("major", 0)), int(qemu.get("minor", 0)), int(qemu.get("micro", 0)))
        except (TypeError, ValueError):
            return (0, 0, 0)

    def execute(
        self,
        command: str,
        arguments: dict[str, t.Any] | None = None,
        timeout: float | None = None,
        fd: int | None = None,
        expect: type | None = None,
    ) -> t.Any:
        """Send one command and return its 'return' value; events that arrive meanwhile are kept in self.events.

        fd: a file descriptor sent along (SCM_RIGHTS), as getfd and add-fd expect.
        expect: the type the 'return' value must have (dict, list); another shape raises QmpConnectionError.
        """
        self._next_id += 1
        message_id = f"vmsnap-{os.getpid()}-{self._next_id}"  # a killed client's late reply never matches
        message: dict[str, t.Any] = {"execute": command, "id": message_id}
        if arguments is not None:
            message["arguments"] = arguments
        self._send_raw(json.dumps(message).encode("utf-8") + b"\n", command, fd)
        deadline = time.monotonic() + (self.command_timeout if timeout is None else timeout)
        while True:
            reply = self._read_message(deadline, waiting_for=f"the reply to {command}")
            if "event" in reply:
                self.events.append(reply)
                continue
            if reply.get("id", message_id) != message_id:
                continue  # a late reply to an earlier command that timed out
            if "error" in reply:
                error = reply["error"] if isinstance(reply["error"], dict) else {"desc": reply["error"]}
                raise QmpError(command, str(error.get("class", "GenericError")), str(error.get("desc", "")))
            value = reply.get("return")
            if expect is not None and not isinstance(value, expect):
                raise QmpConnectionError(
                    f"{self.path} answered {command} with {type(value).__name__} where QMP returns "
                    f"{expect.__name__}: {str(value)[:200]!r}. Is that socket a QEMU monitor?",
                    socket=self.path,
                )
            return value

    def wait_event(self, matches: t.Callable[[dict[str, t.Any]], bool], timeout: float) -> dict[str, t.Any] | None:
        """The first kept or new event that matches, or None when none came within timeout."""
        deadline = time.monotonic() + timeout
        while True:
            for event in list(self.events):
                if matches(event):
                    self.events.remove(event)
                    return event
            if time.monotonic() >= deadline:
                return None
            try:
                message = self._read_message(deadline, waiting_for="an event")
            except QmpTimeoutError:
                return None
            if "event" in message:
                self.events.append(message)

    def wait_job(self, job_id: str, statuses: t.Collection[str], timeout: float) -> str:
        """Wait until the job reaches one of statuses (JOB_STATUS_CHANGE events, query-jobs as fallback).

        Returns the status reached; 'null' when the job is gone (dismissed). Raises QmpTimeoutError otherwise.
        """
        deadline = time.monotonic() + timeout
        wanted = set(statuses)
        while True:
            status = self._job_status(job_id)
            if status in wanted or status == "null":
                return status
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise QmpTimeoutError(
                    f"QMP job {job_id} is still running (status {status}) after {timeout:g} s; it was not cancelled "
                    "and has not finished. Check it with query-jobs before doing anything else with this VM.",
                    job_id=job_id,
                    job_status=status,
                )
            self.wait_event(
                lambda event: (
                    event.get("event") == "JOB_STATUS_CHANGE" and _as_dict(event.get("data")).get("id") == job_id
                ),
                min(remaining, _JOB_POLL_SECONDS),
            )

    def run_job(
        self,
        command: str,
        arguments: dict[str, t.Any],
        timeout: float,
        job_id_key: str = "job-id",
        complete_when_ready: bool = False,
    ) -> dict[str, t.Any]:
        """Start a job that needs manual dismissal, wait for it to conclude, dismiss it, raise its own error.

        complete_when_ready: the job stops in 'ready' (an active block-commit or a mirror) until job-complete.
        """
        job_id = str(arguments[job_id_key])
        deadline = time.monotonic() + timeout
        try:
            # Some jobs block the monitor until they are done (snapshot-save on QEMU 7.2), so the reply can be late.
            self.execute(command, arguments, timeout=timeout)
        except QmpTimeoutError:
            raise QmpTimeoutError(
                f"QMP job {job_id} ({command}) did not answer within {timeout:g} s; it may still be running. "
                "Check it with query-jobs before doing anything else with this VM.",
                job_id=job_id,
            ) from None
        if complete_when_ready:
            status = self.wait_job(job_id, ("ready", "concluded"), max(deadline - time.monotonic(), 0.0))
            if status == "ready":
                self.execute("job-complete", {"id": job_id})
                # Completing a ready job is a short switch-over: give it time even when the deadline is near.
                deadline = max(deadline, time.monotonic() + _COMPLETE_GRACE_SECONDS)
        self.wait_job(job_id, ("concluded",), max(deadline - time.monotonic(), 0.0))
        job = self.query_job(job_id)
        if job is None:
            raise QmpJobError(
                f"QMP job {job_id} ({command}) disappeared before this task could read its result (someone else "
                "dismissed it?); whether it succeeded is unknown. Check the VM before going on.",
                job_id=job_id,
            )
        if job.get("status") == "concluded":
            self.execute("job-dismiss", {"id": job_id})
        if job.get("error"):
            raise QmpJobError(f"QMP job {job_id} ({command}) failed: {job.get('error')}", job_id=job_id)
        return job

    def poll_events(self) -> None:
        """Keep the events QEMU has already sent (reading without waiting)."""
        while True:
            try:
                message = self._read_message(time.monotonic(), waiting_for="events", wait=False)
            except QmpTimeoutError:
                return
            if "event" in message:
                self.events.append(message)

    def take_events(self, names: t.Collection[str]) -> list[dict[str, t.Any]]:
        """Remove and return the kept events with these names, oldest first."""
        taken = [event for event in self.events if event.get("event") in names]
        for event in taken:
            self.events.remove(event)
        return taken

    def query_job(self, job_id: str) -> dict[str, t.Any] | None:
        for job in self.execute("query-jobs", expect=list):
            if isinstance(job, dict) and job.get("id") == job_id:
                return job
        return None

    def _job_status(self, job_id: str) -> str:
        job = self.query_job(job_id)
        return "null" if job is None else str(job.get("status"))

    def peer_pid(self) -> int | None:
        """The pid of the process at the other end of the socket (QEMU), from SO_PEERCRED; None if unknown."""
        if self._sock is None or not hasattr(socket, "SO_PEERCRED"):
            return None
        try:
            creds = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        except OSError:
            return None
        pid = struct.unpack("3i", creds)[0]
        return pid if pid > 0 else None

    def _send_raw(self, data: bytes, command: str, fd: int | None = None) -> None:
        if self._sock is None:
            raise QmpConnectionError(f"Not connected to {self.path}.", socket=self.path)
        try:
            self._sock.settimeout(self.command_timeout)  # poll_events() leaves the socket non-blocking
            if fd is None:
                self._sock.sendall(data)
            else:
                # One message carries the whole command and the descriptor, so QEMU reads them together.
                sent = socket.send_fds(self._sock, [data], [fd])
                if sent != len(data):
                    self._sock.sendall(data[sent:])
        except OSError as exc:
            self._raise_if_died(f"the reply to {command}")
            raise QmpConnectionError(
                f"Lost the connection to {self.path} while sending {command}: {exc.strerror or exc}.",
                socket=self.path,
            ) from None

    def _raise_if_died(self, waiting_for: str) -> None:
        """After EOF or a reset: if the QEMU behind the socket has exited, say that the VM died."""
        pid = self._peer
        if pid is None or pid == os.getpid():
            return
        deadline = time.monotonic() + _DEATH_GRACE_SECONDS
        while not _process_gone(pid):
            if time.monotonic() >= deadline:
                return
            time.sleep(0.02)
        raise QmpVmDiedError(
            f"QEMU (pid {pid}) behind {self.path} exited while we waited for {waiting_for}: the VM died (killed "
            "or crashed), and what this task asked of it did not finish. Its disks hold what QEMU last wrote: check "
            "them offline (qemu-img check) before starting the VM again.",
            socket=self.path,
            qemu_pid=pid,
            vm_died=True,
        )

    def _fill(self, deadline: float, waiting_for: str, wait: bool = True) -> None:
        """Read one chunk into the buffer. wait=False: only what has already arrived."""
        sock = self._sock
        if sock is None:
            raise QmpConnectionError(f"Not connected to {self.path}.", socket=self.path)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 and wait:
                raise QmpTimeoutError(f"{self.path}: no answer while waiting for {waiting_for}.", socket=self.path)
            sock.settimeout(remaining if wait else 0.0)
            try:
                chunk = sock.recv(65536)
            except (socket.timeout, BlockingIOError):
                if not wait:
                    raise QmpTimeoutError(f"{self.path}: nothing more to read.", socket=self.path) from None
                continue
            except OSError as exc:
                self._raise_if_died(waiting_for)
                raise QmpConnectionError(
                    f"Lost the connection to {self.path} while waiting for {waiting_for}: {exc.strerror or exc}.",
                    socket=self.path,
                ) from None
            if not chunk:
                self._raise_if_died(waiting_for)
                raise QmpConnectionError(
                    f"QEMU closed the connection {self.path} while we waited for {waiting_for}.", socket=self.path
                )
            self._buffer += chunk
            return

    def _read_message(self, deadline: float, waiting_for: str, wait: bool = True) -> dict[str, t.Any]:
        """One JSON line; buffers until a newline, because replies can be large.

        A large reply (a guest agent's can be 20 MB) comes in many reads: they are joined once at the end, since
        appending each to all before it takes time quadratic in the reply's size.
        """
        newline = self._buffer.find(b"\n")
        if newline < 0:
            parts, offset = [self._buffer], len(self._buffer)
            try:
                while newline < 0:
                    if offset > MAX_MESSAGE_BYTES:
                        parts = []
                        self.close()
                        raise QmpConnectionError(
                            f"{self.path} sent more than {MAX_MESSAGE_BYTES} bytes without ending the message "
                            f"while we waited for {waiting_for}: refusing to buffer more (no QMP or guest agent "
                            "message is that long). The connection was closed.",
                            socket=self.path,
                        )
                    self._buffer = b""
                    self._fill(deadline, waiting_for, wait)
                    parts.append(self._buffer)
                    newline = self._buffer.find(b"\n")
                    offset += len(self._buffer) if newline < 0 else 0
            finally:
                self._buffer = b"".join(parts)  # on a timeout, what arrived so far stays buffered
            newline += offset
        if newline > MAX_MESSAGE_BYTES:
            self.close()
            raise QmpConnectionError(
                f"{self.path} sent a message of more than {MAX_MESSAGE_BYTES} bytes while we waited for "
                f"{waiting_for}: refusing it (no QMP or guest agent message is that long). The connection was closed.",
                socket=self.path,
            )
        line, self._buffer = self._buffer[:newline], self._buffer[newline + 1 :]
        try:
            message = json.loads(line.decode("utf-8"))
        except (ValueError, RecursionError):
            raise QmpConnectionError(
                f"{self.path} sent something that is not QMP JSON: {line[:200]!r}", socket=self.path
            ) from None
        if not isinstance(message, dict):
            raise QmpConnectionError(
                f"{self.path} sent something that is not a QMP message: {line[:200]!r}", socket=self.path
            )
        return message


def _require_socket(path: str, kind: str) -> None:
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise QmpConnectionError(f"{kind} {path} does not exist.", socket=path) from None
    except OSError as exc:
        raise QmpConnectionError(f"{kind} {path} cannot be read: {exc.strerror}.", socket=path) from None
    if not stat.S_ISSOCK(mode):
        raise QmpConnectionError(f"{path} is not a socket; give the path of the VM's {kind}.", socket=path)


def pause_ms(events: list[dict[str, t.Any]], until: float | None = None) -> float:
    """Total time between each STOP and the RESUME after it, from QEMU's own event timestamps.

    A STOP without a RESUME counts until `until` (epoch seconds, QEMU's clock on this host) when given.
    """
    total = 0.0
    stopped_at: float | None = None
    for event in events:
        moment = _event_time(event)
        if event.get("event") == "STOP" and stopped_at is None:
            stopped_at = moment
        elif event.get("event") == "RESUME" and stopped_at is not None:
            total += moment - stopped_at
            stopped_at = None
    if stopped_at is not None and until is not None:
        total += max(until - stopped_at, 0.0)
    return round(total * 1000, 3)


def still_paused(events: list[dict[str, t.Any]]) -> bool:
    """Whether the last STOP/RESUME event is a STOP."""
    names = [event.get("event") for event in events if event.get("event") in ("STOP", "RESUME")]
    return bool(names) and names[-1] == "STOP"


def _event_time(event: dict[str, t.Any]) -> float:
    stamp = _as_dict(event.get("timestamp"))
    try:
        return float(stamp.get("seconds", 0)) + float(stamp.get("microseconds", 0)) / 1e6
    except (TypeError, ValueError, OverflowError):
        return 0.0


def _as_dict(value: t.Any) -> dict[str, t.Any]:
    return value if isinstance(value, dict) else {}


def _process_gone(pid: int) -> bool:
    """Whether pid has ended; a zombie nobody has reaped yet (state Z or X) has."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat_line = handle.read()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    state = stat_line[stat_line.rfind(b")") + 2 : stat_line.rfind(b")") + 3]
    return state in (b"Z", b"X")


def pause_of_this_task(qmp: QmpClient, wait_for_resume: bool = True) -> tuple[float, bool]:
    """The guest's pause since the STOP/RESUME events were last taken, in ms, and whether it is still paused.

    A guest that QEMU stopped and has not resumed yet gets a short grace (wait_for_resume) for a late RESUME; if
    it stays paused, the pause counts until now. Never raises: it runs after failures too.
    """
    events: list[dict[str, t.Any]] = []
    with contextlib.suppress(VmsnapError):
        qmp.poll_events()
        events = qmp.take_events(("STOP", "RESUME"))
        if wait_for_resume and still_paused(events):
            resume = qmp.wait_event(lambda event: event.get("event") == "RESUME", _LATE_RESUME_SECONDS)
            if resume is not None:
                events.append(resume)
    left_paused = still_paused(events)
    return pause_ms(events, until=time.time() if left_paused else None), left_paused
