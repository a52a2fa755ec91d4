"""Runs left RUNNING by a stage that was killed outright, closed by the next stage.

SIGKILL or a power loss leave no chance to end a run. Every run a stage holds therefore
names its process (:func:`process_tags`: host, pid, start time); the next stage on the
same host marks KILLED the runs whose process is gone (:func:`close_abandoned_runs`).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Mapping

import psutil
from mlflow.entities import RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from animalcam import outputs

log = logging.getLogger(__name__)

HOST_TAG = "animalcam.host"
PID_TAG = "animalcam.pid"
PID_STARTED_TAG = "animalcam.pid_started"  # the process's start time: pids get reused


def process_tags() -> dict[str, str]:
    """Which process holds a run while it is RUNNING (see :func:`close_abandoned_runs`)."""
    me = psutil.Process()
    return {
        HOST_TAG: socket.gethostname(),
        PID_TAG: str(me.pid),
        PID_STARTED_TAG: f"{me.create_time():.3f}",
    }


def claim_run(client: MlflowClient, run_id: str) -> None:
    """Tag ``run_id`` as held by this process (a run it resumes, such as a parent)."""
    tags = [RunTag(k, v) for k, v in process_tags().items()]
    client.log_batch(run_id, tags=tags)


def close_abandoned_runs(client: MlflowClient, experiment_id: str) -> list[str]:
    """Mark KILLED the runs of ``experiment_id`` that a process on this host left RUNNING
    and that is gone (SIGKILL, power loss: nothing could end its runs). Returns their ids.

    A run counts only when it carries :func:`process_tags` of this host and that process
    (pid and start time) no longer runs; a stage running now, here or on another host,
    is never touched. Trouble searching is logged, not raised: this is housekeeping.
    """
    mine = process_tags()
    host = socket.gethostname().replace("'", "")
    closed = []
    try:
        runs = client.search_runs(
            [experiment_id],
            filter_string=f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{host}'",
            max_results=1000,
        )
        for run in runs:
            tags = run.data.tags
            if tags.get(PID_TAG) == mine[PID_TAG] or _holder_alive(tags):
                continue
            client.set_terminated(run.info.run_id, status="KILLED")
            closed.append(run.info.run_id)
            log.warning(
                "MLflow: run %s (%s) was left RUNNING by process %s, which is gone; marked "
                "it KILLED.",
                run.info.run_id,
                run.info.run_name,
                tags.get(PID_TAG),
            )
    except MlflowException as exc:
        log.warning("MLflow: could not look for runs left RUNNING by killed stages: %s", exc)
    return closed


def _holder_alive(tags: Mapping[str, str]) -> bool:
    """Whether the process named by a run's :func:`process_tags` may still hold it."""
    try:
        pid, started = int(tags[PID_TAG]), float(tags[PID_STARTED_TAG])
    except (KeyError, ValueError):
        return True  # not tagged by us: not ours to judge
    if not outputs.process_alive(pid):
        return False
    try:
        process = psutil.Process(pid)
        if abs(process.create_time() - started) < 2.0:  # the clock it derives from drifts
            return True
        # The pid was reused. By a Python or DVC process? Then play safe: maybe it is ours.
        return any(word in " ".join(process.cmdline()[:2]) for word in ("python", "dvc"))
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True
