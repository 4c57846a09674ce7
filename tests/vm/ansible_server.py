# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""`ansible` and `ansible-playbook` without paying for ansible's start-up on every run (tests only).

A plain `ansible` or `ansible-playbook` command spends ~1.5 s of CPU importing ansible and reading ansible-core's
metadata before it runs anything; the real-VM tests run a few hundred of them on a 2-core machine. `run_ansible()`
sends the command to a server (this file run as a script) that did that once (`warm_up`) and forks a child per
command. The child is a fresh `ansible` process in all but its start-up: it takes the command's environment, working
folder and argv, writes its stdout and stderr to files, and runs ansible's own entry point for the command
(`AdHocCLI.cli_executor` / `PlaybookCLI.cli_executor`, the code behind the installed scripts). Tasks go through the
action plugins, AnsiballZ and module processes of their own started by the connection, exactly as with the commands,
and nothing is carried from one command to the next.

ansible reads its configuration (ANSIBLE_* variables, the ansible.cfg of the working folder) when it is imported, so
each server is started for one such setting and a command only goes to a server started with the same one.
VMSNAP_ANSIBLE_SERVER=0 runs every command as a process of its own.

Protocol (two pipes, file descriptors given on the server's command line): one JSON line per command,
{"argv": [...], "env": {...}, "cwd": "...", "out": path, "err": path}, answered by {"pid": int} when the child runs
and by {"rc": int} once it has ended. The server ends at end of file on the command pipe.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import typing as t
import warnings
from pathlib import Path

# Read by ansible (or by Python for it) only when it starts: a server serves only commands with the same values.
_STARTUP_VARIABLES = ("PYTHONPATH", "PYTHONHASHSEED", "LANG", "LANGUAGE", "HOME")
_MAX_SERVERS = 4


# ---- server side (runs in the server process) ----------------------------------------------------------------------


def warm_up() -> None:
    """Import both CLIs and read ansible-core's own collection metadata (a 0.6 s YAML parse) once.

    The collection loader is set up here from the same configuration a child would use; the child's own set-up then
    finds it in place (ansible says so with a Python warning, silenced here)."""
    from ansible.cli.adhoc import AdHocCLI  # noqa: F401 - imported once here, inherited by every child
    from ansible.cli.playbook import PlaybookCLI  # noqa: F401
    from ansible.plugins.loader import init_plugin_loader
    from ansible.utils.collection_loader._collection_finder import _get_collection_metadata

    warnings.filterwarnings("ignore", message="AnsibleCollectionFinder has already been configured")
    init_plugin_loader([])
    _get_collection_metadata("ansible.builtin")


def _child(command: dict[str, t.Any], server_fds: tuple[int, ...]) -> t.NoReturn:
    """Become the `ansible`/`ansible-playbook` process of one command; never returns."""
    from ansible.cli.adhoc import AdHocCLI
    from ansible.cli.playbook import PlaybookCLI

    code = 250
    try:
        for fd in server_fds:  # nothing the command starts may hold the server's pipes
            os.close(fd)
        os.setsid()  # a process group of its own, as a command: a timeout kills the group
        os.environ.clear()
        os.environ.update(command["env"])
        os.chdir(command["cwd"])
        for fd, path in ((1, command["out"]), (2, command["err"])):
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(target, fd)
            os.close(target)
        cli = PlaybookCLI if os.path.basename(command["argv"][0]) == "ansible-playbook" else AdHocCLI
        cli.cli_executor(command["argv"])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # none of the server's exit handlers


def serve(commands: t.IO[str], answers: t.IO[str]) -> None:
    warm_up()
    for line in commands:
        command = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(command, (commands.fileno(), answers.fileno()))
        answers.write(json.dumps({"pid": pid}) + "\n")
        answers.flush()
        dummy, status = os.waitpid(pid, 0)
        answers.write(json.dumps({"rc": os.waitstatus_to_exitcode(status)}) + "\n")
        answers.flush()


# ---- client side (runs in pytest) ----------------------------------------------------------------------------------


def _setting(argv: list[str], env: dict[str, str], cwd: str) -> tuple[t.Any, ...]:
    """What ansible reads once at its start: its interpreter, ANSIBLE_* and a few other variables, the ansible.cfg."""
    config = env.get("ANSIBLE_CONFIG") or next(
        (path for path in [os.path.join(cwd, "ansible.cfg")] if os.path.exists(path)), ""
    )
    variables = sorted((k, v) for k, v in env.items() if k.startswith(("ANSIBLE_", "LC_")) or k in _STARTUP_VARIABLES)
    return (os.path.dirname(argv[0]), config, tuple(variables))


class _Server:
    def __init__(self, python: Path, env: dict[str, str], cwd: str) -> None:
        self.work = Path(tempfile.mkdtemp(prefix="vmsnap-ansible-server-"))
        cmd_r, self._cmd_w = os.pipe()
        ans_r, ans_w = os.pipe()
        self.proc = subprocess.Popen(  # noqa: S603 - fixed argv
            [str(python), __file__, str(cmd_r), str(ans_w)],
            pass_fds=(cmd_r, ans_w),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
        )
        os.close(cmd_r)
        os.close(ans_w)
        self._answers = os.fdopen(ans_r, encoding="utf-8")
        self.lock = threading.Lock()  # one command at a time on the pipes

    def _answer(self, timeout: float | None) -> dict[str, t.Any] | None:
        if timeout is not None and not select.select([self._answers], [], [], timeout)[0]:
            return None
        line = self._answers.readline()
        if not line:
            raise AssertionError(f"ansible_server.py ended (rc {self.proc.wait()})")
        return t.cast("dict[str, t.Any]", json.loads(line))

    def run(self, argv: list[str], env: dict[str, str], cwd: str, timeout: float) -> subprocess.CompletedProcess[str]:
        out, err = self.work / "stdout", self.work / "stderr"
        command = {"argv": argv, "env": env, "cwd": cwd, "out": str(out), "err": str(err)}
        with self.lock:
            os.write(self._cmd_w, (json.dumps(command) + "\n").encode())
            pid = t.cast("dict[str, int]", self._answer(120))["pid"]
            done = self._answer(timeout)
            if done is None:
                os.killpg(pid, signal.SIGKILL)  # the command's own process group (setsid in the child)
                self._answer(None)
                raise subprocess.TimeoutExpired(argv, timeout)
            return subprocess.CompletedProcess(argv, done["rc"], out.read_text(), err.read_text())

    def close(self) -> None:
        if self.proc.poll() is None:
            os.close(self._cmd_w)
            self.proc.wait(timeout=60)
        shutil.rmtree(self.work, ignore_errors=True)


_SERVERS: dict[tuple[t.Any, ...], _Server] = {}


@atexit.register
def _close_all() -> None:
    while _SERVERS:
        _SERVERS.popitem()[1].close()


def run_ansible(
    argv: list[str], env: dict[str, str], timeout: float, cwd: str | os.PathLike[str] | None = None
) -> subprocess.CompletedProcess[str]:
    """subprocess.run(argv, env=env, cwd=cwd, timeout=timeout, capture_output=True, text=True) for an `ansible` or
    `ansible-playbook` of a venv, served by a server started for the same configuration (one per configuration,
    started when first needed, ended at exit); any other command runs as a process of its own."""
    cwd = os.fspath(cwd) if cwd is not None else os.getcwd()
    python = Path(argv[0]).with_name("python")
    if (
        os.environ.get("VMSNAP_ANSIBLE_SERVER", "1") == "0"
        or os.path.basename(argv[0]) not in ("ansible", "ansible-playbook")
        or not python.exists()
    ):
        return subprocess.run(argv, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout, check=False)
    key = _setting(argv, env, cwd)
    server = _SERVERS.get(key)
    if server is None or server.proc.poll() is not None:
        if server is not None:
            _SERVERS.pop(key).close()
        if len(_SERVERS) >= _MAX_SERVERS:
            _SERVERS.pop(next(iter(_SERVERS))).close()
        server = _SERVERS[key] = _Server(python, env, cwd)
    return server.run(argv, env, cwd, timeout)


if __name__ == "__main__":
    with open(int(sys.argv[1]), encoding="utf-8") as cmds, open(int(sys.argv[2]), "w", encoding="utf-8") as ans:
        serve(cmds, ans)
