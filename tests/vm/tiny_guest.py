# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""A tiny real Linux guest for end-to-end tests.

``build_tiny_guest`` assembles a Debian bookworm cloud kernel and a busybox
initramfs with qemu-guest-agent from ``apt-get download``-ed packages (nothing
is installed on the host).  ``GuestVM`` boots it under QEMU TCG with qcow2 disks,
a QMP socket, a serial shell socket and a guest-agent socket.

Recipe: /work/shared/reference/tiny-guest.md.  Standard library only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import json
import os
import random
import re
import shutil
import socket
import stat
import subprocess
import time
import typing as t
from pathlib import Path

KERNEL_METAPACKAGE = "linux-image-cloud-amd64"
USER_PACKAGES = (
    "busybox-static",
    "qemu-guest-agent",
    "libc6",
    "libglib2.0-0",
    "libpcre2-8-0",
    "libnuma1",
    "libudev1",
    "liburing2",
)
MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_blk",
    "virtio_console",
)
AGENT_PORT_NAME = "org.qemu.guest_agent.0"
READY_MARKER = b"GUEST-READY"
LIB_DIR = "lib/x86_64-linux-gnu"
LOADER = "ld-linux-x86-64.so.2"
BUILD_FORMAT = "1"  # bump when the initramfs layout or /init changes

INIT_SCRIPT = r"""#!/bin/sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /run
exec </dev/console >/dev/console 2>&1
echo "tiny-guest: init starting"

for m in @MODULES@; do
    insmod "/lib/modules/$m.ko" || echo "tiny-guest: insmod $m failed"
done

i=0
while [ ! -b /dev/vda ] && [ "$i" -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
mkdir -p /mnt/data
if [ -b /dev/vda ]; then
    if ! mount -t ext4 /dev/vda /mnt/data; then
        echo "tiny-guest: /dev/vda has no file system, running mke2fs"
        mke2fs /dev/vda && mount -t ext4 /dev/vda /mnt/data || echo "tiny-guest: cannot mount /dev/vda"
    fi
else
    echo "tiny-guest: no /dev/vda"
fi

has_vs=0
for d in /sys/bus/virtio/devices/*; do
    [ "$(cat "$d/device" 2>/dev/null)" = "0x0003" ] && has_vs=1
done
if [ "$has_vs" = 1 ]; then
    port=
    i=0
    while [ -z "$port" ] && [ "$i" -lt 50 ]; do
        for p in /sys/class/virtio-ports/vport*; do
            [ "$(cat "$p/name" 2>/dev/null)" = "@AGENT_PORT@" ] && port="${p##*/}"
        done
        [ -z "$port" ] && sleep 0.1
        i=$((i + 1))
    done
    if [ -n "$port" ]; then
        LD_LIBRARY_PATH=/lib/x86_64-linux-gnu qemu-ga -m virtio-serial -p "/dev/$port" -t /run \
            -f /run/qemu-ga.pid -l /run/qemu-ga.log -d || echo "tiny-guest: qemu-ga failed"
    else
        echo "tiny-guest: no @AGENT_PORT@ port"
    fi
fi

stty -F /dev/ttyS1 -echo -onlcr
echo "tiny-guest: init done"
while true; do
    setsid sh -c 'exec </dev/ttyS1 >/dev/ttyS1 2>&1; echo @READY@; PS1= PS2= exec sh -i'
    sleep 0.2
done
"""


def default_cache_dir() -> Path:
    """$VMSNAP_GUEST_CACHE, else ~/.cache/vmsnap.qemu/guest: outside the clone, so fresh clones reuse the .debs."""
    configured = os.environ.get("VMSNAP_GUEST_CACHE")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vmsnap.qemu" / "guest"


class GuestError(Exception):
    """The tiny guest could not be built, booted or talked to."""


@dataclasses.dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initrd: Path


def _run(argv: t.Sequence[str | os.PathLike[str]], cwd: Path | None = None, input_: bytes | None = None) -> bytes:
    proc = subprocess.run([os.fspath(a) for a in argv], cwd=cwd, input=input_, capture_output=True, check=False)
    if proc.returncode != 0:
        raise GuestError(
            f"{' '.join(os.fspath(a) for a in argv)} failed with {proc.returncode}: "
            f"{proc.stderr.decode(errors='replace').strip()}"
        )
    return proc.stdout


def _kernel_package() -> str:
    try:
        out = _run(["apt-cache", "depends", KERNEL_METAPACKAGE]).decode()
    except GuestError:  # a fresh machine may have no package lists yet
        _run(["apt-get", "update", "-qq"])
        out = _run(["apt-cache", "depends", KERNEL_METAPACKAGE]).decode()
    for line in out.splitlines():
        m = re.match(r"\s*Depends:\s*(linux-image-\S+)", line)
        if m:
            return m.group(1)
    raise GuestError(f"apt-cache depends {KERNEL_METAPACKAGE} names no linux-image package:\n{out}")


def _print_uris(packages: t.Sequence[str]) -> list[tuple[str, str]]:
    """(deb file name, sha256) for each package, from ``apt-get download --print-uris``."""
    out = _run(["apt-get", "download", "--print-uris", *packages]).decode()
    result = []
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[3].startswith("SHA256:"):
            result.append((fields[1], fields[3][len("SHA256:") :]))
    if len(result) != len(packages):
        raise GuestError(f"apt-get --print-uris gave {len(result)} entries for {len(packages)} packages:\n{out}")
    return result


def _resolve_debs(packages: t.Sequence[str]) -> list[tuple[str, str]]:
    try:
        return _print_uris(packages)
    except GuestError:
        _run(["apt-get", "update", "-qq"])
        return _print_uris(packages)


def _download(debs_dir: Path, packages: t.Sequence[str], files: t.Sequence[tuple[str, str]]) -> list[Path]:
    debs_dir.mkdir(parents=True, exist_ok=True)

    def verified(name: str, sha: str) -> bool:
        path = debs_dir / name
        return path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == sha

    missing = [pkg for pkg, (name, sha) in zip(packages, files) if not verified(name, sha)]
    if missing:
        try:
            _run(["apt-get", "download", "-q", *missing], cwd=debs_dir)
        except GuestError:
            _run(["apt-get", "update", "-qq"])
            _run(["apt-get", "download", "-q", *missing], cwd=debs_dir)
    for name, sha in files:
        if not verified(name, sha):
            raise GuestError(f"{debs_dir / name} is missing or has the wrong SHA256 after apt-get download")
    return [debs_dir / name for name, dummy in files]


def _loader_deps(staging: Path, binary: Path) -> list[Path]:
    """Shared libraries of an unpacked binary, resolved by the unpacked loader inside staging only."""
    loader = staging / LIB_DIR / LOADER
    lib_path = ":".join(os.fspath(staging / d) for d in (LIB_DIR, "usr/" + LIB_DIR))
    out = _run([loader, "--library-path", lib_path, "--list", binary]).decode()
    libs = []
    for line in out.splitlines():
        if "not found" in line:
            raise GuestError(f"{binary.name}: unresolved library: {line.strip()}")
        m = re.match(r"\s*\S+\s+=>\s+(\S+)\s+\(0x", line)
        if m:
            path = Path(m.group(1))
            if not path.is_relative_to(staging):
                raise GuestError(f"{binary.name}: {path} resolved outside the unpacked packages")
            libs.append(path)
    return libs


def _copy_file(src: Path, dst: Path, mode: int | None = None) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)  # follows symlinks
    os.chmod(dst, mode if mode is not None else stat.S_IMODE(src.stat().st_mode))


def _make_rootfs(staging: Path, root: Path) -> None:
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "run", "tmp", "mnt/data", "etc", "root"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "var").mkdir()
    os.symlink("/run", root / "var/run")

    busybox = staging / "bin/busybox"
    _copy_file(busybox, root / "bin/busybox", 0o755)
    for applet in _run([busybox, "--list-full"]).decode().split():
        link = root / applet
        if link.exists() or link.is_symlink():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink("/bin/busybox", link)

    qga = staging / "usr/sbin/qemu-ga"
    _copy_file(qga, root / "usr/sbin/qemu-ga", 0o755)
    for lib in _loader_deps(staging, qga):
        _copy_file(lib, root / LIB_DIR / lib.name, 0o755)
    _copy_file(staging / LIB_DIR / LOADER, root / "lib64" / LOADER, 0o755)

    mod_root = next((staging / "lib/modules").iterdir())
    found = {p.name[: -len(".ko")]: p for p in mod_root.rglob("*.ko")}
    for name in MODULES:
        if name not in found:
            raise GuestError(f"kernel module {name}.ko not found under {mod_root}")
        _copy_file(found[name], root / "lib/modules" / f"{name}.ko", 0o644)

    init = (
        INIT_SCRIPT.replace("@MODULES@", " ".join(MODULES))
        .replace("@AGENT_PORT@", AGENT_PORT_NAME)
        .replace("@READY@", READY_MARKER.decode())
    )
    (root / "init").write_text(init)
    os.chmod(root / "init", 0o755)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc/group").write_text("root:x:0:\n")


def _cpio_newc_gz(busybox: Path, root: Path, dest: Path) -> None:
    names = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = os.path.relpath(dirpath, root)
        if rel != ".":
            names.append(rel)
        names.extend(os.path.normpath(os.path.join(rel, f)) for f in sorted(filenames))
    archive = _run([busybox, "cpio", "-o", "-H", "newc"], cwd=root, input_="\n".join(names).encode() + b"\n")
    with gzip.GzipFile(dest, "wb", compresslevel=6, mtime=0) as fh:
        fh.write(archive)


def build_tiny_guest(
    cache_dir: Path,
    *,
    extra_packages: t.Sequence[str] = (),
    customize: t.Callable[[Path, Path], None] | None = None,
    variant: str = "",
) -> GuestImage:
    """Build (or reuse from cache_dir) a kernel and initramfs; keyed by the exact .deb SHA256s.

    A variant (python_guest.py) unpacks extra_packages into the same staging folder, then customize(staging, root)
    adds to the finished root file system; variant (its name and format) is part of the cache key.
    """
    cache_dir = Path(cache_dir).resolve()
    cache_dir.mkdir(parents=True, exist_ok=True)
    packages = [_kernel_package(), *USER_PACKAGES, *extra_packages]
    files = _resolve_debs(packages)
    head = BUILD_FORMAT + (f"\nvariant {variant}" if variant else "")
    key_src = head + "\n" + "\n".join(f"{n} {s}" for n, s in files)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    out_dir = cache_dir / "images" / key
    image = GuestImage(kernel=out_dir / "vmlinuz", initrd=out_dir / "initrd.img")
    if image.kernel.is_file() and image.initrd.is_file():
        return image

    debs = _download(cache_dir / "debs", packages, files)
    work = cache_dir / f"work-{key}-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    try:
        staging = work / "staging"
        staging.mkdir(parents=True)
        for deb in debs:
            _run(["dpkg-deb", "-x", deb, staging])
        root = work / "root"
        _make_rootfs(staging, root)
        if customize is not None:
            customize(staging, root)
        result = work / "result"
        result.mkdir()
        kernels = sorted((staging / "boot").glob("vmlinuz-*"))
        if len(kernels) != 1:
            raise GuestError(f"expected one vmlinuz in {packages[0]}, found {kernels}")
        shutil.copyfile(kernels[0], result / "vmlinuz")
        _cpio_newc_gz(staging / "bin/busybox", root, result / "initrd.img")
        (result / "packages.txt").write_text(key_src + "\n")
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(result, out_dir)  # atomic publish
        except OSError:
            if not (image.kernel.is_file() and image.initrd.is_file()):  # lost a race: fine if the winner finished
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return image


def make_ext4_qcow2(path: Path, size_mib: int = 64) -> Path:
    """Create a pre-formatted ext4 qcow2 disk (raw temporary beside it)."""
    raw = path.with_name(path.name + ".raw")
    with open(raw, "wb") as fh:
        fh.truncate(size_mib * 1024 * 1024)
    try:
        _run(["mkfs.ext4", "-q", "-F", raw])
        _run(["qemu-img", "convert", "-O", "qcow2", raw, path])
    finally:
        raw.unlink(missing_ok=True)
    return path


class GuestVM:
    """A running tiny guest.  Use as a context manager; call poweroff() for a clean stop."""

    def __init__(
        self,
        image: GuestImage,
        disks: t.Sequence[Path],
        workdir: Path,
        *,
        qemu: str = "qemu-system-x86_64",
        extra_args: t.Sequence[str] = (),
        memory_mib: int = 128,
    ) -> None:
        self.image = image
        self.disks = [Path(d).resolve() for d in disks]
        self.workdir = Path(workdir).resolve()
        self.qemu = qemu
        self.extra_args = list(extra_args)
        self.memory_mib = memory_mib
        self.qmp_socket = self.workdir / "qmp.sock"
        self.qga_socket = self.workdir / "qga.sock"
        self.ctl_socket = self.workdir / "ctl.sock"
        self.console_log = self.workdir / "console.log"
        for sock in (self.qmp_socket, self.qga_socket, self.ctl_socket):
            if len(os.fsencode(sock)) >= 108:
                raise GuestError(f"socket path too long for AF_UNIX: {sock}")
        self._proc: subprocess.Popen[bytes] | None = None
        self._listener: socket.socket | None = None
        self._ctl: socket.socket | None = None
        self._ctl_buf = b""
        self._qga: socket.socket | None = None
        self._qga_buf = b""
        self._seq = 0

    # -- life cycle ---------------------------------------------------------

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise GuestError("guest not started")
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        """QEMU's exit status, or None while it runs."""
        if self._proc is None:
            raise GuestError("guest not started")
        return self._proc.poll()

    def argv(self, serial_shell: bool = True) -> list[str]:
        """QEMU's command line. serial_shell=False: no shell on the second serial port (nobody listens for it)."""
        second_serial = (
            ["-chardev", f"socket,id=ctl,path={self.ctl_socket}", "-serial", "chardev:ctl"]
            if serial_shell
            else ["-serial", "null"]
        )
        argv = [
            self.qemu, "-accel", "tcg", "-cpu", "max", "-M", "q35", "-smp", "1", "-m", str(self.memory_mib),
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-kernel", os.fspath(self.image.kernel), "-initrd", os.fspath(self.image.initrd),
            "-append", "console=ttyS0 panic=-1 quiet",
            "-serial", f"file:{self.console_log}", *second_serial,
            "-qmp", f"unix:{self.qmp_socket},server=on,wait=off",
        ]  # fmt: skip
        for i, disk in enumerate(self.disks):
            argv += [
                "-blockdev", f"driver=file,filename={disk},node-name=file{i}",
                "-blockdev", f"driver=qcow2,file=file{i},node-name=disk{i}",
                "-device", f"virtio-blk-pci,drive=disk{i}",
            ]  # fmt: skip
        argv += [
            "-device", "virtio-serial-pci,id=vs0",
            "-chardev", f"socket,id=qga0,path={self.qga_socket},server=on,wait=off",
            "-device", f"virtserialport,bus=vs0.0,chardev=qga0,name={AGENT_PORT_NAME}",
        ]  # fmt: skip
        return argv + self.extra_args

    def start(self) -> GuestVM:
        if self._proc is not None:
            raise GuestError("guest already started")
        self.workdir.mkdir(parents=True, exist_ok=True)
        for sock in (self.qmp_socket, self.qga_socket, self.ctl_socket):
            sock.unlink(missing_ok=True)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(os.fspath(self.ctl_socket))
        self._listener.listen(1)  # QEMU connects as a client: listen first, no race
        stderr_log = open(self.workdir / "qemu.stderr", "wb")  # noqa: SIM115 - closed right after Popen
        try:
            self._proc = subprocess.Popen(
                self.argv(), stdin=subprocess.DEVNULL, stdout=stderr_log, stderr=subprocess.STDOUT
            )
        finally:
            stderr_log.close()
        return self

    def __enter__(self) -> GuestVM:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Kill QEMU by its PID if it still runs, and close every socket."""
        for s in (self._qga, self._ctl, self._listener):
            if s is not None:
                with contextlib.suppress(OSError):
                    s.close()
        self._qga = self._ctl = self._listener = None
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._proc.pid, 9)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=10)

    def _diagnostics(self) -> str:
        parts = []
        for f in (self.workdir / "qemu.stderr", self.console_log):
            with contextlib.suppress(OSError):
                parts.append(f"--- {f.name} (tail) ---\n{f.read_text(errors='replace')[-2000:]}")
        return "\n".join(parts)

    def _check_alive(self) -> None:
        if self._proc is None:
            raise GuestError("guest not started")
        if self._proc.poll() is not None:
            raise GuestError(f"QEMU exited with {self._proc.returncode}\n{self._diagnostics()}")

    # -- serial shell -------------------------------------------------------

    def _read_until(self, pattern: re.Pattern[bytes], deadline: float) -> re.Match[bytes]:
        assert self._ctl is not None
        while True:
            m = pattern.search(self._ctl_buf)
            if m:
                return m
            self._check_alive()
            left = deadline - time.monotonic()
            if left <= 0:
                raise GuestError(
                    f"timed out waiting for {pattern.pattern!r}; got {self._ctl_buf[-500:]!r}\n{self._diagnostics()}"
                )
            self._ctl.settimeout(min(left, 0.5))
            try:
                data = self._ctl.recv(65536)
            except socket.timeout:
                continue
            if not data:
                self._check_alive()
                raise GuestError("serial control socket closed")
            self._ctl_buf += data

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait for the serial shell, then swallow its banner with one flushing command."""
        deadline = time.monotonic() + timeout
        self._accept_serial(deadline)
        m = self._read_until(re.compile(re.escape(READY_MARKER)), deadline)
        self._ctl_buf = self._ctl_buf[m.end() :]
        self.run("true", timeout=max(1.0, deadline - time.monotonic()))

    def _accept_serial(self, deadline: float) -> None:
        """QEMU connects to the serial shell's socket as a client: accept it once."""
        assert self._listener is not None
        while self._ctl is None:
            self._check_alive()
            if time.monotonic() > deadline:
                raise GuestError(f"QEMU never connected to {self.ctl_socket}\n{self._diagnostics()}")
            self._listener.settimeout(0.5)
            try:
                self._ctl, dummy = self._listener.accept()
            except socket.timeout:
                continue

    def attach_restored(self, timeout: float = 30.0) -> None:
        """Take the serial shell of a guest whose RAM was restored into this QEMU: it is already running, so no
        banner comes; one command proves that it answers."""
        deadline = time.monotonic() + timeout
        self._accept_serial(deadline)
        self.run("true", timeout=max(1.0, deadline - time.monotonic()))

    def run(self, cmd: str, timeout: float = 30.0) -> tuple[int, str]:
        """Run cmd in the guest shell; return (exit status, combined stdout+stderr)."""
        if self._ctl is None:
            raise GuestError("call wait_ready() first")
        self._seq += 1
        tag = f"__RC{self._seq}__"
        self._ctl.sendall(f"( {cmd}\n) 2>&1; echo {tag}$?{tag}\n".encode())
        marker = re.compile(re.escape(tag.encode()) + rb"(\d+)" + re.escape(tag.encode()) + rb"\r?\n")
        m = self._read_until(marker, time.monotonic() + timeout)
        out = self._ctl_buf[: m.start()]
        self._ctl_buf = self._ctl_buf[m.end() :]  # the marker's own newline is part of the match
        return int(m.group(1)), out.decode(errors="replace")

    def poweroff(self, timeout: float = 30.0) -> int:
        """sync; umount /mnt/data; poweroff -f; wait for QEMU to exit and return its exit status."""
        rc, out = self.run("sync; if grep -q ' /mnt/data ' /proc/mounts; then umount /mnt/data; fi; sync", timeout)
        if rc != 0:
            raise GuestError(f"umount /mnt/data failed ({rc}): {out}")
        assert self._ctl is not None and self._proc is not None
        self._ctl.sendall(b"poweroff -f\n")
        try:
            return self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise GuestError(f"guest did not power off within {timeout}s\n{self._diagnostics()}") from None

    # -- guest agent ----------------------------------------------------------

    def _qga_fill(self, deadline: float) -> None:
        assert self._qga is not None
        while True:
            self._check_alive()
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout("guest agent did not answer")
            self._qga.settimeout(min(left, 0.5))
            try:
                data = self._qga.recv(65536)
            except socket.timeout:
                continue
            if not data:
                raise GuestError("guest agent socket closed")
            self._qga_buf += data
            return

    def _qga_recv_line(self, deadline: float) -> bytes:
        while b"\n" not in self._qga_buf:
            self._qga_fill(deadline)
        line, dummy, self._qga_buf = self._qga_buf.partition(b"\n")
        return line

    def _qga_sync(self, timeout: float) -> None:
        """guest-sync-delimited: drop everything up to the 0xFF the agent sends, then expect our id."""
        deadline = time.monotonic() + timeout
        if self._qga is None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(os.fspath(self.qga_socket))
            self._qga, self._qga_buf = s, b""
        while True:
            sync_id = random.randint(1, 2**31 - 1)
            request = {"execute": "guest-sync-delimited", "arguments": {"id": sync_id}}
            # a leading 0xFF resets the agent's JSON parser after any half-sent garbage
            self._qga.sendall(b"\xff" + json.dumps(request).encode() + b"\n")
            attempt_deadline = min(deadline, time.monotonic() + 3)
            try:
                while True:
                    while b"\xff" not in self._qga_buf:
                        self._qga_buf = b""
                        self._qga_fill(attempt_deadline)
                    self._qga_buf = self._qga_buf[self._qga_buf.rindex(b"\xff") + 1 :]
                    with contextlib.suppress(ValueError):
                        if json.loads(self._qga_recv_line(attempt_deadline)).get("return") == sync_id:
                            return
            except socket.timeout:
                if time.monotonic() >= deadline:
                    raise GuestError(f"guest agent did not sync within {timeout}s\n{self._diagnostics()}") from None

    def agent(self, command: str, arguments: dict[str, t.Any] | None = None, timeout: float = 30.0) -> dict[str, t.Any]:
        """Send one guest-agent command; return the whole reply (``{"return": ...}``), raise on ``error``."""
        if self._qga is None:
            self._qga_sync(timeout)
        assert self._qga is not None
        msg: dict[str, t.Any] = {"execute": command}
        if arguments is not None:
            msg["arguments"] = arguments
        self._qga.sendall(json.dumps(msg).encode() + b"\n")
        try:
            reply = json.loads(self._qga_recv_line(time.monotonic() + timeout))
        except socket.timeout:
            raise GuestError(f"guest agent did not answer {command} within {timeout}s") from None
        if "error" in reply:
            raise GuestError(f"guest agent {command} failed: {reply['error']}")
        return t.cast("dict[str, t.Any]", reply)

    def agent_disconnect(self) -> None:
        """Close this side's guest-agent connection: QEMU serves one client at a time on that socket."""
        if self._qga is not None:
            with contextlib.suppress(OSError):
                self._qga.close()
        self._qga, self._qga_buf = None, b""


def run_in_guest(
    qga_socket: str | os.PathLike[str], command: str, connect_timeout: float = 5.0, timeout: float = 60.0
) -> tuple[int, str]:
    """Run command with /bin/sh in a guest through its agent socket (guest-exec): (exit status, stdout + stderr).

    Uses the collection's own agent client, so the caller must have put the folder holding ansible_collections on
    sys.path (the demos, the examples' runner and the vm tests do). Raises RuntimeError after timeout seconds.
    """
    import base64

    from ansible_collections.vmsnap.qemu.plugins.module_utils._guest_agent import GuestAgentClient

    with GuestAgentClient(os.fspath(qga_socket), connect_timeout=connect_timeout, command_timeout=30) as agent:
        pid = agent.execute("guest-exec", {"path": "/bin/sh", "arg": ["-c", command], "capture-output": True})["pid"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = agent.execute("guest-exec-status", {"pid": pid})
            if status.get("exited"):
                output = base64.b64decode(status.get("out-data", "")) + base64.b64decode(status.get("err-data", ""))
                return int(status.get("exitcode", -1)), output.decode(errors="replace")
            time.sleep(0.1)
    raise RuntimeError(f"{command!r} did not finish in the guest within {timeout:g} s")
