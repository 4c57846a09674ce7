#!/usr/bin/env python
# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Test helper: wait for a qemu-img process doing VERB on PATH, let it run DELAY seconds, then SIGKILL it.

Prints 'killed' when the kill hit a running qemu-img, 'finished' when it ended first, 'not-seen' when none came.
"""

from __future__ import annotations

import os
import signal
import sys
import time


def find(verb: str, path: str) -> int | None:
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                argv = handle.read().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"qemu-img") and verb.encode() in argv and path.encode() in argv:
            return int(pid)
    return None


def main() -> int:
    verb, path, delay, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
    deadline = time.monotonic() + timeout
    pid = None
    while pid is None and time.monotonic() < deadline:
        pid = find(verb, path)
        time.sleep(0.005)
    if pid is None:
        print("not-seen")
        return 0
    time.sleep(delay)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        print("finished")
        return 0
    print("killed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
