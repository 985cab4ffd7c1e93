"""Runs left RUNNING by killed processes: every run names the process that created it, and the next potion
process on that host closes the runs of processes that have died as KILLED (MLflow leaves them RUNNING forever).

A pid is matched with its start time (Linux ``/proc``), so a pid that a later process took over (common in
containers, whose pids start again at 1) does not keep a dead run RUNNING.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from potion.core.machine import cpu_description

log = logging.getLogger(__name__)

HOST_TAG, PID_TAG, PID_START_TAG = "potion.host", "potion.pid", "potion.pid_start"  # who created a run
CPU_TAG = "potion.cpu"  # the processor it computed on (CPU timings and bf16 numbers differ between machines)


def process_tags() -> dict[str, str]:
    """This process as run tags (host, pid and the pid's start time, so a later process can tell it died; the CPU)."""
    pid = os.getpid()
    tags = {HOST_TAG: socket.gethostname(), PID_TAG: str(pid)}
    if cpu := cpu_description():
        tags[CPU_TAG] = cpu
    if start := _process_start(pid):
        tags[PID_START_TAG] = start
    return tags


def _process_start(pid: int) -> str:
    """When process ``pid`` started, in clock ticks since boot (Linux ``/proc``); '' where that cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    fields = stat.rsplit(")", 1)[-1].split()  # the command name in parentheses may hold spaces
    return fields[19] if len(fields) > 19 else ""


def process_alive(tags: Mapping[str, str]) -> bool | None:
    """Whether the process that created a run (from its tags) still runs; None when this host cannot tell.

    A pid now used by another process (a different start time) counts as dead.
    """
    host, pid = tags.get(HOST_TAG), str(tags.get(PID_TAG, ""))
    if not host or host != socket.gethostname() or not pid.isdigit():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    start, now = tags.get(PID_START_TAG, ""), _process_start(int(pid))
    return not (start and now and start != now)


def close_dead_runs(client: Any, experiment_id: str) -> list[str]:
    """Close as KILLED the runs of an experiment left RUNNING by processes of this host that have died.

    Runs of other hosts are left alone (their processes cannot be seen from here). Never raises.
    """
    host = socket.gethostname().replace("'", "")
    query = f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{host}'"
    try:
        runs = client.search_runs([experiment_id], filter_string=query, max_results=1000)
    except Exception as exc:  # noqa: BLE001 - housekeeping only
        log.debug("looking for runs left RUNNING failed: %s", exc)
        return []
    dead = [r.info.run_id for r in runs if process_alive(r.data.tags) is False]
    closed = [run_id for run_id in dead if close_killed(client, run_id)]
    if closed:
        log.warning("closed %d MLflow run(s) left RUNNING by a killed process on this host as KILLED: %s",
                    len(closed), ", ".join(closed))
    return closed


def close_killed(client: Any, run_id: str) -> bool:
    """Mark a run KILLED; False (and a debug line) when the store refuses. Never raises."""
    try:
        client.set_terminated(run_id, "KILLED")
    except Exception as exc:  # noqa: BLE001 - housekeeping only
        log.debug("closing run %s failed: %s", run_id, exc)
        return False
    return True
