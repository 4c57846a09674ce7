# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""SIGKILL trials of module processes (tests/vm/test_kill_trials.py): each module runs as its own process, exactly as
ansible runs it on a host (`python <module>.py <args file>`, AnsibleModule reads {"ANSIBLE_MODULE_ARGS": ...}), so
the kill hits the module and nothing else. Children (qemu-img) are left to their own fate and waited for; the
module's process group tells which they are.

Trials are seeded: VMSNAP_KILL_SEED (default 11), VMSNAP_SOAK_TRIALS (trials per group, default per group), and
VMSNAP_KILL_ONLY=group:index replays one trial (its kill moment is a seeded fraction of the measured duration)."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import typing as t
from dataclasses import dataclass, field
from pathlib import Path

from fleet import NoOsVM

REPO = Path(__file__).resolve().parents[2]
SEED = int(os.environ.get("VMSNAP_KILL_SEED", "11"))
REPORT = os.environ.get("VMSNAP_KILL_REPORT")  # a JSON-lines file: one line per trial


def collection_root() -> Path:
    """The collection copy the other vm tests use ($ANSIBLE_COLLECTIONS_PATH, else build/src)."""
    first = os.environ.get("ANSIBLE_COLLECTIONS_PATH", str(REPO / "build" / "src")).split(os.pathsep)[0]
    return Path(first)


def module_file(module: str) -> Path:
    path = collection_root() / "ansible_collections" / "vmsnap" / "qemu" / "plugins" / "modules" / f"{module}.py"
    assert path.is_file(), f"no collection copy at {path} (run the sync/copy first)"
    return path


def trial_count(default: int) -> int:
    soak = os.environ.get("VMSNAP_SOAK_TRIALS")
    return int(soak) if soak else default


def trial_indexes(group: str, default: int) -> list[int]:
    only = os.environ.get("VMSNAP_KILL_ONLY")
    if only:
        name, dummy, index = only.partition(":")
        return [int(index)] if name == group else []
    return list(range(trial_count(default)))


def fraction(group: str, index: int) -> float:
    """The trial's kill moment as a fraction of the task's measured duration: seeded per (seed, group, index)."""
    return random.Random(f"{SEED}:{group}:{index}").random()


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry))
    return members


@dataclass
class ModuleRun:
    rc: int | None
    result: dict[str, t.Any] | None
    killed: bool
    elapsed: float
    orphans: list[str] = field(default_factory=list)  # children that outlived the killed module (their argv[0])
    stderr: str = ""


def start_module(module: str, args: dict[str, t.Any], output: int = subprocess.DEVNULL) -> tuple[subprocess.Popen, str]:
    """The module as ansible runs it on a host, in its own process group: (process, its args file to remove)."""
    env = dict(os.environ, LANG="C", LC_ALL="C", PYTHONPATH=str(collection_root()))
    with tempfile.NamedTemporaryFile("w", prefix="kills-args-", suffix=".json", delete=False) as handle:
        json.dump({"ANSIBLE_MODULE_ARGS": {"_ansible_tmpdir": tempfile.gettempdir(), **args}}, handle)
    proc = subprocess.Popen(  # pylint: disable=consider-using-with
        [sys.executable, str(module_file(module)), handle.name],
        stdout=output,
        stderr=output,
        env=env,
        start_new_session=True,
    )
    return proc, handle.name


def run_module(module: str, args: dict[str, t.Any], kill_after: float | None = None, timeout: float = 120) -> ModuleRun:
    """Run the module as its own process group; SIGKILL the module process only after kill_after seconds.

    After a kill, wait for the children it left (they keep the group id) to end on their own."""
    started = time.monotonic()
    proc, args_file = start_module(module, args, subprocess.PIPE)
    killed = False
    try:
        if kill_after is not None:
            try:
                proc.wait(timeout=kill_after)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                killed = True
        out, err = proc.communicate(timeout=timeout)
    finally:
        os.unlink(args_file)
    elapsed = time.monotonic() - started
    orphans: list[str] = []
    if killed:
        deadline = time.monotonic() + 60
        members = _group_members(proc.pid)
        for pid in members:
            with contextlib.suppress(OSError):
                orphans.append(Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode())
        while members and time.monotonic() < deadline:
            time.sleep(0.02)
            members = _group_members(proc.pid)
        assert not members, f"children of the killed module still running after 60 s: {members}"
    result = None
    if not killed:
        text = out.decode(errors="replace")
        start = text.find("{")
        assert start >= 0, f"{module}: no result (rc {proc.returncode}): {text}\n{err.decode(errors='replace')}"
        result = json.loads(text[start:])
    return ModuleRun(proc.returncode, result, killed, elapsed, orphans, err.decode(errors="replace"))


def ok(module: str, args: dict[str, t.Any]) -> dict[str, t.Any]:
    run = run_module(module, args)
    assert run.result is not None and not run.result.get("failed"), f"{module} {args} failed: {run.result}"
    return run.result


def converge(module: str, args: dict[str, t.Any], repeat_unchanged: bool = True) -> dict[str, t.Any]:
    """The next run after a kill reaches the requested state; a repeat is unchanged (not for state=reverted, which
    reverts again each time by design)."""
    first = ok(module, args)
    if repeat_unchanged:
        again = ok(module, args)
        assert again["changed"] is False, f"{module} {args}: the repeat changed something: {again}"
    return first


def qemu_img_check(path: Path | str, shared: bool = False) -> None:
    argv = ["qemu-img", "check", *(["-U"] if shared else []), str(path)]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"qemu-img check {path}: rc {proc.returncode}\n{proc.stdout}{proc.stderr}"


def qemu_io_reads(path: Path | str, pattern: int, offset: str = "0", length: str = "1M") -> bool:
    proc = subprocess.run(
        ["qemu-io", "-U", "-r", "-c", f"read -P {pattern:#x} {offset} {length}", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    return proc.returncode == 0 and "verification failed" not in proc.stdout.lower()


def qemu_io_write(path: Path | str, pattern: int, offset: str = "0", length: str = "1M") -> None:
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", f"write -P {pattern:#x} {offset} {length}", str(path)],
        check=True,
        stdout=subprocess.DEVNULL,
    )


@dataclass
class Outcome:
    group: str
    index: int
    fraction: float
    delay: float
    killed: bool
    after_kill: str  # before any change | done | mid-way
    next_run: str  # changed | unchanged
    orphans: list[str]
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (
            f"kill-trial {self.group}:{self.index} seed={SEED} fraction={self.fraction:.4f} delay={self.delay:.3f}s "
            f"killed={self.killed} after_kill={self.after_kill!r} next_run={self.next_run} "
            f"orphans={self.orphans} {' '.join(self.notes)}"
        )


def record(outcome: Outcome) -> None:
    print(outcome.line(), flush=True)
    if REPORT:
        with open(REPORT, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(outcome.__dict__ | {"seed": SEED}) + "\n")


def classify(before: t.Any, after: t.Any, target: t.Any) -> str:
    if after == before:
        return "before any change"
    if after == target:
        return "done"
    return "mid-way"


def qmp(sock_path: Path | str, command: str, arguments: dict[str, t.Any] | None = None) -> t.Any:
    """One QMP command with an id; replies with another id are skipped. Right after a kill, a query-status without
    ids (fleet.qmp_execute) once read a reply without a status: a reply that was not its own. With ids, a trial reads
    only its own replies."""
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(120)
        sock.connect(os.fspath(sock_path))
        reader = sock.makefile("rb")
        json.loads(reader.readline())  # greeting
        reply: dict[str, t.Any] = {}
        for number, request in enumerate(({"execute": "qmp_capabilities"}, {"execute": command})):
            request["id"] = f"kills-{number}"
            if number == 1 and arguments is not None:
                request["arguments"] = arguments
            sock.sendall(json.dumps(request).encode() + b"\n")
            while True:
                reply = json.loads(reader.readline())
                if reply.get("id") == request["id"]:
                    break
        if "error" in reply:
            raise RuntimeError(f"QMP {command} failed: {reply['error']}")
        return reply["return"]


def vm_status(vm: NoOsVM) -> str:
    return str(qmp(vm.qmp, "query-status")["status"])


def flush(vm: NoOsVM, drive: str = "drive0") -> None:
    qmp(vm.qmp, "human-monitor-command", {"command-line": f'qemu-io {drive} "flush"'})


# -- the trial and what the tests share --------------------------------------------------------------------


def trial(
    group: str,
    index: int,
    window: list[float],
    module: str,
    args: dict[str, t.Any],
    observe: t.Callable[[], t.Any],
    check: t.Callable[[], None],
    target: t.Any = None,
) -> Outcome:
    """Kill one run at a seeded moment, check, converge, check again."""
    share = fraction(group, index)
    delay = window[0] + share * (window[1] - window[0])
    before = observe()
    run = run_module(module, args, kill_after=delay)
    if not run.killed:
        # Finished before the kill (the machine was busier when the window was measured): later trials of this
        # group draw from the shortest full run seen.
        window[1] = min(window[1], run.elapsed)
        window[0] = min(window[0], window[1] * 0.8)
    after = observe()
    check()
    result = converge(module, args, repeat_unchanged=args.get("state") != "reverted")
    converged = observe()
    check()
    if target is not None:
        assert converged == target, f"{group}:{index}: converged to {converged}, wanted {target}"
    outcome = Outcome(
        group,
        index,
        share,
        delay,
        run.killed,
        classify(before, after, converged) if run.killed else "not killed (finished first)",
        "changed" if result["changed"] else "unchanged",
        run.orphans,
    )
    for warning in result.get("warnings") or []:
        text = str(warning.get("event", {}).get("msg", warning) if isinstance(warning, dict) else warning)
        outcome.notes.append(f"warning={text[:160]!r}")
    record(outcome)
    return outcome


def measure(module: str, args: dict[str, t.Any]) -> list[float]:
    """The window where the task works: from the end of a check-mode run (start-up, reads and planning; 10% earlier
    for noise) to the end of the real run."""
    check = run_module(module, {**args, "_ansible_check_mode": True})
    assert check.result is not None and not check.result.get("failed"), check.result
    run = run_module(module, args)
    assert run.result is not None and not run.result.get("failed"), run.result
    return [min(check.elapsed, run.elapsed) * 0.9, run.elapsed]


def snapshots(path: Path) -> list[str]:
    import json
    import subprocess

    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "-U", "--output=json", str(path)], capture_output=True, text=True, check=True
        ).stdout
    )
    return sorted(snap["name"] for snap in info.get("snapshots") or [])


# -- offline ------------------------------------------------------------------------------------------------------


def make_chain(folder: Path) -> tuple[Path, Path]:
    """base: 0xAA at 0, 0x11 at 8M; overlay: 0xBB over the first 8M (enough data for the commit/convert to take a
    moment)."""
    import subprocess

    for leftover in folder.iterdir():
        assert leftover.is_file(), f"{leftover} left behind"
        leftover.unlink()
    base, overlay = folder / "base.qcow2", folder / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "32M"], check=True)
    qemu_io_write(base, 0xAA, "0", "8M")
    qemu_io_write(base, 0x11, "8M", "8M")
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(overlay)], check=True
    )
    qemu_io_write(overlay, 0xBB, "0", "8M")
    return base, overlay


def backing(path: Path) -> str | None:
    import json
    import subprocess

    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "-U", "--output=json", str(path)], capture_output=True, text=True, check=True
        ).stdout
    )
    return info.get("backing-filename")


def vmsnap_jobs(vm: NoOsVM) -> list[dict[str, t.Any]]:
    return [job for job in qmp(vm.qmp, "query-jobs") if str(job.get("id", "")).startswith("vmsnap-")]


def settle(vm: NoOsVM) -> None:
    """QEMU goes on with a killed task's job or state save on its own: wait until it no longer writes (a job that
    waits in 'ready' writes nothing new) before an image is checked with -U."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        busy = [job for job in qmp(vm.qmp, "query-jobs") if job.get("status") in ("created", "running")]
        migrating = qmp(vm.qmp, "query-migrate").get("status") in ("setup", "active", "device")
        if not busy and not migrating:
            return
        time.sleep(0.05)
    raise AssertionError(f"{vm.name}: QEMU still busy after 120 s")


def dead_pid() -> int:
    import subprocess

    proc = subprocess.run(["true"], check=True)
    del proc
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def ok_run(module: str, args: dict[str, t.Any]) -> dict[str, t.Any]:
    run = run_module(module, args)
    assert run.result is not None and not run.result.get("failed"), run.result
    return run.result


def summary(report: str) -> str:
    """A Markdown table of a VMSNAP_KILL_REPORT file: per group, trials, kills, outcomes (docs/reliability.md)."""
    rows: dict[str, dict[str, t.Any]] = {}
    with open(report, encoding="utf-8") as handle:
        for line in handle:
            trial = json.loads(line)
            row = rows.setdefault(
                trial["group"], {"trials": 0, "killed": 0, "after": {}, "next": {}, "orphans": 0, "finished": 0}
            )
            row["trials"] += 1
            row["killed"] += bool(trial["killed"])
            row["after"][trial["after_kill"]] = row["after"].get(trial["after_kill"], 0) + 1
            if trial["killed"]:
                row["next"][trial["next_run"]] = row["next"].get(trial["next_run"], 0) + 1
            row["orphans"] += bool(trial["orphans"])
            row["finished"] += any("no longer runs" in note for note in trial["notes"])
    lines = [
        "| Task | Trials | Killed | State after the kill | Next run (killed trials) | Children left running | "
        "Job/pause of the killed task finished by the next run |",
        "|---|---|---|---|---|---|---|",
    ]
    for group, row in rows.items():
        after = ", ".join(f"{name}: {count}" for name, count in sorted(row["after"].items()))
        following = ", ".join(f"{name}: {count}" for name, count in sorted(row["next"].items()))
        lines.append(
            f"| {group} | {row['trials']} | {row['killed']} | {after} | {following or '-'} | {row['orphans']} | "
            f"{row['finished']} |"
        )
    total = sum(row["trials"] for row in rows.values())
    killed = sum(row["killed"] for row in rows.values())
    lines.append(f"| all | {total} | {killed} | | | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "summary":
        raise SystemExit("kill_trials.py summary REPORT.jsonl")
    print(summary(sys.argv[2]))
