# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Note that this doc fragment is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!

from __future__ import annotations


class ModuleDocFragment:
    DOCUMENTATION = r"""
options:
  lock_timeout:
    description:
      - Seconds to wait for another vmsnap.qemu task that is using the same VM (the same QMP socket) on this host.
      - QEMU serves one QMP client at a time, so tasks on one VM take turns. A task holds a per-VM lock (a C(flock)
        on C(vm-<digest>.lock) in the lock folder, named after the socket's real path) from connecting until it
        is done, in check mode too; a later task waits for it. When the lock stays held for longer than this, the
        task fails, names the holder (its pid, module and start time) and changes nothing.
      - The lock folder is C(/run/lock/vmsnap.qemu) for root; for other users, and on hosts without a writable
        C(/run/lock), it is C(vmsnap.qemu-<uid>) under C(/run/lock) or the temporary folder (C($TMPDIR), else
        C(/tmp)). It must belong to the task's user and is kept at mode 0700; a folder that is a link or belongs
        to someone else is refused. Tasks of different users do not see each other's locks.
      - A client that is not a vmsnap.qemu task (libvirt, C(socat), a human at the monitor) takes no such lock;
        while it holds the socket, QEMU does not greet, and the task fails after O(connect_timeout) saying that
        another client probably holds the socket.
      - V(0) tries once and does not wait.
    type: float
    default: 60
"""
