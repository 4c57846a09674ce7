# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!

"""The one qemu-img runner: argv lists, LANG=C, JSON output, one error type."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import stat
import struct
import subprocess
import typing as t
from concurrent.futures import ThreadPoolExecutor

from ansible_collections.vmsnap.qemu.plugins.module_utils._errors import ImageInUseError, QemuImgError
from ansible_collections.vmsnap.qemu.plugins.module_utils._image import ImageInfo, parse_info
from ansible_collections.vmsnap.qemu.plugins.module_utils._qcow2_native import probe_qemu_locks, read_qcow2_layer

if t.TYPE_CHECKING:
    from ansible.module_utils.basic import AnsibleModule

C_LOCALE = {"LANG": "C", "LC_ALL": "C", "LC_MESSAGES": "C"}

# Printed by QEMU's file-posix locking when another process holds a conflicting lock.
_WRITE_LOCK_MARKERS = ('Failed to get "write" lock', 'Failed to get shared "write" lock')

_LOCKED_IMAGE = re.compile(r"Is another process using the image \[(.*)\]\?")

LIVE_SNAPSHOT_HINT = (
    "Take snapshots of a running VM through its QMP socket with vmsnap.qemu.qmp_live_snapshot, "
    "or shut the VM down first."
)

# qemu-img processes on different images are independent; more than a few only queue up.
MAX_PARALLEL = max(2, min(8, os.cpu_count() or 1))

# Every qemu-img call is killed when it runs longer than this: a hung file system (an NFS server gone away)
# blocks it in the kernel, and the task holds the image lock meanwhile. Metadata calls touch a few clusters.
METADATA_TIMEOUT = 300.0
# Calls that read or copy guest data (convert, commit, rebase, compare, check, map) and snapshot calls (a revert
# or delete walks every L2 table: killed half-way, a revert leaves the image half reverted) get this base plus one
# second per DATA_RATE bytes of the images they name (the larger of file size and virtual size).
DATA_TIMEOUT = 3600.0
DATA_RATE = 5 * 1024 * 1024
_METADATA_COMMANDS = frozenset(("info", "bitmap", "create", "measure", "amend", "resize"))
# After SIGKILL, how long to wait for the process to go (a process stuck on a dead NFS server may not).
_REAP_SECONDS = 5.0

T = t.TypeVar("T")
R = t.TypeVar("R")
Execute = t.Callable[[t.List[str], t.Optional[float]], t.Tuple[int, str, str]]


def refuse_if_in_use(info: ImageInfo, path: str) -> None:
    """Raise before any write when QEMU's locks say a running VM writes the image or forbids writers."""
    if info.in_use:
        raise ImageInUseError(
            f"Image {path} is in use by a running QEMU (its image locks forbid writing it); qemu-img must not "
            f"change it. {LIVE_SNAPSHOT_HINT}",
            image_path=path,
        )


def is_lock_error(stderr: str) -> bool:
    return any(marker in stderr for marker in _WRITE_LOCK_MARKERS)


def execute_argv(cmd: list[str], timeout: float | None = None) -> tuple[int, str, str]:
    """Run an argv list without a shell, in the C locale, and return (rc, stdout, stderr).

    Plain subprocess rather than AnsibleModule.run_command: it costs about 4 ms less per call, which is
    most of the module's per-disk overhead over raw qemu-img (see docs/performance.md), and it is thread-safe.
    After timeout seconds the process gets SIGKILL and subprocess.TimeoutExpired is raised. It stays in the
    task's process group, so that whoever kills the task's group (a killed run, a test) kills it too.
    """
    # Not a with-block: its exit waits for the process, which may never end on a dead file server.
    proc = subprocess.Popen(  # pylint: disable=consider-using-with
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(os.environ, **C_LOCALE),
        text=True,
        errors="surrogateescape",
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        # A process in uninterruptible sleep on a dead server gets the kill only when its I/O returns, and a
        # child of a stand-in may hold the pipes: wait a little, never forever.
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=_REAP_SECONDS)
        raise
    return proc.returncode, out, err


def _image_bytes(spec: str) -> int:
    """The larger of a file's size and, for qcow2, its virtual size (0 when it cannot be read). A json: spec that
    the collection builds (a layer without its backing chain) counts its file."""
    path = _json_spec_file(spec) if spec.startswith("json:") else spec
    if not path.startswith("/"):
        return 0
    try:
        # O_NONBLOCK: a FIFO at the name must not block the sizing (it does nothing for regular files). Symlinks
        # are followed: a disk's path is often a link to the image, which is what must be sized.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return 0
    try:
        info = os.fstat(fd)
        header = os.pread(fd, 32, 0) if stat.S_ISREG(info.st_mode) else b""
        size = info.st_size
    except OSError:
        return 0
    finally:
        os.close(fd)
    if len(header) == 32 and header[:4] == b"QFI\xfb":
        size = max(size, struct.unpack(">Q", header[24:32])[0])
    return size


def timeout_for(args: list[str], metadata: float = METADATA_TIMEOUT, data: float = DATA_TIMEOUT) -> float:
    """Seconds a 'qemu-img ARGS' call may run: fixed for metadata, growing with the named images for data."""
    if args and args[0] in _METADATA_COMMANDS:
        return metadata
    paths = args[args.index("--") + 1 :] if "--" in args else []
    return data + sum(_image_bytes(path) for path in paths) / DATA_RATE


def _json_spec_file(spec: str) -> str:
    try:
        options = json.loads(spec[len("json:") :])
        name = options["file"]["filename"]
    except (ValueError, RecursionError, KeyError, TypeError):
        return ""
    return name if isinstance(name, str) else ""


class QemuImg:
    """Runs qemu-img for a module. It never looks at check mode: callers decide whether to act."""

    def __init__(
        self,
        module: AnsibleModule,
        execute: Execute = execute_argv,
        metadata_timeout: float = METADATA_TIMEOUT,
        data_timeout: float = DATA_TIMEOUT,
    ) -> None:
        self.binary = module.get_bin_path("qemu-img", required=True)
        self._execute = execute
        self.metadata_timeout = metadata_timeout
        self.data_timeout = data_timeout

    def run(self, args: list[str]) -> str:
        """Run 'qemu-img ARGS' and return stdout; raise QemuImgError (or ImageInUseError) on failure."""
        cmd = [self.binary] + args
        rc, out, err = self._call(cmd)
        if rc != 0:
            raise self._error(cmd, rc, out, err)
        return out

    def _call(self, cmd: list[str]) -> tuple[int, str, str]:
        """The process seam with this call's time limit; a call that outlives it is killed and never a success."""
        timeout = timeout_for(cmd[1:], self.metadata_timeout, self.data_timeout)
        try:
            return self._execute(cmd, timeout)
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
            err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
            named = ", ".join(arg for arg in cmd[cmd.index("--") + 1 :] if arg.startswith("/")) if "--" in cmd else ""
            raise QemuImgError(
                f"{' '.join(cmd)} did not finish within {timeout:.0f} s and was killed; {named or cmd[-1]} may be "
                "on a hung file system (an NFS or other network server that stopped answering). Nothing was reported "
                "as done: check the storage, then run the task again.",
                cmd,
                -int(signal.SIGKILL),
                out,
                err,
            ) from None
        except OSError as exc:
            raise QemuImgError(f"Cannot run {' '.join(cmd)}: {exc}", cmd, 127, "", str(exc)) from None

    def run_json(self, args: list[str]) -> t.Any:
        out = self.run(args)
        try:
            return json.loads(out)
        except (ValueError, RecursionError) as exc:  # RecursionError: nesting deeper than the parser's stack
            cmd = [self.binary] + args
            raise QemuImgError(f"Could not parse the JSON output of {' '.join(cmd)}: {exc}", cmd, 0, out, "") from None

    def info(self, path: str, backing_chain: bool = True) -> ImageInfo:
        """Read an image; an image locked by a running QEMU is re-read with --force-share and marked in_use."""
        args = ["info", "--output=json"] + (["--backing-chain"] if backing_chain else [])
        try:
            try:
                data = self.run_json(args + ["--", path])
                # qemu-img only notices writers; a VM using the image read-only also forbids writes.
                locks = probe_qemu_locks(path)
                in_use = locks is not None and locks.blocks_writes
            except ImageInUseError:
                data = self.run_json(args + ["--force-share", "--", path])
                in_use = True
        except QemuImgError as exc:
            exc.msg = f"Cannot read image {path}: {exc.stderr.strip() or exc.msg}"
            raise
        try:
            return parse_info(data, in_use=in_use)
        except (KeyError, TypeError, ValueError) as exc:
            raise QemuImgError(
                f"Unexpected qemu-img info JSON for {path}: {exc!r}",
                [self.binary] + args + [path],
                0,
                json.dumps(data),
                "",
            ) from None

    def read_top(self, path: str) -> ImageInfo:
        """The image's own snapshots and bitmaps (no chain): read directly when it is a plain qcow2 image
        that no process holds, else through qemu-img info. Same model either way."""
        locks = probe_qemu_locks(path)
        if locks is not None and not locks.blocks_writes:
            layer = read_qcow2_layer(path)
            if layer is not None:
                return ImageInfo(chain=(layer,), in_use=False)
        return self.info(path, backing_chain=False)

    def read_top_many(self, paths: list[str]) -> list[ImageInfo]:
        return self.map_parallel(self.read_top, paths)

    @staticmethod
    def map_parallel(func: t.Callable[[T], R], items: t.Sequence[T]) -> list[R]:
        """func over items, several qemu-img processes at a time; results in input order."""
        if len(items) <= 1:
            return [func(item) for item in items]
        with ThreadPoolExecutor(max_workers=min(MAX_PARALLEL, len(items))) as pool:
            return list(pool.map(func, items))

    def check(self, path: str, force_share: bool = False) -> dict[str, t.Any]:
        """'qemu-img check' never raises on rc 2 (corrupt) or 3 (leaks): the JSON says what was found."""
        cmd = [self.binary, "check", "--output=json"] + (["--force-share"] if force_share else []) + ["--", path]
        rc, out, err = self._call(cmd)
        if rc not in (0, 2, 3):
            raise self._error(cmd, rc, out, err)
        try:
            result = json.loads(out)
        except (ValueError, RecursionError):
            result = None
        if not isinstance(result, dict):
            raise QemuImgError(f"Could not parse the JSON output of qemu-img check for {path}", cmd, rc, out, err)
        result["rc"] = rc
        return result

    def snapshot_create(self, path: str, name: str) -> None:
        self.run(["snapshot", "-q", "-c", name, "--", path])

    def snapshot_delete(self, path: str, name: str) -> None:
        """Deletes by tag only (qemu-img matches -d against tags, never IDs)."""
        self.run(["snapshot", "-q", "-d", name, "--", path])

    def snapshot_apply(self, path: str, name: str) -> None:
        """qemu-img -a tries IDs before tags: callers must refuse purely numeric names."""
        self.run(["snapshot", "-q", "-a", name, "--", path])

    def create_overlay(self, path: str, backing: str, backing_format: str, size: str | None = None) -> None:
        """A new qcow2 file on top of backing; the backing format is always explicit (-F, mandatory since 6.1)."""
        self.run(
            ["create", "-q", "-f", "qcow2", "-b", backing, "-F", backing_format, "--", path] + ([size] if size else [])
        )

    def commit(self, path: str, drop_top: bool) -> None:
        """Write path's data into its backing file, in place. drop_top skips emptying path (it is deleted next)."""
        self.run(["commit", "-q", "-f", "qcow2"] + (["-d"] if drop_top else []) + ["--", path])

    def convert_standalone(self, source: str, target: str, compress: bool, bitmaps: bool) -> None:
        """Copy what source's whole chain shows into a new qcow2 file with no backing file."""
        args = ["convert", "-q", "-O", "qcow2"] + (["-c"] if compress else []) + (["--bitmaps"] if bitmaps else [])
        self.run(args + ["--", source, target])

    def allocated_bytes(self, path: str) -> int:
        """Guest bytes that path itself defines (data or zeroes, not its backing files), from qemu-img map."""
        extents = self.run_json(["map", "--output=json", "--", path])
        if not isinstance(extents, list) or not all(
            isinstance(ext, dict) and isinstance(ext.get("length"), int) and ext["length"] >= 0 for ext in extents
        ):
            raise QemuImgError(
                f"Unexpected qemu-img map output for {path}: an extent without a length.",
                [self.binary, "map", "--output=json", "--", path],
                0,
                json.dumps(extents)[:2000],
                "",
            )
        return sum(ext["length"] for ext in extents if ext.get("present") and ext.get("depth") == 0)

    def compare(self, first: str, second: str) -> bool:
        """Whether two images show the guest the same data; rc 1 means they differ, anything else is an error."""
        cmd = [self.binary, "compare", "-q", "--", first, second]
        rc, out, err = self._call(cmd)
        if rc not in (0, 1):
            raise self._error(cmd, rc, out, err)
        return rc == 0

    def rebase(self, path: str, backing: str, backing_format: str, unsafe: bool) -> None:
        """Point path at backing; the safe mode copies the differences so the guest sees the same data."""
        self.run(
            ["rebase", "-q", "-f", "qcow2"]
            + (["-u"] if unsafe else [])
            + ["-b", backing, "-F", backing_format, "--", path]
        )

    def _error(self, cmd: list[str], rc: int, out: str, err: str) -> QemuImgError:
        detail = (err or out).strip()
        if is_lock_error(err):
            named = _LOCKED_IMAGE.search(err)
            path = named.group(1) if named else cmd[-1]
            return ImageInUseError(
                f"Image {path} is in use by another process (a running QEMU holds its lock): {detail}. "
                + LIVE_SNAPSHOT_HINT,
                image_path=path,
                cmd=cmd,
                rc=rc,
                stdout=out,
                stderr=err,
            )
        if rc < 0:
            detail = f"qemu-img was killed by signal {-rc}. {detail}".strip()
            return QemuImgError(detail, cmd, rc, out, err)
        return QemuImgError(f"qemu-img failed (rc={rc}): {detail}", cmd, rc, out, err)
