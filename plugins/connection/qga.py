# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
name: qga
short_description: Run tasks inside a QEMU guest through qemu-guest-agent, without SSH or a network
version_added: 0.2.0
description:
  - Runs commands in a guest and copies files into and out of it through the guest agent's virtio-serial channel,
    by talking to the host side of that channel, a Unix socket, directly. The guest needs no network, no SSH and
    no Python for M(ansible.builtin.raw), M(ansible.builtin.script) and file transfers; other modules need Python
    in the guest, as with any connection.
  - The VM must have the agent's channel on a socket, for example
    C(-chardev socket,id=qga0,path=/run/vms/web01.qga,server=on,wait=off -device virtio-serial-pci
    -device virtserialport,chardev=qga0,name=org.qemu.guest_agent.0), and C(qemu-guest-agent) must run in the guest.
  - The socket is opened on the machine that runs Ansible (the controller), so the controller runs on the hypervisor,
    or the socket is made reachable there. This is not a remote connection to the hypervisor.
  - Commands run as C(/bin/sh -c COMMAND) through C(guest-exec), as the user the agent runs as (normally root), in
    the agent's environment and working directory. Their standard output and error come back byte for byte; a command
    killed by signal N returns 128+N, as shells report it.
  - Files are copied with C(guest-file-open), C(guest-file-write)/C(guest-file-read) and C(guest-file-close) in
    chunks; every chunk's byte count, the end of file, the flush and the close are checked, and so is the size of an
    uploaded file before it is closed. A download is written beside its destination and renamed into place when it is
    complete.
  - QEMU serves one client at a time on the agent's socket. The plugin connects when a task starts and disconnects when
    it ends; another client holding the socket (C(virsh qemu-agent-command), a second play) makes the host unreachable
    after O(connect_timeout).
author:
  - vmsnap.qemu contributors (@vmsnap)
extends_documentation_fragment:
  - connection_pipelining
options:
  socket:
    description:
      - Path of the host side of the guest agent's channel (the C(path) of the C(-chardev socket) behind the
        C(virtserialport) named C(org.qemu.guest_agent.0)), on the controller.
      - Usually set once for a group, for example V(/run/vms/{{ inventory_hostname }}.qga).
    type: path
    required: true
    vars:
      - name: vmsnap_qga_socket
  connect_timeout:
    description:
      - Seconds to wait for the agent to answer C(guest-sync-delimited) when a task connects.
      - An agent that does not answer in that time (not installed, not running, socket held by another client) makes
        the host unreachable, like an SSH host that does not answer.
    type: float
    default: 10
    vars:
      - name: vmsnap_qga_connect_timeout
    env:
      - name: VMSNAP_QGA_CONNECT_TIMEOUT
    ini:
      - section: vmsnap_qga_connection
        key: connect_timeout
  command_timeout:
    description:
      - Seconds a command may run in the guest. A command still running after that fails the task with a message
        that says it timed out, and gives its process id in the guest, where it may still be running; it is not killed.
      - This bounds every command of a task separately, including the run of a module. Raise it for long tasks, for
        example with C(vars) on the task. The default allows package upgrades; lower it to find hung commands sooner.
      - Each single request to the agent (one status poll, one file chunk) waits at most this long, and at least 30
        seconds; an agent that stops answering a request makes the host unreachable.
    type: float
    default: 600
    vars:
      - name: vmsnap_qga_timeout
    env:
      - name: VMSNAP_QGA_TIMEOUT
    ini:
      - section: vmsnap_qga_connection
        key: command_timeout
notes:
  - Privilege escalation (C(become)) is not supported; commands already run as the agent's user. A task whose command
    Ansible wraps in a become method fails and says so.
  - M(ansible.builtin.raw), M(ansible.builtin.script) and file transfers work on a guest with a POSIX C(/bin/sh) only
    (busybox is enough). Modules need Python in the guest; set C(ansible_python_interpreter) to skip discovery.
  - The agent caps the output it keeps of a command at 16 MiB per stream; a command whose output was cut fails the task
    instead of returning part of it. Such an output also needs several times that much free RAM in the guest's agent.
  - Commands inherit the agent's environment. When it has no C(HOME) (a systemd service without C(User=) gets none),
    C(dash) (Debian's C(/bin/sh)) leaves C(~) unexpanded; set C(ansible_remote_tmp) to an absolute path (for example
    V(/var/tmp/.ansible-tmp)) for such guests. C(ansible_user) is not used to log in; leave it unset, because Ansible
    expands its remote temporary folder from that user's home.
  - Files the plugin creates in the guest get the mode the agent gives new files (V(0666) with qemu-guest-agent 7.2,
    whatever the umask). Ansible puts files only into its own temporary folder, which it makes with mode V(0700), and
    M(ansible.builtin.copy) and M(ansible.builtin.template) set the final file's mode.
  - With pipelining (O(pipelining)), a module's code goes to the command's standard input (C(input-data)) instead of a
    file, which saves several requests per task.
  - The agent may refuse commands (C(--allow-rpcs)/C(--block-rpcs) in the guest); the plugin needs C(guest-exec) and
    C(guest-exec-status) for commands, and C(guest-file-open), C(guest-file-read), C(guest-file-write),
    C(guest-file-seek), C(guest-file-flush) and C(guest-file-close) for transfers, and names the refused ones.
seealso:
  - name: QEMU Guest Agent Protocol Reference
    description: The commands this plugin uses.
    link: https://www.qemu.org/docs/master/interop/qemu-ga-ref.html
"""

EXAMPLES = r"""
---
# inventory.yml - guests reached through their agent sockets on the hypervisor that runs ansible-playbook
all:
  children:
    vms:
      hosts:
        web01:
        db01:
          vmsnap_qga_timeout: 600            # long-running maintenance commands
      vars:
        ansible_connection: vmsnap.qemu.qga
        vmsnap_qga_socket: "/run/vms/{{ inventory_hostname }}.qga"
        ansible_python_interpreter: /usr/bin/python3

# playbook.yml
# - name: Work inside guests that have no network
#   hosts: vms
#   gather_facts: false
#   tasks:
#     - name: Works on any guest with a shell
#       ansible.builtin.raw: uname -r
#     - name: Needs Python in the guest
#       ansible.builtin.command: systemctl is-active myapp
"""

import base64
import binascii
import contextlib
import os
import tempfile
import time
import typing as t

from ansible.errors import AnsibleConnectionFailure, AnsibleError, AnsibleFileNotFound
from ansible.module_utils.common.text.converters import to_bytes
from ansible.plugins.connection import ConnectionBase
from ansible.utils.display import Display

from ansible_collections.vmsnap.qemu.plugins.module_utils._errors import VmsnapError
from ansible_collections.vmsnap.qemu.plugins.module_utils._guest_agent import GuestAgentClient
from ansible_collections.vmsnap.qemu.plugins.module_utils._qmp import QmpError

display = Display()

SHELL = "/bin/sh"
# Raw bytes per guest-file-write/guest-file-read request (base64 makes the JSON a third larger).
CHUNK_SIZE = 1024 * 1024
# A single request to the agent waits at least this long (a finished command's status carries all its output).
MIN_REQUEST_SECONDS = 30.0
# Polling guest-exec-status: quick at first (most commands take milliseconds), then at most every POLL_MAX seconds.
POLL_FIRST = 0.002
POLL_MAX = 0.25
EXEC_COMMANDS = ("guest-exec", "guest-exec-status")
FILE_COMMANDS = (
    "guest-file-open",
    "guest-file-write",
    "guest-file-read",
    "guest-file-seek",
    "guest-file-flush",
    "guest-file-close",
)


class QgaCommandTimeout(AnsibleError):
    """A command outlived the timeout; it may still run in the guest."""


def _shown(value: t.Any) -> str:
    """An odd value from the agent, short enough for a message."""
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "..."


def reply_object(reply: t.Any, command: str, what: str) -> dict[str, t.Any]:
    """The agent's reply when it is the JSON object the command returns; anything else fails the task."""
    if not isinstance(reply, dict):
        raise AnsibleError(f"{what}: qemu-guest-agent answered {command} with {_shown(reply)} instead of an object.")
    return reply


def reply_int(value: t.Any, field: str, command: str, what: str) -> int:
    """An integer field of a reply (JSON true/false are not integers here)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise AnsibleError(
            f"{what}: qemu-guest-agent answered {command} with {field} = {_shown(value)}, not an integer."
        )
    return value


def reply_base64(value: t.Any, field: str, command: str, what: str) -> bytes:
    """A base64 field of a reply, decoded strictly (a missing field is no data)."""
    if value is None:
        return b""
    try:
        if not isinstance(value, str):
            raise ValueError("not a string")
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise AnsibleError(
            f"{what}: qemu-guest-agent answered {command} with {field} = {_shown(value)}, which is not base64."
        ) from None


def exec_arguments(cmd: str, in_data: bytes | None) -> dict[str, t.Any]:
    """guest-exec's arguments: the command through /bin/sh, output captured, in_data (if any) on its stdin."""
    arguments: dict[str, t.Any] = {"path": SHELL, "arg": ["-c", cmd], "capture-output": True}
    if in_data is not None:
        arguments["input-data"] = base64.b64encode(in_data).decode("ascii")
    return arguments


def decode_exec_status(status: dict[str, t.Any], pid: int) -> tuple[int, bytes, bytes]:
    """(rc, stdout, stderr) of a finished guest-exec-status reply; output the agent cut off is an error.

    A process killed by a signal gets 128 + the signal number, as POSIX shells report it.
    """
    what = f"Cannot read the result of guest process {pid}"
    status = reply_object(status, "guest-exec-status", what)
    if status.get("exited") is not True:
        raise AnsibleError(f"Guest process {pid} has not exited yet; its status cannot be decoded.")
    stdout = reply_base64(status.get("out-data"), "out-data", "guest-exec-status", what)
    stderr = reply_base64(status.get("err-data"), "err-data", "guest-exec-status", what)
    cut = [name for name in ("out", "err") if status.get(f"{name}-truncated")]
    if cut:
        streams = " and ".join({"out": "standard output", "err": "standard error"}[name] for name in cut)
        raise AnsibleError(
            f"The command's {streams} {'were' if len(cut) > 1 else 'was'} cut off by qemu-guest-agent, which keeps "
            "at most 16 MiB per stream "
            f"(guest process {pid} exited; got {len(stdout)} bytes of output and {len(stderr)} bytes of errors). "
            "Its output is not returned in part: write it to a file in the guest and fetch that instead.",
        )
    if "exitcode" in status:
        return reply_int(status["exitcode"], "exitcode", "guest-exec-status", what), stdout, stderr
    if "signal" in status:
        return 128 + reply_int(status["signal"], "signal", "guest-exec-status", what), stdout, stderr
    raise AnsibleError(f"qemu-guest-agent reported no exit code and no signal for guest process {pid}: {status!r}")


def next_poll_delay(delay: float) -> float:
    """The wait before the next guest-exec-status: grows by half each time, up to POLL_MAX."""
    return min(delay * 1.5, POLL_MAX)


def missing_commands(info: dict[str, t.Any], wanted: t.Iterable[str]) -> list[str]:
    """The commands of wanted that guest-info does not list as enabled."""
    listed = info.get("supported_commands") if isinstance(info, dict) else None
    entries = listed if isinstance(listed, list) else []
    enabled = {c.get("name") for c in entries if isinstance(c, dict) and c.get("enabled", True) is not False}
    return [name for name in wanted if name not in enabled]


class Connection(ConnectionBase):
    """Commands and files through qemu-guest-agent's Unix socket on the controller."""

    transport = "vmsnap.qemu.qga"
    has_pipelining = True
    has_tty = False
    _shell_type = "sh"

    def __init__(self, *args: t.Any, **kwargs: t.Any) -> None:
        super().__init__(*args, **kwargs)
        self._agent: GuestAgentClient | None = None
        self._guest_info: dict[str, t.Any] = {}

    # -- connection ---------------------------------------------------------------------------------------------

    @property
    def _host(self) -> str:
        return str(self._play_context.remote_addr or "")

    def _request_timeout(self) -> float:
        return max(float(self.get_option("command_timeout")), MIN_REQUEST_SECONDS)

    def _connect(self) -> Connection:
        if self._connected and self._agent is not None:
            return self
        path = str(self.get_option("socket"))
        connect_timeout = float(self.get_option("connect_timeout"))
        display.vvv(f"ESTABLISH QGA CONNECTION TO {path}", host=self._host)
        agent = GuestAgentClient(path, connect_timeout=connect_timeout, command_timeout=self._request_timeout())
        try:
            agent.connect()
            info = agent.execute("guest-info", timeout=connect_timeout)
        except VmsnapError as exc:
            agent.close()
            raise AnsibleConnectionFailure(f"Cannot reach the guest agent of {self._host}: {exc.msg}") from None
        if not isinstance(info, dict):
            agent.close()
            raise AnsibleConnectionFailure(
                f"Cannot use the guest agent of {self._host}: it answered guest-info with {_shown(info)} instead "
                "of an object."
            )
        self._guest_info = info
        self._agent = agent
        self._connected = True
        version = self._guest_info.get("version", "unknown")
        display.vvv(f"QGA CONNECTED: qemu-guest-agent {version} on {path}", host=self._host)
        return self

    def close(self) -> None:
        if self._agent is not None:
            self._agent.close()
            self._agent = None
        self._connected = False

    def reset(self) -> None:
        self.close()
        self._connect()

    def _request(self, command: str, arguments: dict[str, t.Any], what: str) -> t.Any:
        """One agent command. The agent refusing it is a task failure; losing the agent makes the host unreachable."""
        if self._agent is None:
            self._connect()
        agent = self._agent
        if agent is None:  # _connect() raises when it cannot connect
            raise AnsibleConnectionFailure(f"{what}: not connected to the guest agent of {self._host}.")
        try:
            return agent.execute(command, arguments)
        except QmpError as exc:
            raise AnsibleError(f"{what}: qemu-guest-agent refused {command}: {exc.desc}") from None
        except VmsnapError as exc:
            self.close()  # the stream may hold a late reply: never reuse it
            raise AnsibleConnectionFailure(f"{what}: lost the guest agent of {self._host}: {exc.msg}") from None

    def _require(self, commands: t.Sequence[str], what: str) -> None:
        missing = missing_commands(self._guest_info, commands)
        if missing:
            raise AnsibleError(
                f"{what}: the guest agent of {self._host} does not allow {', '.join(missing)} "
                "(see qemu-ga's --allow-rpcs/--block-rpcs in the guest)."
            )

    # -- commands -----------------------------------------------------------------------------------------------

    def exec_command(self, cmd: str, in_data: bytes | None = None, sudoable: bool = True) -> tuple[int, bytes, bytes]:
        super().exec_command(cmd, in_data=in_data, sudoable=sudoable)
        become = self.become
        if sudoable and become is not None and become.success and become.success in cmd:
            raise AnsibleError(
                "The vmsnap.qemu.qga connection does not support become: commands already run as the user "
                f"qemu-guest-agent runs as in the guest (normally root). Set become: false for {self._host}."
            )
        self._require(EXEC_COMMANDS, "Cannot run a command")
        display.vvv(f"EXEC {cmd}", host=self._host)
        timeout = float(self.get_option("command_timeout"))
        started = time.monotonic()
        what = "Cannot start the command"
        started_reply = reply_object(
            self._request("guest-exec", exec_arguments(cmd, in_data), what), "guest-exec", what
        )
        pid = reply_int(started_reply.get("pid"), "pid", "guest-exec", what)
        delay = POLL_FIRST
        while True:
            what = f"Cannot follow guest process {pid}"
            status = reply_object(self._request("guest-exec-status", {"pid": pid}, what), "guest-exec-status", what)
            if status.get("exited"):
                break
            elapsed = time.monotonic() - started
            if elapsed >= timeout:
                raise QgaCommandTimeout(
                    f"The command timed out: it was still running after {timeout:g} s (vmsnap_qga_timeout), as "
                    f"process {pid} in the guest, where it may still be running (it was not killed). "
                    f"Raise vmsnap_qga_timeout for long commands. Command: {cmd}"
                )
            time.sleep(min(delay, timeout - elapsed))
            delay = next_poll_delay(delay)
        rc, stdout, stderr = decode_exec_status(status, pid)
        display.vvvvv(f"QGA pid {pid}: rc {rc}, {len(stdout)} bytes out, {len(stderr)} bytes err", host=self._host)
        return rc, stdout, stderr

    # -- files --------------------------------------------------------------------------------------------------

    def put_file(self, in_path: str, out_path: str) -> None:
        super().put_file(in_path, out_path)
        display.vvv(f"PUT {in_path} TO {out_path}", host=self._host)
        b_in_path = to_bytes(in_path, errors="surrogate_or_strict")
        if not os.path.isfile(b_in_path):
            raise AnsibleFileNotFound(f"file or module does not exist: {in_path}")
        self._require(FILE_COMMANDS, f"Cannot copy {in_path} to {out_path}")
        what = f"Cannot write {out_path} in the guest"
        handle = reply_int(
            self._request("guest-file-open", {"path": out_path, "mode": "wb"}, what), "handle", "guest-file-open", what
        )
        written = 0
        try:
            with open(b_in_path, "rb") as source:
                for chunk in iter(lambda: source.read(CHUNK_SIZE), b""):
                    arguments = {"handle": handle, "buf-b64": base64.b64encode(chunk).decode("ascii")}
                    wrote = reply_object(self._request("guest-file-write", arguments, what), "guest-file-write", what)
                    count = reply_int(wrote.get("count"), "count", "guest-file-write", what)
                    if count != len(chunk):
                        raise AnsibleError(f"{what}: the agent wrote {count} of {len(chunk)} bytes at {written}.")
                    written += count
            self._request("guest-file-flush", {"handle": handle}, what)
            end = self._request("guest-file-seek", {"handle": handle, "offset": 0, "whence": "end"}, what)
            size = reply_int(
                reply_object(end, "guest-file-seek", what).get("position"), "position", "guest-file-seek", what
            )
        except BaseException:
            self._close_quietly(handle)
            raise
        self._request("guest-file-close", {"handle": handle}, what)
        local_size = os.path.getsize(b_in_path)
        if size != written or written != local_size:
            raise AnsibleError(
                f"{what}: it has {size} bytes after the copy; {written} were written and {in_path} has {local_size}."
            )

    def fetch_file(self, in_path: str, out_path: str) -> None:
        super().fetch_file(in_path, out_path)
        display.vvv(f"FETCH {in_path} TO {out_path}", host=self._host)
        self._require(FILE_COMMANDS, f"Cannot fetch {in_path}")
        what = f"Cannot read {in_path} from the guest"
        b_out_path = to_bytes(out_path, errors="surrogate_or_strict")
        folder = os.path.dirname(b_out_path) or b"."
        fd, b_part = tempfile.mkstemp(dir=folder, prefix=b"." + os.path.basename(b_out_path) + b".", suffix=b".part")
        handle = None
        try:
            opened = self._request("guest-file-open", {"path": in_path, "mode": "rb"}, what)
            handle = reply_int(opened, "handle", "guest-file-open", what)
            umask = os.umask(0o022)
            os.umask(umask)
            os.fchmod(fd, 0o666 & ~umask)  # the mode any other connection's download gets, not mkstemp's 0600
            with os.fdopen(fd, "wb") as target:
                received = 0
                while True:
                    read = self._request("guest-file-read", {"handle": handle, "count": CHUNK_SIZE}, what)
                    reply = reply_object(read, "guest-file-read", what)
                    data = reply_base64(reply.get("buf-b64"), "buf-b64", "guest-file-read", what)
                    count = reply_int(reply.get("count"), "count", "guest-file-read", what)
                    if len(data) != count:
                        raise AnsibleError(f"{what}: the agent said {count} bytes but sent {len(data)}.")
                    eof = reply.get("eof")
                    if not isinstance(eof, bool):
                        raise AnsibleError(
                            f"{what}: qemu-guest-agent answered guest-file-read with eof = {_shown(eof)}, not true or "
                            "false."
                        )
                    target.write(data)
                    received += len(data)
                    if eof:
                        break
                    if not data:
                        raise AnsibleError(f"{what}: the agent returned no data and no end of file at {received}.")
                target.flush()
                os.fsync(target.fileno())
            self._request("guest-file-close", {"handle": handle}, what)
            handle = None
            os.replace(b_part, b_out_path)
        except BaseException:
            if handle is not None:
                self._close_quietly(handle)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(b_part)
            raise
        display.vvvvv(f"QGA fetched {received} bytes from {in_path}", host=self._host)

    def _close_quietly(self, handle: int) -> None:
        """Release a guest file handle after a failure (the agent keeps open handles until it restarts)."""
        if self._agent is None:
            return
        with contextlib.suppress(VmsnapError):
            self._agent.execute("guest-file-close", {"handle": handle})
