# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!

"""A VM's RAM and device state in a file, and back: QEMU migration to and from a file descriptor.

No shell anywhere: the module opens the file itself and hands the descriptor to QEMU over the QMP socket
(getfd with SCM_RIGHTS), never exec:. A live save uses the background-snapshot capability: QEMU pauses the
guest only to write device state and write-protect RAM, then writes RAM as it was at that instant while the
guest runs. A write that fails during such a save hangs QEMU for good, so the file's space is reserved
(posix_fallocate) before QEMU gets it, and compression happens afterwards, on the finished file.

Beside the state file lies a JSON sidecar (<path>.json) with what a restore must match: QEMU version,
machine type, RAM size, every disk's slot and image file. QEMU 7.2 exits on some mismatches and silently
accepts others (a disk more, two disks swapped), so a restore compares the sidecar with the waiting QEMU
before it touches anything.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import gzip
import hashlib
import json
import os
import threading
import time
import typing as t
from dataclasses import asdict, dataclass, field

from ansible_collections.vmsnap.qemu.plugins.module_utils import _files
from ansible_collections.vmsnap.qemu.plugins.module_utils._errors import (
    InsufficientSpaceError,
    ValidationError,
    VmsnapError,
)
from ansible_collections.vmsnap.qemu.plugins.module_utils._qmp import (
    QmpClient,
    QmpConnectionError,
    QmpError,
    pause_of_this_task,
)
from ansible_collections.vmsnap.qemu.plugins.module_utils._stale_jobs import mark_paused

SIDECAR_FORMAT = 1
STATE_MAGIC = b"QEVM"
GZIP_MAGIC = b"\x1f\x8b"
BACKGROUND_SNAPSHOT_SINCE = (6, 0, 0)
# Room on top of the guest RAM for the page headers, device state and the RAM blocks of devices that the stream
# also carries (video memory: up to 256 MiB of VGA, QXL's 64+64+16 MiB; option ROMs). Unused reserve is trimmed.
_MARGIN_MIN_BYTES = 384 * 1024 * 1024
_MARGIN_RAM_DIVISOR = 16
# Saving into a local file: QEMU's default limit (128 MiB/s) only slows the save down.
_SAVE_BANDWIDTH = 64 * 1024 * 1024 * 1024
_POLL_SECONDS = 0.005
_SLOW_POLL_SECONDS = 0.05
_QUIT_SECONDS = 30.0
_CANCEL_SECONDS = 30.0
_GZIP_LEVEL = 1
_CHUNK = 1024 * 1024
TEMP_MARK = ".vmsnap-tmp-"

# Why a status cannot be saved, and what to do about it.
_UNSAVEABLE = {
    "prelaunch": "the VM was started with -S and has never run; QEMU 7.2 aborts when such a VM is snapshotted. "
    "Start it with cont first",
    "inmigrate": "QEMU is waiting for an incoming state; restore one into it with state=restored",
    "postmigrate": "its state was just saved and QEMU has released its disks; resume it with cont first",
    "finish-migrate": "a migration is finishing",
    "save-vm": "a snapshot is being saved",
    "restore-vm": "a snapshot load failed or is running; find out why before you go on",
    "internal-error": "it hit an internal error",
    "io-error": "it is stopped on a disk I/O error",
    "guest-panicked": "the guest panicked",
    "shutdown": "the guest has shut down",
    "watchdog": "its watchdog fired",
    "colo": "it is in COLO mode",
}
_ACTIVE_MIGRATION = ("setup", "active", "pre-switchover", "device", "cancelling", "postcopy-active", "wait-unplug")


class VmStateError(VmsnapError):
    """Saving or restoring a VM state failed; details say what was done."""


class StateFileError(VmsnapError):
    """A state file or its sidecar is missing, damaged or does not belong together."""


@dataclass(frozen=True)
class StateDisk:
    """One disk of the VM as a restore must find it again: the guest device slot and the image in it."""

    slot: str  # the guest device (qdev path), else the drive id: where the guest sees the disk
    device: str | None
    node_name: str | None
    file: str
    format: str

    @classmethod
    def from_disk(cls, disk: dict[str, t.Any], file: str | None = None) -> StateDisk:
        return cls(
            slot=str(disk.get("qdev") or disk.get("device") or disk.get("node_name")),
            device=disk.get("device"),
            node_name=disk.get("node_name"),
            file=file or str(disk.get("file")),
            format=str(disk.get("format")),
        )


@dataclass(frozen=True)
class QemuProcess:
    """The QEMU at the other end of the QMP socket: pid plus start time, so a reused pid is not mistaken for it."""

    pid: int
    start_ticks: int

    @classmethod
    def of(cls, qmp: QmpClient) -> QemuProcess | None:
        pid = qmp.peer_pid()
        fields = _proc_stat(pid) if pid is not None else None
        if pid is None or fields is None or len(fields) < 20 or not fields[19].isdigit():
            return None
        return cls(pid, int(fields[19]))  # starttime, field 22 of stat(5), counted after "pid (comm)"

    def cmdline(self) -> list[str] | None:
        try:
            with open(f"/proc/{self.pid}/cmdline", "rb") as cmdline_file:
                raw = cmdline_file.read()
        except OSError:
            return None
        return [arg.decode("utf-8", "surrogateescape") for arg in raw.split(b"\0")[:-1]] or None


@dataclass
class VmFacts:
    """What a save records and a restore compares, read over QMP."""

    status: str
    running: bool
    version: tuple[int, int, int]
    machine: str | None
    ram_size: int
    disks: list[StateDisk]
    process: QemuProcess | None

    @property
    def qemu_version(self) -> str:
        return ".".join(str(part) for part in self.version)


def read_vm_facts(qmp: QmpClient, vm: dict[str, t.Any]) -> VmFacts:
    """vm is describe_vm()'s result for the same client."""
    memory = qmp.execute("query-memory-size-summary") or {}
    try:
        machine: str | None = str(qmp.execute("qom-get", {"path": "/machine", "property": "type"}))
    except QmpError:
        machine = None
    return VmFacts(
        status=str(vm.get("status")),
        running=bool(vm.get("running")),
        version=qmp.version,
        machine=machine,
        ram_size=int(memory.get("base-memory", 0)) + int(memory.get("plugged-memory", 0) or 0),
        disks=[StateDisk.from_disk(disk) for disk in vm["block_devices"]],
        process=QemuProcess.of(qmp),
    )


@dataclass
class Sidecar:
    """The JSON record beside a state file (<path>.json, mode 0600)."""

    file: str
    size: int
    sha256: str
    compression: str | None
    live: bool
    time: str
    qemu_version: str
    machine: str | None
    ram_size: int
    disks: list[StateDisk]
    cmdline: list[str] | None = None
    with_overlays: list[dict[str, str]] = field(default_factory=list)
    last_restore: dict[str, t.Any] | None = None
    format: int = SIDECAR_FORMAT

    def as_dict(self) -> dict[str, t.Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: t.Any, where: str) -> Sidecar:
        if not isinstance(data, dict) or data.get("format") != SIDECAR_FORMAT:
            raise StateFileError(f"{where} is not a vmsnap state sidecar (format {SIDECAR_FORMAT}).", sidecar=where)
        try:
            disks = [StateDisk(**disk) for disk in data["disks"]]
            return cls(
                file=str(data["file"]),
                size=int(data["size"]),
                sha256=str(data["sha256"]),
                compression=data.get("compression"),
                live=bool(data["live"]),
                time=str(data["time"]),
                qemu_version=str(data["qemu_version"]),
                machine=data.get("machine"),
                ram_size=int(data["ram_size"]),
                disks=disks,
                cmdline=data.get("cmdline"),
                with_overlays=list(data.get("with_overlays") or []),
                last_restore=data.get("last_restore"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise StateFileError(f"{where} is damaged: {exc!r} is missing or wrong.", sidecar=where) from None


def sidecar_path(path: str) -> str:
    return path + ".json"


def read_sidecar(path: str) -> Sidecar | None:
    """The sidecar of the state file at path; None when there is none."""
    where = sidecar_path(path)
    try:
        with open(where, "rb") as sidecar_file:
            raw = sidecar_file.read(16 * 1024 * 1024)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateFileError(f"Cannot read {where}: {exc.strerror or exc}.", sidecar=where) from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except ValueError:
        raise StateFileError(f"{where} is damaged: it is not JSON.", sidecar=where) from None
    return Sidecar.from_dict(data, where)


def write_json_atomic(path: str, data: t.Any) -> None:
    """JSON written atomically (0600) through a temporary file that the sidecar clean-up recognises."""
    _files.write_json_atomic(path, data, temp=_temp_name(path))


def _temp_name(path: str) -> str:
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}{TEMP_MARK}{os.getpid()}-{time.monotonic_ns() % 1_000_000_000}")


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def remove_stale_temp_files(path: str) -> list[str]:
    """Temporary files of earlier saves to path whose task is gone (killed): they never look complete."""
    folder, name = os.path.split(path)
    prefix = f".{name}{TEMP_MARK}"
    removed = []
    try:
        entries = os.listdir(folder)
    except OSError:
        return removed
    for entry in entries:
        if not entry.startswith(prefix):
            continue
        pid_text = entry[len(prefix) :].split("-", 1)[0]
        if not pid_text.isdigit() or _pid_alive(int(pid_text)):
            continue
        _unlink_quietly(os.path.join(folder, entry))
        removed.append(os.path.join(folder, entry))
    return removed


def _pid_alive(pid: int) -> bool:
    """Whether the process runs; a killed task that nobody reaped yet (a zombie) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    fields = _proc_stat(pid)
    return not fields or fields[0] != b"Z"


def _proc_stat(pid: int) -> list[bytes] | None:
    """/proc/PID/stat's fields after "pid (comm)" (state first), or None when it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat_file:
            return stat_file.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None


def file_digest(path: str) -> tuple[int, str]:
    """(size, sha256) of a file."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as source:
        while True:
            chunk = source.read(_CHUNK)
            if not chunk:
                return size, digest.hexdigest()
            size += len(chunk)
            digest.update(chunk)


def file_magic(path: str) -> bytes:
    try:
        with open(path, "rb") as source:
            return source.read(4)
    except OSError:
        return b""


def reserve_bytes(ram_size: int) -> int:
    """Space a save may need: the RAM, page headers and device state."""
    return ram_size + max(_MARGIN_MIN_BYTES, ram_size // _MARGIN_RAM_DIVISOR)


# --- checks before anything is touched ---------------------------------------------------------------------------


def refuse_unsaveable(facts: VmFacts, live: bool) -> None:
    reason = _UNSAVEABLE.get(facts.status)
    if reason is None and facts.status not in ("running", "paused"):
        reason = "its state cannot be saved"
    if reason:
        raise ValidationError(
            f"The VM is in status {facts.status!r} and its state is not saved: {reason}.", vm_status=facts.status
        )
    if live and facts.version < BACKGROUND_SNAPSHOT_SINCE:
        raise ValidationError(
            f"live=true needs QEMU's background-snapshot (QEMU 6.0 or later); this VM runs QEMU {facts.qemu_version}. "
            "live=false works: it pauses the guest while its RAM is written."
        )


def wait_for_no_migration(qmp: QmpClient, timeout: float) -> None:
    """An earlier save (say, of a killed task) may still be writing: wait for it, up to timeout."""
    deadline = time.monotonic() + timeout
    while True:
        status = (qmp.execute("query-migrate") or {}).get("status")
        if status not in _ACTIVE_MIGRATION:
            return
        if time.monotonic() >= deadline:
            raise VmStateError(
                f"A migration or state save is still {status} in this VM after waiting {timeout:g} s (an earlier "
                "task that was killed?); nothing was done. Wait for it, or stop it with migrate_cancel.",
                migration_status=status,
            )
        time.sleep(_SLOW_POLL_SECONDS)


def mismatches(sidecar: Sidecar, facts: VmFacts, allow_other_version: bool) -> list[str]:
    """Everything in which the waiting QEMU differs from the VM whose state was saved."""
    problems = []
    if sidecar.qemu_version != facts.qemu_version and not allow_other_version:
        problems.append(
            f"QEMU version: saved by {sidecar.qemu_version}, the waiting QEMU is {facts.qemu_version} "
            "(force=true accepts another version when the machine type is the same)"
        )
    if sidecar.machine and facts.machine and sidecar.machine != facts.machine:
        problems.append(f"machine type: saved {sidecar.machine}, the waiting QEMU has {facts.machine}")
    if sidecar.ram_size != facts.ram_size:
        problems.append(f"RAM size: saved {sidecar.ram_size} bytes, the waiting QEMU has {facts.ram_size} bytes")
    saved = {disk.slot: disk for disk in sidecar.disks}
    waiting = {disk.slot: disk for disk in facts.disks}
    for slot, disk in saved.items():
        other = waiting.get(slot)
        if other is None:
            problems.append(f"disk {slot} ({disk.file}) of the saved VM is missing in the waiting QEMU")
        elif os.path.realpath(other.file) != os.path.realpath(disk.file):
            problems.append(f"disk {slot}: saved with {disk.file}, the waiting QEMU has {other.file} there")
        elif other.format != disk.format:
            problems.append(f"disk {slot}: saved as {disk.format}, the waiting QEMU opened it as {other.format}")
    for slot, disk in waiting.items():
        if slot not in saved:
            problems.append(f"the waiting QEMU has a disk {slot} ({disk.file}) that the saved VM did not have")
    return problems


def verify_state_file(path: str, sidecar: Sidecar) -> None:
    """The file is the one the sidecar describes: size and sha256."""
    try:
        size, digest = file_digest(path)
    except OSError as exc:
        raise StateFileError(f"Cannot read the state file {path}: {exc.strerror or exc}.", path=path) from None
    if size != sidecar.size or digest != sidecar.sha256:
        raise StateFileError(
            f"The state file {path} is damaged or was replaced: it has {size} bytes with sha256 {digest}, its "
            f"sidecar says {sidecar.size} bytes with sha256 {sidecar.sha256}.",
            path=path,
        )


# --- saving -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SaveRequest:
    path: str
    live: bool = True
    after: str = "running"  # running | paused | quit
    compress: bool = False
    timeout: float = 300.0


@dataclass
class SaveOutcome:
    downtime_ms: float = 0.0
    elapsed_ms: float = 0.0
    vm_status: str | None = None
    left_paused: bool = False
    sidecar: Sidecar | None = None
    warnings: list[str] = field(default_factory=list)


class _StateTarget:
    """The temporary file QEMU writes into: created exclusively beside path (0600), its space reserved."""

    def __init__(self, path: str, reserve: int) -> None:
        self.path = path
        self.temp = _temp_name(path)
        self.fd = -1
        try:
            self.fd = os.open(self.temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise VmStateError(
                f"Cannot create a temporary state file beside {path}: {exc.strerror or exc}; nothing was saved.",
                path=path,
            ) from None
        try:
            os.posix_fallocate(self.fd, 0, reserve)
        except OSError as exc:
            self.discard()
            free = _free_bytes(os.path.dirname(path))
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise InsufficientSpaceError(
                    f"Not enough space for the state file {path}: it needs up to {reserve} bytes (RAM plus device "
                    f"state), and its file system has {free} bytes free. The VM was not touched and keeps running.",
                    path=path,
                    needed_bytes=reserve,
                    free_bytes=free,
                ) from None
            raise VmStateError(
                f"Cannot reserve {reserve} bytes for the state file {path}: {exc.strerror or exc}. The VM was not "
                "touched. A live save only writes into reserved space (a failed write would hang QEMU).",
                path=path,
            ) from None

    def written_size(self) -> int:
        """QEMU's descriptor shares this one's offset: where it stopped writing is the stream's end."""
        return os.lseek(self.fd, 0, os.SEEK_CUR)

    def finish(self, compress: bool) -> tuple[str, int, str]:
        """Trim the reserve, fsync, compress when asked. Returns (finished temp file, size, sha256)."""
        os.ftruncate(self.fd, self.written_size())
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        if not compress:
            size, digest = file_digest(self.temp)
            return self.temp, size, digest
        packed = _temp_name(self.path)
        fd = os.open(packed, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        digest = hashlib.sha256()
        try:
            with os.fdopen(fd, "wb") as raw_out, open(self.temp, "rb") as source:
                digesting = _DigestingWriter(raw_out, digest)
                with gzip.GzipFile(fileobj=digesting, mode="wb", compresslevel=_GZIP_LEVEL, mtime=0) as out:
                    while True:
                        chunk = source.read(_CHUNK)
                        if not chunk:
                            break
                        out.write(chunk)
                raw_out.flush()
                os.fsync(raw_out.fileno())
                size = digesting.size
        except BaseException:
            _unlink_quietly(packed)
            raise
        _unlink_quietly(self.temp)
        self.temp = packed
        return packed, size, digest.hexdigest()

    def discard(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        _unlink_quietly(self.temp)


class _DigestingWriter:
    """A file-like sink that hashes and counts what goes through it (gzip writes its output here)."""

    def __init__(self, out: t.BinaryIO, digest: t.Any) -> None:
        self.out = out
        self.digest = digest
        self.size = 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.out.write(data)

    def flush(self) -> None:
        self.out.flush()


def _free_bytes(folder: str) -> int | None:
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


class _MigrationSettings:
    """Set background-snapshot and the bandwidth for one save; put both back afterwards, always.

    background-snapshot is never left on (a later real migration would only copy a snapshot), also when an earlier
    task was killed before it could switch it off: this one then sets it as it needs and switches it off after.
    """

    def __init__(self, qmp: QmpClient, live: bool) -> None:
        self.qmp = qmp
        self.live = live
        self.touched_background_snapshot = False
        self.old_bandwidth: int | None = None

    def apply(self) -> None:
        caps = {cap.get("capability"): cap.get("state") for cap in self.qmp.execute("query-migrate-capabilities")}
        if self.live and "background-snapshot" not in caps:
            raise ValidationError(
                "This QEMU has no background-snapshot migration capability; live=true cannot work. "
                "live=false works: it pauses the guest while its RAM is written."
            )
        # Every other capability changes what the stream holds (block: every disk's contents, far beyond the space
        # reserved) or how it is encoded (a restore would need it too), and most rule out a background snapshot.
        harmless = ("events", "zero-blocks", "background-snapshot")
        blocking = [name for name, on in caps.items() if on and name not in harmless]
        if blocking:
            raise ValidationError(
                f"The VM has migration capabilities on that a state file must not be saved with: "
                f"{', '.join(blocking)} (they change what the file holds, or rule out a background snapshot). "
                "Switch them off with migrate-set-capabilities first; nothing was saved."
            )
        if caps.get("background-snapshot") and not self.live:
            self._set_background_snapshot(False)  # left on by a killed task: a plain save must not be one
        if self.live:
            try:
                self.touched_background_snapshot = True
                self._set_background_snapshot(True)
            except QmpError as exc:
                raise ValidationError(
                    f"QEMU cannot take a background snapshot of this VM: {exc.desc}. (It needs userfaultfd "
                    "write-protection, so root or vm.unprivileged_userfaultfd=1, and guest RAM that is anonymous, "
                    "memfd, /dev/shm or hugetlbfs, not a file on a regular file system.) Nothing was saved. "
                    "live=false works: it pauses the guest while its RAM is written."
                ) from None
        params = self.qmp.execute("query-migrate-parameters") or {}
        if "max-bandwidth" in params:
            self.old_bandwidth = int(params["max-bandwidth"])
            self.qmp.execute("migrate-set-parameters", {"max-bandwidth": _SAVE_BANDWIDTH})

    def restore(self) -> list[str]:
        """Put the settings back; returns problems (a save must not fail because of this)."""
        problems = []
        if self.touched_background_snapshot:
            try:
                self._set_background_snapshot(False)
            except VmsnapError as exc:
                problems.append(f"switching background-snapshot off again failed: {exc.msg}")
        if self.old_bandwidth is not None:
            try:
                self.qmp.execute("migrate-set-parameters", {"max-bandwidth": self.old_bandwidth})
            except VmsnapError as exc:
                problems.append(f"putting max-bandwidth back to {self.old_bandwidth} failed: {exc.msg}")
        return problems

    def _set_background_snapshot(self, state: bool) -> None:
        self.qmp.execute(
            "migrate-set-capabilities", {"capabilities": [{"capability": "background-snapshot", "state": state}]}
        )


def save_state(
    qmp: QmpClient,
    facts: VmFacts,
    request: SaveRequest,
    while_paused: t.Callable[[], list[dict[str, str]]] | None = None,
) -> SaveOutcome:
    """Write the VM's state to request.path (+ sidecar), then bring the VM to request.after.

    while_paused runs between the pause and the start of the save (the external snapshot's transaction), so disks
    and RAM are captured at the same instant; it returns the overlays it made, for the sidecar. The live order is
    stop -> while_paused -> migrate; QEMU's migration thread then finds the VM paused, saves device state at that
    instant, write-protects RAM and (7.2) resumes the guest itself; later QEMU keeps a paused VM paused, so the
    module resumes it once the RAM is being written - it checks which happened, it does not assume.
    """
    outcome = SaveOutcome()
    refuse_unsaveable(facts, request.live)
    wait_for_no_migration(qmp, request.timeout)
    remove_stale_temp_files(request.path)
    target = _StateTarget(request.path, reserve_bytes(facts.ram_size))
    settings = _MigrationSettings(qmp, request.live)
    fd_name = f"vmsnap-state-{os.getpid()}"
    started = time.monotonic()
    stopped_by_us = False
    fd_given = False
    migrate = "not sent"  # not sent | sent | refused | accepted
    overlays: list[dict[str, str]] = []
    try:
        settings.apply()
        qmp.execute("getfd", {"fdname": fd_name}, fd=target.fd)
        fd_given = True
        qmp.poll_events()
        qmp.take_events(("STOP", "RESUME"))
        if facts.running:
            mark_paused(qmp)  # a killed task's pause is then recognised and ended by the next run
            qmp.execute("stop")
            stopped_by_us = True
        if while_paused is not None:
            overlays = while_paused()
        migrate = "sent"  # until QEMU answers: no answer means it may be running
        try:
            qmp.execute("migrate", {"uri": f"fd:{fd_name}"})
        except QmpError:
            migrate = "refused"  # nothing of ours runs (what does may be someone else's)
            raise
        migrate = "accepted"
        if request.live:
            _wait_for_capture(qmp, request.timeout)
            running = _is_running(qmp)
            if stopped_by_us and not running:
                qmp.execute("cont")
            elif not facts.running and running:
                outcome.warnings.append(
                    f"QEMU {facts.qemu_version} resumed the paused guest once its state was captured (its background "
                    "snapshot always does) and it ran while its RAM was written; the state holds the paused moment."
                )
        _wait_for_completion(qmp, request)
    except BaseException as exc:
        died = isinstance(exc, VmsnapError) and bool(exc.details.get("vm_died"))
        # A dead QEMU has no migration to cancel, no settings to put back and no guest to resume.
        problems = [] if died else _abandon_save(qmp, migrate, fd_name if fd_given else None, settings, request.timeout)
        target.discard()
        if stopped_by_us and not died:
            _resume_quietly(qmp)
        if isinstance(exc, VmsnapError):
            if died:
                exc.msg += f" The unfinished state file was removed: nothing was saved at {request.path}."
            if problems:
                exc.msg += f" Cleaning up: {'; '.join(problems)}."
            exc.details.setdefault("overlays_taken", overlays)
            # Paused and resumed, or a save started and thrown away: the VM went through something.
            exc.details.setdefault("changed", stopped_by_us or migrate != "not sent" or bool(overlays))
        raise
    try:
        outcome.warnings.extend(settings.restore())
        if request.after == "running":
            # The stream is complete: a guest that was paused for it (live=false) need not wait for fsync and gzip.
            outcome.vm_status = bring_to(qmp, "running")
        outcome.downtime_ms, outcome.left_paused = pause_of_this_task(qmp, wait_for_resume=request.live)
        outcome.sidecar = _put_in_place(target, request, facts, overlays)
        outcome.elapsed_ms = round((time.monotonic() - started) * 1000, 3)
        if request.after != "running":
            outcome.vm_status = bring_to(qmp, request.after)
    except VmsnapError as exc:
        exc.details.setdefault("changed", True)  # the VM's state was written, and the VM went through a save
        exc.details.setdefault("overlays_taken", overlays)
        raise
    return outcome


def _abandon_save(
    qmp: QmpClient, migrate: str, fd_name: str | None, settings: _MigrationSettings, timeout: float
) -> list[str]:
    """After a failure: stop a save that may run (never one QEMU refused to start: that may be someone else's),
    wait until it has ended, give back a descriptor QEMU never used, and put the migration settings back."""
    problems: list[str] = []
    with contextlib.suppress(VmsnapError):
        status = (qmp.execute("query-migrate") or {}).get("status")
        if migrate in ("sent", "accepted"):
            if status in _ACTIVE_MIGRATION:
                qmp.execute("migrate_cancel")
            deadline = time.monotonic() + min(timeout, _CANCEL_SECONDS)
            while status in _ACTIVE_MIGRATION and time.monotonic() < deadline:
                time.sleep(_SLOW_POLL_SECONDS)
                status = (qmp.execute("query-migrate") or {}).get("status")
            if status in _ACTIVE_MIGRATION:
                problems.append(f"the cancelled save is still {status}; check query-migrate")
    if fd_name is not None and migrate in ("not sent", "refused"):
        with contextlib.suppress(VmsnapError):  # QEMU keeps a descriptor that no migration took until closefd
            qmp.execute("closefd", {"fdname": fd_name})
    problems.extend(settings.restore())
    return problems


def _put_in_place(
    target: _StateTarget, request: SaveRequest, facts: VmFacts, overlays: list[dict[str, str]]
) -> Sidecar:
    """Trim, fsync, compress; then the sidecar and the file are renamed into place (in that order)."""
    try:
        finished, size, digest = target.finish(request.compress)
    except OSError as exc:
        target.discard()
        raise VmStateError(
            f"QEMU wrote the state, but finishing the file{' (compressing it)' if request.compress else ''} failed: "
            f"{exc.strerror or exc}. Nothing was kept.",
            path=request.path,
        ) from None
    sidecar = Sidecar(
        file=os.path.basename(request.path),
        size=size,
        sha256=digest,
        compression="gzip" if request.compress else None,
        live=request.live,
        time=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        qemu_version=facts.qemu_version,
        machine=facts.machine,
        ram_size=facts.ram_size,
        # Read before the pause: with overlays taken in the same instant, these are the images below them.
        disks=facts.disks,
        cmdline=facts.process.cmdline() if facts.process else None,
        with_overlays=overlays,
    )
    try:
        # Sidecar first: a state file at path without its sidecar never comes from this module.
        write_json_atomic(sidecar_path(request.path), sidecar.as_dict())
        os.rename(finished, request.path)
        _files.fsync_folder(os.path.dirname(request.path))
    except OSError as exc:
        _unlink_quietly(finished)
        raise VmStateError(
            f"QEMU wrote the state, but putting it in place as {request.path} failed: {exc.strerror or exc}.",
            path=request.path,
        ) from None
    return sidecar


def _is_running(qmp: QmpClient) -> bool:
    return bool((qmp.execute("query-status") or {}).get("running"))


def _resume_quietly(qmp: QmpClient) -> None:
    with contextlib.suppress(VmsnapError):
        if not _is_running(qmp):
            qmp.execute("cont")


def _wait_for_capture(qmp: QmpClient, timeout: float) -> None:
    """Until device state is saved and RAM write-protected: QEMU resumed the guest (7.2), or RAM pages flow."""
    deadline = time.monotonic() + timeout
    while True:
        qmp.poll_events()
        if any(event.get("event") == "RESUME" for event in qmp.events):
            return
        status, info = _migration(qmp)
        if status == "completed":
            return
        ram = info.get("ram") or {}
        if status == "active" and ram.get("total") and int(ram.get("remaining", 0)) < int(ram["total"]):
            return  # RAM is iterated only after the device state was saved and RAM write-protected
        if time.monotonic() >= deadline:
            raise VmStateError(
                f"QEMU did not start writing the state within {timeout:g} s (migration {status}); cancelled.",
                migration_status=status,
            )
        time.sleep(_POLL_SECONDS)


def _wait_for_completion(qmp: QmpClient, request: SaveRequest) -> None:
    deadline = time.monotonic() + request.timeout
    while True:
        status, dummy = _migration(qmp)
        if status == "completed":
            return
        if time.monotonic() >= deadline:
            raise VmStateError(
                f"Saving the VM state to {request.path} did not finish within {request.timeout:g} s (migration "
                f"{status}); it was cancelled and nothing was kept. Raise timeout for a VM with this much RAM.",
                migration_status=status,
            )
        time.sleep(_SLOW_POLL_SECONDS)


def _migration(qmp: QmpClient) -> tuple[str | None, dict[str, t.Any]]:
    """The outgoing migration's status and details; a failed or cancelled one raises."""
    info = qmp.execute("query-migrate") or {}
    status = info.get("status")
    if status in ("failed", "cancelled"):
        raise VmStateError(
            f"QEMU could not save the VM state: {info.get('error-desc') or status}. Nothing was kept.",
            migration_status=status,
        )
    return status, info


def bring_to(qmp: QmpClient, after: str) -> str | None:
    """Resume, pause or quit the VM. Returns its status afterwards (None once QEMU has quit)."""
    if after == "quit":
        qmp.execute("quit")
        try:
            qmp.wait_event(lambda event: False, _QUIT_SECONDS)  # reads until QEMU closes the socket
        except QmpConnectionError:
            return None
        raise VmStateError(f"The state was saved, but QEMU did not quit within {_QUIT_SECONDS:g} s of quit.")
    running = _is_running(qmp)
    if after == "running" and not running:
        qmp.execute("cont")
    elif after == "paused" and running:
        qmp.execute("stop")
    return str((qmp.execute("query-status") or {}).get("status"))


# --- restoring ----------------------------------------------------------------------------------------------------


@dataclass
class RestoreOutcome:
    elapsed_ms: float = 0.0
    vm_status: str | None = None
    warnings: list[str] = field(default_factory=list)


def refuse_unrestorable(path: str, sidecar: Sidecar | None, facts: VmFacts, allow_other_version: bool) -> Sidecar:
    """Every check before QEMU is touched; raises with all the mismatches at once."""
    if sidecar is None:
        raise StateFileError(
            f"{path} has no sidecar ({sidecar_path(path)}), so nothing says which VM it fits; QEMU could load it "
            "into the wrong disks without noticing. Refusing; the waiting QEMU was not touched.",
            path=path,
        )
    if facts.status != "inmigrate":
        raise ValidationError(
            f"The VM is not waiting for an incoming state (status {facts.status!r}). Start QEMU with the saved VM's "
            "command line plus -incoming defer, then restore into it.",
            vm_status=facts.status,
        )
    problems = mismatches(sidecar, facts, allow_other_version)
    if problems:
        raise ValidationError(
            f"The state in {path} does not fit the waiting QEMU: {'; '.join(problems)}. Nothing was loaded and "
            "QEMU keeps waiting; start it with the saved VM's command line (the sidecar records it).",
            mismatches=problems,
        )
    verify_state_file(path, sidecar)
    return sidecar


def already_restored_into(sidecar: Sidecar | None, facts: VmFacts) -> bool:
    """Whether this module restored this state into exactly this QEMU process before."""
    if sidecar is None or not isinstance(sidecar.last_restore, dict) or facts.process is None:
        return False
    return (
        sidecar.last_restore.get("pid") == facts.process.pid
        and sidecar.last_restore.get("start_ticks") == facts.process.start_ticks
        and sidecar.last_restore.get("sha256") == sidecar.sha256
    )


def _restore_marker(sidecar: Sidecar) -> str:
    return f"vmsnap-restored-{str(sidecar.sha256)[:40]}"


def _mark_restoring(qmp: QmpClient, sidecar: Sidecar) -> None:
    """Before the load: a marker object in the waiting QEMU that names the state (an empty QOM secret; objects stay
    through an incoming migration and end with the process), so that the next run knows this QEMU loaded it even when
    the task was killed before it recorded the restore in the sidecar."""
    with contextlib.suppress(QmpError):
        qmp.execute("object-add", {"qom-type": "secret", "id": _restore_marker(sidecar), "data": "vmsnap"})


def restored_by_killed_task(qmp: QmpClient, sidecar: Sidecar | None) -> bool:
    """Whether this QEMU has completed loading this state for a task that could not record it (it was killed)."""
    if sidecar is None or not sidecar.sha256:
        return False
    objects = qmp.execute("qom-list", {"path": "/objects"}, expect=list)
    names = {str(entry.get("name")) for entry in objects if isinstance(entry, dict)}
    if _restore_marker(sidecar) not in names:
        return False
    return qmp.execute("query-migrate", expect=dict).get("status") == "completed"


def restore_state(
    qmp: QmpClient, path: str, sidecar: Sidecar, facts: VmFacts, after: str, timeout: float
) -> RestoreOutcome:
    """Load the state into the waiting QEMU (-incoming defer), then resume it unless after=paused."""
    outcome = RestoreOutcome()
    started = time.monotonic()
    feeder: _GunzipFeeder | None = None
    fd_name = f"vmsnap-restore-{os.getpid()}"
    fd_given = False
    incoming = "not sent"  # not sent | refused | sent (QEMU is loading, or may be)
    source_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if sidecar.compression == "gzip":
            feeder = _GunzipFeeder(source_fd)
            give = feeder.read_end
        else:
            give = source_fd
        qmp.execute("getfd", {"fdname": fd_name}, fd=give)
        fd_given = True
        if feeder is not None:
            feeder.start()
        _mark_restoring(qmp, sidecar)
        incoming = "sent"
        try:
            qmp.execute("migrate-incoming", {"uri": f"fd:{fd_name}"})
        except QmpError:
            incoming = "refused"
            raise
        _wait_for_load(qmp, path, timeout, feeder)
        outcome.elapsed_ms = round((time.monotonic() - started) * 1000, 3)
        status = (qmp.execute("query-status") or {}).get("status")
        if after == "paused" and status == "running":
            outcome.warnings.append(
                "QEMU resumed the guest by itself as soon as the state was loaded (the state was saved while the "
                "guest ran, and QEMU was started without -S); it was paused again right away."
            )
        outcome.vm_status = bring_to(qmp, after)
    except VmsnapError as exc:
        if fd_given and incoming != "sent":
            with contextlib.suppress(VmsnapError):
                qmp.execute("closefd", {"fdname": fd_name})
        exc.details.setdefault("changed", incoming == "sent")
        raise
    finally:
        if feeder is not None:
            feeder.close()
        os.close(source_fd)
    _record_restore(path, sidecar, facts, outcome)
    return outcome


def _record_restore(path: str, sidecar: Sidecar, facts: VmFacts, outcome: RestoreOutcome) -> None:
    """Note in the sidecar which QEMU process got this state, so that a second restored knows."""
    if facts.process is None:
        outcome.warnings.append("The QEMU process behind the socket is unknown; a second restored will be refused.")
        return
    sidecar.last_restore = {
        "pid": facts.process.pid,
        "start_ticks": facts.process.start_ticks,
        "sha256": sidecar.sha256,
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        write_json_atomic(sidecar_path(path), sidecar.as_dict())
    except OSError as exc:
        outcome.warnings.append(
            f"The state was restored, but recording that in {sidecar_path(path)} failed ({exc.strerror or exc}); "
            "a second restored into this QEMU will be refused instead of reported unchanged."
        )


def _wait_for_load(qmp: QmpClient, path: str, timeout: float, feeder: _GunzipFeeder | None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            status = (qmp.execute("query-status") or {}).get("status")
            migration = qmp.execute("query-migrate") or {}
        except QmpConnectionError:
            problem = f" ({feeder.error})" if feeder is not None and feeder.error else ""
            raise VmStateError(
                f"QEMU exited while loading the state from {path}{problem}: QEMU 7.2 quits when a state does not "
                "load (a damaged file, or a VM that does not match it; its own log says which). Start it again "
                "with -incoming defer.",
                qemu_exited=True,
            ) from None
        if migration.get("status") == "failed":
            raise VmStateError(f"QEMU could not load the state from {path}: {migration.get('error-desc')}.")
        if status != "inmigrate" and migration.get("status") not in _ACTIVE_MIGRATION:
            return
        if time.monotonic() >= deadline:
            fed = (
                " This task decompresses the file into QEMU: once it ends, QEMU reads a cut-off state and (7.2) exits."
                if feeder is not None
                else ""
            )
            raise VmStateError(
                f"Loading the state from {path} did not finish within {timeout:g} s; QEMU is still loading it "
                f"(status {status}).{fed}",
                vm_status=status,
            )
        time.sleep(_POLL_SECONDS)


class _GunzipFeeder:
    """Decompresses a gzip state file into a pipe that QEMU reads (incoming only: a failed write here just
    makes the load fail, it cannot hang a running guest)."""

    def __init__(self, source_fd: int) -> None:
        self.source_fd = source_fd
        self.read_end, self.write_end = os.pipe()
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            sink_fd, self.write_end = self.write_end, -1
            with os.fdopen(sink_fd, "wb") as sink, os.fdopen(os.dup(self.source_fd), "rb") as raw:
                source = gzip.GzipFile(fileobj=raw, mode="rb")
                while True:
                    chunk = source.read(_CHUNK)
                    if not chunk:
                        return
                    sink.write(chunk)
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            self.error = f"decompressing failed: {exc}"

    def close(self) -> None:
        if self.read_end >= 0:
            os.close(self.read_end)
            self.read_end = -1
        self._thread.join(timeout=5)
        if self.write_end >= 0:
            os.close(self.write_end)
            self.write_end = -1
