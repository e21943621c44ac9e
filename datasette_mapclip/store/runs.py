"""Load runs: which process runs a load, and whether a run marked 'running' has died."""

from __future__ import annotations

import datetime
import hashlib
import os
import socket

# A run on another host (a database on shared storage) or from a version without pids counts
# as dead once it has not written for this long: a live load writes a batch every few seconds,
# and waits at most a couple of minutes on a server's Retry-After.
STALE_LOAD_SECONDS = 3600


def host_id() -> str:
    """This machine, as the ``loads`` table names it: a hash, because the table is published with the
    collection and a host name can say more about the publisher's network than they mean to."""
    return "host-" + hashlib.sha256(socket.gethostname().encode()).hexdigest()[:12]


def why_load_is_dead(pid, run_host, last_seen, this_host: str, stale_after: float) -> str | None:
    if pid and run_host == this_host:
        exists = process_exists(int(pid))
        if exists is False:
            return f"process {pid} on {run_host} ended without finishing (killed, or the machine stopped)"
        if exists:
            return None
    try:
        seen = datetime.datetime.fromisoformat(last_seen)
    except (TypeError, ValueError):
        return None
    idle = (datetime.datetime.now(datetime.timezone.utc) - seen).total_seconds()
    if idle < stale_after:
        return None
    where = f"process {pid} on {run_host}" if pid else "a run without a recorded process"
    return f"{where} has written nothing for {idle / 3600:.1f} hours: taken as ended without finishing"


def process_exists(pid: int) -> bool | None:
    """Whether a process exists on this host; None when this platform cannot say safely."""
    if os.name != "posix":
        return None  # on Windows os.kill(pid, 0) sends CTRL_C_EVENT: staleness decides there
    try:
        os.kill(pid, 0)  # signal 0 delivers nothing: it only asks whether the pid exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except OSError:
        return None
    return True
