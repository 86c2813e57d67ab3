"""Telling for certain that a worker's process is gone (the sweep and revokes, workers.py).

A wrong "dead" releases a live worker's reservations; a wrong "alive" only leaves them to
the silence test. So every doubt answers "alive": a host that cannot be told apart from
ours, a process we may not signal (EPERM: another user's), a /proc we may not read
(hidepid, another user's process).
"""

from __future__ import annotations

import errno
import os
import secrets
from pathlib import Path

_IDENTITY_FIELDS = 7  # v2 | machine id | boot id | PID namespace | pid | start time | nonce


def _start_ticks(pid: int) -> str | None:
    """The start time of a process (clock ticks since boot) as /proc shows it; None if
    /proc does not show it (gone, or hidden from us), "Z" for a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    fields = stat.rsplit(")", 1)[-1].split()  # the command name may hold spaces and parentheses
    if len(fields) < 20:
        return None
    return "Z" if fields[0] in ("Z", "X") else fields[19]  # field 22 of proc(5); fields[0] is field 3


def _runs(pid: int) -> bool:
    """Whether a process with this PID exists: ESRCH says no for certain; EPERM says it
    exists (another user's, which /proc may hide from us)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError as exc:
        return exc.errno != errno.ESRCH
    return True


def _read_id(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def process_identity() -> str | None:
    """v2 | machine id | boot id | PID namespace | pid | start time | nonce; None where
    /proc is unavailable.

    Two workers with the same machine id, boot id and PID namespace see each other's
    PIDs, so one can tell that the other is gone. The boot id alone is not enough: hosts
    cloned from one running image, or restored from one snapshot, share it, and every
    host's initial PID namespace has the same inode number. The start time defeats PID
    reuse (a restarted container's gateway is PID 1 again); the nonce makes two
    registrations of one process distinct."""
    boot = _read_id("/proc/sys/kernel/random/boot_id")
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return None
    start = _start_ticks(os.getpid())
    if not boot or not start or start == "Z":
        return None
    machine = _read_id("/etc/machine-id") or _read_id("/var/lib/dbus/machine-id") or "-"
    return f"v2|{machine}|{boot}|{namespace}|{os.getpid()}|{start}|{secrets.token_hex(8)}"


def provably_dead(identity: str | None, mine: str | None) -> bool:
    """True only when the process that registered `identity` certainly no longer runs."""
    if not identity or not mine:
        return False
    theirs, ours = identity.split("|"), mine.split("|")
    if len(theirs) != _IDENTITY_FIELDS or len(ours) != _IDENTITY_FIELDS or theirs[0] != "v2":
        return False  # a format this version does not know: only the heartbeat can tell
    if theirs[1:4] != ours[1:4]:
        return False  # another host or PID namespace: only the heartbeat can tell
    try:
        pid = int(theirs[4])
    except ValueError:
        return False
    if not _runs(pid):
        return True
    ticks = _start_ticks(pid)
    if ticks is None:
        return False  # it runs, and /proc will not say what it is: cannot tell
    return ticks == "Z" or ticks != theirs[5]  # a zombie, or the PID now runs another process
