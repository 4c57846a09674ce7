# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Test helpers shared by the QMP tests: a fake QMP server on a real Unix socket, and recorded VMs.

The fixtures that use them (serve, live) are in conftest.py.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import typing as t
from dataclasses import dataclass

Message = t.Dict[str, t.Any]
Handler = t.Callable[[Message, "FakeQmp"], t.Optional[t.List[Message]]]
GREETING = {"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": ""}, "capabilities": []}}


class FakeQmp:
    """Serves one client: greets (unless told not to), then answers each command with handler's messages."""

    def __init__(self, path: str, handler: Handler, greet: bool = True) -> None:
        self.path = path
        self.handler = handler
        self.greet = greet
        self.received: list[Message] = []
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(path)
        self.server.listen(1)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()
        self.conn: socket.socket | None = None

    def _serve(self) -> None:
        conn, dummy = self.server.accept()
        self.conn = conn
        if not self.greet:
            time.sleep(30)
            return
        self.send(GREETING)
        for line in conn.makefile("rb"):
            message = json.loads(line)
            self.received.append(message)
            if message["execute"] == "qmp_capabilities":
                self.send({"return": {}, "id": message.get("id")})
                continue
            replies = self.handler(message, self)
            if replies is None:  # drop the connection
                conn.close()
                return
            for reply_message in replies:
                self.send(reply_message)

    def send(self, message: Message) -> None:
        assert self.conn is not None
        self.conn.sendall(json.dumps(message).encode() + b"\n")

    def commands(self) -> list[str]:
        return [m["execute"] for m in self.received]

    def sent(self, *commands: str) -> list[tuple[str, Message]]:
        """(command, arguments) of what the client sent, only these commands, in order."""
        return [(m["execute"], m.get("arguments", {})) for m in self.received if m["execute"] in commands]

    def close(self) -> None:
        self.server.close()
        if self.conn is not None:
            self.conn.close()


def reply(message: Message, value: t.Any) -> Message:
    return {"return": value, "id": message.get("id")}


def qmp_error(message: Message, desc: str) -> Message:
    return {"error": {"class": "GenericError", "desc": desc}, "id": message.get("id")}


def event(name: str, seconds: int, microseconds: int, **data: t.Any) -> Message:
    return {"event": name, "data": data, "timestamp": {"seconds": seconds, "microseconds": microseconds}}


@dataclass
class Recording:
    """A real VM as recorded from QEMU 7.2 (fixtures/qemu-7.2.22/live-*.json)."""

    vm: t.Dict[str, t.Any]
    nodes: t.List[t.Dict[str, t.Any]]
    version: t.Tuple[int, int, int]
    events: t.List[t.Dict[str, t.Any]]
    load_error: t.Optional[str]

    def disk(self, device: str) -> t.Dict[str, t.Any]:
        """A disk by drive id, or by its active node name for -blockdev disks (which have no drive id)."""
        for disk in self.vm["block_devices"]:
            if device in (disk["device"], disk["node_name"]):
                return disk
        raise KeyError(device)

    def node(self, filename: str, drv: str = "qcow2") -> str:
        """The node name QEMU gave to a file (a format node unless drv says otherwise)."""
        names = [node["node-name"] for node in self.nodes if node["file"] == filename and node["drv"] == drv]
        assert len(names) == 1, names
        return str(names[0])


def reroot(value: t.Any, root: str) -> t.Any:
    """The recordings say /vms for the VM's folder; move every such path to root."""
    if isinstance(value, str):
        return root + value[len("/vms") :] if value.startswith("/vms/") else value
    if isinstance(value, list):
        return [reroot(item, root) for item in value]
    if isinstance(value, dict):
        return {key: reroot(item, root) for key, item in value.items()}
    return value


def load_recording(doc: t.Any, root: t.Any = "/vms") -> Recording:
    doc = reroot(doc, str(root))
    major, minor, micro = doc["qemu_version"]
    return Recording(doc["vm"], doc["nodes"], (major, minor, micro), doc.get("events", []), doc.get("load_error"))
