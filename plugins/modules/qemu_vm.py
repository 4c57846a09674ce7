#!/usr/bin/python
# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: qemu_vm
short_description: Start and stop a VM's QEMU, or start it waiting for an incoming RAM state
version_added: 0.2.0
description:
  - Brings the QEMU process of one VM, known by its QMP socket, to O(state). The VM counts as running when its QMP
    socket answers, whatever QEMU's run status (running, paused, inmigrate, ...). A missing socket file, or one that
    refuses connections (a QEMU killed with SIGKILL leaves its socket file behind), counts as not running.
  - V(stopped) ends QEMU, with C(systemctl stop) when O(start_unit) is given and with the QMP command C(quit)
    otherwise, and waits until the process is gone.
  - V(started) starts QEMU the way the VM is normally started, with O(start_unit) or O(start_argv), plus
    O(extra_args) for this start only (for example V(["-loadvm", "pre-upgrade"]) to boot into an internal snapshot
    with RAM), and waits until its QMP socket answers.
  - V(incoming) starts QEMU the same way with C(-incoming defer) added, so that it waits for a RAM state file to be
    loaded with M(vmsnap.qemu.qmp_vm_state) (O(vmsnap.qemu.qmp_vm_state#module:state=restored)).
  - No shell is used. O(start_argv) runs directly, detached in a session of its own; a unit is started with
    C(systemctl), which the module finds on the PATH.
author:
  - vmsnap.qemu contributors (@vmsnap)
extends_documentation_fragment:
  - vmsnap.qemu._attributes
  - vmsnap.qemu._attributes.ACTIONGROUP_QMP
attributes:
  check_mode:
    support: full
    details:
      - Check mode asks the QMP socket whether QEMU runs and reports what a real run would do, including the argv it
        would run (RV(started_with)); it starts, stops and writes nothing.
  diff_mode:
    support: full
    details:
      - The diff shows the VM's status before and after (V(stopped) when QEMU does not run).
  idempotent:
    support: full
    details:
      - V(started) leaves a QEMU that answers alone, whatever its status; V(incoming) leaves one that waits for an
        incoming state alone; V(stopped) leaves a VM alone whose QEMU does not answer.
  platform:
    description: Target OS/families that can be operated against.
    support: N/A
    platforms: posix
options:
  socket:
    description:
      - Absolute path of the VM's QMP socket (C(-qmp unix:PATH,server=on,wait=off)), as in the other QMP modules.
        QEMU started by this module must create it there.
    type: path
    required: true
  state:
    description:
      - V(started) - QEMU runs (its QMP socket answers). A QEMU that answers is left alone, whatever its status.
      - V(stopped) - QEMU does not run. A running one is stopped and the task waits up to O(timeout) for its process
        to end.
      - V(incoming) - QEMU runs and waits for an incoming state (status C(inmigrate)). A QEMU that runs with another
        status is refused ("stop it first") and left untouched.
    type: str
    choices: [started, stopped, incoming]
    default: started
  start_unit:
    description:
      - The systemd service that starts this VM's QEMU (a bare name gets C(.service) added). Required, or
        O(start_argv), when QEMU has to be started. Mutually exclusive with O(start_argv).
      - With a unit, O(state=stopped) runs C(systemctl stop) instead of sending QMP C(quit).
      - The unit must expand C($VMSNAP_QEMU_ARGS) in its C(ExecStart=) and load an environment file, see the notes.
        Before each start the module writes the arguments of this start (C(-incoming defer), O(extra_args)) into
        C(<unit_env_dir>/<unit>.env), and empties it again once QEMU answers or the start failed.
    type: str
  start_argv:
    description:
      - The command that starts this VM's QEMU, as a list of arguments (no shell). Its first element is looked up on
        the PATH unless it is absolute. Mutually exclusive with O(start_unit).
      - It may daemonize (QEMU's C(-daemonize)) and exit with V(0), or stay in the foreground, where it keeps running
        detached in its own session after the task ended (its output is then discarded). The task fails with the
        exit code and the end of its output when it exits with another code before QMP answers.
    type: list
    elements: str
  extra_args:
    description:
      - Arguments added at the end of the command line for this start only, for example V(["-loadvm", "pre-upgrade"]).
        They come after C(-incoming defer) for O(state=incoming). Ignored when nothing is started.
    type: list
    elements: str
    default: []
  unit_env_dir:
    description:
      - Folder of the environment files for units (C(<unit_env_dir>/<unit>.env), mode C(0600), written atomically).
        It must be the folder that the unit's C(EnvironmentFile=) names.
    type: path
    default: /run/vmsnap
  timeout:
    description:
      - Seconds to wait for QMP to answer after a start, and for the QEMU process to end after a stop.
    type: float
    default: 60
  kill_after_timeout:
    description:
      - For O(state=stopped), a QEMU process that has not ended after O(timeout) gets C(SIGKILL) (the task says so in
        RV(msg), RV(killed) and a warning). With V(false) the task fails and leaves it running.
    type: bool
    default: false
  connect_timeout:
    description:
      - Seconds to wait for the QMP socket to connect and greet, each time it is asked.
    type: float
    default: 5
notes:
  - 'A unit for O(start_unit) needs two things, for example in a drop-in for a template unit
    C(/etc/systemd/system/qemu@.service.d/vmsnap.conf) with the lines C([Service]) and
    C(EnvironmentFile=-/run/vmsnap/%n.env), and C($VMSNAP_QEMU_ARGS) as a word of its own at the end of the
    C(ExecStart=) line (C(ExecStart=/usr/bin/qemu-system-x86_64 ... $VMSNAP_QEMU_ARGS)). An unquoted C($VAR) word
    is split by systemd at whitespace into several arguments, so C(-incoming defer) becomes two; the module quotes
    each argument so that it comes back as one. The C(-) before the file name lets the unit start when no file is
    there yet. After a start the file is rewritten with an empty value, so a later plain restart boots normally.'
  - The module has been tested with a stand-in for C(systemctl) that reads the environment file and splits the
    variable the way systemd does; it has not been tested against a real systemd.
  - QEMU is found by its QMP socket; the process behind it is identified with C(SO_PEERCRED). A process that has
    ended but was not reaped yet (a zombie) counts as ended.
  - A start that times out leaves what it started running (the task names its pid) rather than killing it.
  - QEMU replaces a stale socket file left by a killed QEMU when it starts, so such a file needs no cleanup.
seealso:
  - module: vmsnap.qemu.qmp_vm_state
  - module: vmsnap.qemu.qemu_vm_info
"""

EXAMPLES = r"""
---
- name: Stop the VM's QEMU (QMP quit)
  vmsnap.qemu.qemu_vm:
    socket: /run/vms/web01.qmp
    state: stopped

- name: Start it waiting for a RAM state, through its systemd unit
  vmsnap.qemu.qemu_vm:
    socket: /run/vms/web01.qmp
    state: incoming
    start_unit: qemu@web01.service

- name: Load the saved state into it
  vmsnap.qemu.qmp_vm_state:
    socket: /run/vms/web01.qmp
    path: /var/lib/vms/web01.vmstate
    state: restored

- name: Start a VM whose QEMU crashed, back at its internal snapshot with RAM
  vmsnap.qemu.qemu_vm:
    socket: /run/vms/web02.qmp
    state: started
    start_argv: "{{ vmsnap_vm_start }}"
    extra_args: [-loadvm, pre-upgrade]
  vars:
    vmsnap_vm_start:
      - qemu-system-x86_64
      - -machine
      - q35,accel=kvm
      - -m
      - "2048"
      - -drive
      - file=/var/lib/vms/web02.qcow2,if=virtio,node-name=disk0
      - -qmp
      - unix:/run/vms/web02.qmp,server=on,wait=off
      - -daemonize
"""

RETURN = r"""
status:
  description: QEMU's run status after the task (from C(query-status)), or V(stopped) when QEMU does not run.
  returned: always
  type: str
  sample: inmigrate
previous_status:
  description: QEMU's run status before the task, or V(stopped) when it did not run.
  returned: always
  type: str
  sample: running
pid:
  description:
    - The pid of the QEMU process behind the socket - after the task, or for O(state=stopped) the one that was
      stopped. Null when no QEMU ran (and in check mode before a start).
  returned: always
  type: int
  sample: 41327
started_with:
  description:
    - What was started (in check mode, what would be); null when nothing was. For O(start_argv) the whole argv
      (key C(argv)); for a unit, the unit, the extra arguments and the environment file.
  returned: always
  type: dict
  sample:
    unit: qemu@web01.service
    args: [-incoming, defer]
    env_file: /run/vmsnap/qemu@web01.service.env
killed:
  description: Whether QEMU had to be sent C(SIGKILL) (O(kill_after_timeout)).
  returned: always
  type: bool
  sample: false
msg:
  description: What the task did or would do.
  returned: always
  type: str
  sample: The QEMU of VM at /run/vms/web01.qmp is started to wait for an incoming state.
"""

import os
import typing as t

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.vmsnap.qemu.plugins.module_utils._errors import ValidationError, VmsnapError
from ansible_collections.vmsnap.qemu.plugins.module_utils._validate import validate_image_path
from ansible_collections.vmsnap.qemu.plugins.module_utils._vm_process import (
    STOPPED,
    StartMethod,
    VmState,
    plan,
    probe,
    start,
    stop,
    systemd_word,
    unit_name,
)

ARGUMENT_SPEC: dict[str, t.Any] = dict(
    socket=dict(type="path", required=True),
    state=dict(type="str", default="started", choices=["started", "stopped", "incoming"]),
    start_unit=dict(type="str"),
    start_argv=dict(type="list", elements="str"),
    extra_args=dict(type="list", elements="str", default=[]),
    unit_env_dir=dict(type="path", default="/run/vmsnap"),
    timeout=dict(type="float", default=60.0),
    kill_after_timeout=dict(type="bool", default=False),
    connect_timeout=dict(type="float", default=5.0),
)


def main() -> t.NoReturn:
    module = AnsibleModule(
        argument_spec=ARGUMENT_SPEC,
        supports_check_mode=True,
        mutually_exclusive=[("start_unit", "start_argv")],
    )
    params = module.params
    result: dict[str, t.Any] = dict(
        changed=False, status=None, previous_status=None, pid=None, started_with=None, killed=False
    )
    try:
        _validate(params)
        vm = probe(params["socket"], params["connect_timeout"])
        result.update(status=vm.status, previous_status=vm.status, pid=vm.pid)
        can_start = params["start_unit"] is not None or params["start_argv"] is not None
        todo = plan(params["state"], vm, params["extra_args"], params["socket"], can_start)
        result["msg"] = todo.msg
        if todo.action == "none":
            module.exit_json(**result)
        # A stop needs only a unit (systemctl stop); a start argv is not even looked up then.
        wants_method = todo.action == "start" or params["start_unit"] is not None
        method = _start_method(module) if wants_method else None
        result["changed"] = True
        if module._diff:
            result["diff"] = {"before": {"status": vm.status}, "after": {"status": _status_after(params["state"])}}
        if todo.action == "start":
            result["started_with"] = t.cast(StartMethod, method).describe(todo.args)
        if module.check_mode:
            module.exit_json(**result)
        if todo.action == "start":
            _start(module, t.cast(StartMethod, method), todo.args, result)
        else:
            _stop(module, vm, method, result)
    except VmsnapError as exc:
        result.pop("msg", None)  # the error's message replaces the plan's
        exc.do_fail(module, **result)
    module.exit_json(**result)


def _validate(params: dict[str, t.Any]) -> None:
    validate_image_path(params["socket"], must_exist=False, what="Socket")
    for timeout_name in ("timeout", "connect_timeout"):
        if params[timeout_name] <= 0:
            raise ValidationError(f"{timeout_name} must be a positive number of seconds.")
    argv = params["start_argv"]
    if argv is not None and (not argv or not argv[0]):
        raise ValidationError("start_argv must be a non-empty list whose first element names the program to run.")
    for arg in (argv or []) + params["extra_args"]:
        if "\0" in arg:
            raise ValidationError(f"Argument {arg!r} contains a NUL character.")
    if params["start_unit"] is not None:
        unit_name(params["start_unit"])
        validate_image_path(params["unit_env_dir"], must_exist=False, what="unit_env_dir")
        for arg in params["extra_args"]:
            systemd_word(arg)  # refuses what an environment file cannot carry


def _start_method(module: AnsibleModule) -> StartMethod:
    params = module.params
    if params["start_unit"] is not None:
        unit = unit_name(params["start_unit"])
        systemctl = module.get_bin_path("systemctl")
        if systemctl is None:
            raise ValidationError("start_unit needs systemctl, which was not found on the PATH.")
        return StartMethod(unit=unit, systemctl=systemctl, env_file=os.path.join(params["unit_env_dir"], f"{unit}.env"))
    argv = list(params["start_argv"])
    if not os.path.isabs(argv[0]):
        found = module.get_bin_path(argv[0])
        if found is None:
            raise ValidationError(f"The program of start_argv, {argv[0]}, was not found on the PATH.")
        argv[0] = found
    return StartMethod(argv=argv)


def _start(module: AnsibleModule, method: StartMethod, args: list[str], result: dict[str, t.Any]) -> None:
    params = module.params
    vm = start(
        method,
        args,
        params["socket"],
        params["timeout"],
        params["connect_timeout"],
        incoming=params["state"] == "incoming",
    )
    result.update(status=vm.status, pid=vm.pid)


def _stop(module: AnsibleModule, vm: VmState, method: StartMethod | None, result: dict[str, t.Any]) -> None:
    params = module.params
    killed = stop(
        vm, method, params["socket"], params["timeout"], params["connect_timeout"], params["kill_after_timeout"]
    )
    result.update(status=STOPPED, killed=killed)
    if killed:
        result["msg"] = (
            f"The QEMU of VM at {params['socket']} (pid {vm.pid}) did not end within {params['timeout']:g} s and "
            "was killed with SIGKILL (kill_after_timeout)."
        )
        module.warn(result["msg"])


def _status_after(state: str) -> str:
    return {"started": "running", "incoming": "inmigrate"}.get(state, STOPPED)


if __name__ == "__main__":
    main()
