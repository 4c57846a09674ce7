# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Test helper: send one QMP command (JSON) or one HMP qemu-io command to a VM and print the reply as JSON.

qmp.py SOCKET '{"execute": "block-dirty-bitmap-add", "arguments": {...}}'
qmp.py SOCKET --qemu-io DRIVE 'write -P 0xbb 0 1M'   (exit 1 when qemu-io prints anything: an error)
"""

from __future__ import annotations

import json
import socket
import sys


def _messages(sock: socket.socket):
    buffer = b""
    while True:
        while b"\n" not in buffer:
            chunk = sock.recv(65536)
            if not chunk:
                raise SystemExit("QEMU closed the QMP connection")
            buffer += chunk
        line, buffer = buffer.split(b"\n", 1)
        yield json.loads(line)


def execute(path: str, command: dict) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(60)
        sock.connect(path)
        messages = _messages(sock)
        next(messages)  # greeting
        for request in ({"execute": "qmp_capabilities"}, command):
            sock.sendall(json.dumps(request).encode() + b"\n")
            reply = next(message for message in messages if "event" not in message)
        return reply


def main() -> int:
    path = sys.argv[1]
    if sys.argv[2] == "--qemu-io":
        drive, command = sys.argv[3], sys.argv[4]
        line = f'qemu-io {drive} "{command}"'
        reply = execute(path, {"execute": "human-monitor-command", "arguments": {"command-line": line}})
        print(json.dumps(reply))
        # HMP reports qemu-io errors as text; a successful write prints nothing.
        return 1 if "error" in reply or str(reply.get("return", "")).strip() else 0
    reply = execute(path, json.loads(sys.argv[2]))
    print(json.dumps(reply))
    return 1 if "error" in reply else 0


if __name__ == "__main__":
    sys.exit(main())
