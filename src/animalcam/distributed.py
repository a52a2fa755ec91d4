"""Training on several processes or hosts: ``TF_CONFIG`` and MultiWorkerMirroredStrategy.

Without ``TF_CONFIG`` nothing here acts (animalcam.training picks one GPU, MirroredStrategy
over local GPUs, or the CPU). With it, every process of the cluster runs the train stage
under :func:`multi_worker_strategy`, and:

- **Batches.** Every worker builds the same batches (the order depends on (seed, epoch)
  alone, animalcam.batches); :func:`split_batches` makes tf.data hand each worker its own
  slice of every global batch (``AutoShardPolicy.DATA`` on a batched dataset: worker ``i``
  of ``W`` gets rows ``i*B/W .. (i+1)*B/W - 1``), so ``train.batch_size`` stays the global
  batch and a step averages the same images as a single-process step.
- **Writes.** Only the chief (task "chief", else "worker" 0, :func:`is_chief`) keeps
  outputs, resume state and MLflow records. The others save their resume state to a
  temporary directory (:func:`state_directory`), deleted when they finish: every worker
  runs the same save code, only the chief's copy is kept.
- **Resume.** At the start the chief sends its resume state (state.json and the weight
  files it names) to every worker (:func:`share_resume_state`), so all continue from the
  chief's last finished epoch; a worker whose params, data or code differ stops there.
- **Failures.** ``$ANIMALCAM_WORKER_TIMEOUT`` (animalcam.environment) bounds how long a
  worker waits for the others: to join, at each all-reduce, and for heartbeats (at most
  10 s). A lost worker ends the others with one line (:func:`worker_failures`); the
  chief's resume state then holds the last finished epoch.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import re
import shutil
import tempfile
import traceback
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from animalcam.environment import WORKER_TIMEOUT, worker_timeout
from animalcam.errors import ClusterError, EnvironmentVariableError
from animalcam.fingerprints import changed_keys
from animalcam.resume import STATE_FILE, TrainingState
from animalcam.resume_store import ResumeStore

log = logging.getLogger(__name__)

TF_CONFIG = "TF_CONFIG"
TRAINING_JOBS = ("chief", "worker")  # the task types that train (no parameter servers)
# A worker whose process is gone is noticed by its missing heartbeats within this many
# seconds (or the timeout, if shorter); TensorFlow's own default.
HEARTBEAT_SECONDS = 10
# How to start a run again after a lost worker; the chief's resume state is kept.
RESUME_HINT = (
    "the chief's resume state keeps the last finished epoch: start the train stage on "
    "every host again (same TF_CONFIG) to resume from it"
)


@dataclass(frozen=True)
class Cluster:
    """The training cluster of ``TF_CONFIG``, as this process sees it."""

    jobs: dict[str, list[str]]  # task type -> addresses ("host:port")
    task_type: str
    task_index: int

    @property
    def is_chief(self) -> bool:
        """The task that keeps outputs: "chief" 0, else "worker" 0."""
        chief = "chief" if "chief" in self.jobs else "worker"
        return self.task_type == chief and self.task_index == 0

    @property
    def size(self) -> int:
        return sum(len(self.jobs.get(job, [])) for job in TRAINING_JOBS)

    def name(self, task_type: str, index: int) -> str:
        """``worker 1 (host:port)``."""
        return f"{task_type} {index} ({self.jobs[task_type][index]})"

    def peer_in(self, message: str) -> str | None:
        """The other task a TensorFlow error message names (by task or address), or None."""
        for task_type, index in re.findall(r"/job:(\w+)/(?:replica:\d+/)?task:(\d+)", message):
            index = int(index)
            if (task_type, index) != (self.task_type, self.task_index) and index < len(
                self.jobs.get(task_type, [])
            ):
                return self.name(task_type, index)
        for task_type, addresses in self.jobs.items():
            for index, address in enumerate(addresses):
                host, _, port = address.rpartition(":")
                hosts = {host, "127.0.0.1"} if host in ("localhost", "127.0.0.1") else {host}
                mine = (task_type, index) == (self.task_type, self.task_index)
                if not mine and any(f"{h}:{port}" in message for h in hosts):
                    return self.name(task_type, index)
        return None


def cluster_from_environment() -> Cluster | None:
    """The cluster ``$TF_CONFIG`` describes, None when it is unset, blank or names one task.

    Raises EnvironmentVariableError, naming what is wrong, for JSON that does not describe
    a training task: ``{"cluster": {"worker": ["host1:port", "host2:port"]}, "task":
    {"type": "worker", "index": 0}}`` (optionally with one "chief").
    """
    raw = os.environ.get(TF_CONFIG, "").strip()
    if not raw:
        return None
    example = (
        'expected e.g. {"cluster": {"worker": ["host1:2222", "host2:2222"]}, "task": '
        '{"type": "worker", "index": 0}} (README: "Training on several hosts")'
    )
    try:
        config = json.loads(raw)
        jobs = {job: list(config["cluster"][job]) for job in config["cluster"]}
        task_type, task_index = config["task"]["type"], int(config["task"]["index"])
    except (ValueError, TypeError, KeyError) as exc:
        raise EnvironmentVariableError(
            f"{TF_CONFIG} is not a cluster spec ({type(exc).__name__}: {exc}); {example}"
        ) from None
    unknown = sorted(set(jobs) - set(TRAINING_JOBS))
    if unknown or task_type not in TRAINING_JOBS or len(jobs.get("chief", [])) > 1:
        raise EnvironmentVariableError(
            f"{TF_CONFIG} names task types {sorted(set(jobs) | {task_type})}; training uses "
            "'worker' tasks and at most one 'chief' (no parameter servers); " + example
        )
    if not 0 <= task_index < len(jobs.get(task_type, [])):
        raise EnvironmentVariableError(
            f"{TF_CONFIG}: task {task_type} {task_index} is not in its cluster "
            f"({len(jobs.get(task_type, []))} {task_type} task(s)); {example}"
        )
    cluster = Cluster(jobs, task_type, task_index)
    return cluster if cluster.size > 1 else None


def multi_worker_strategy(cluster: Cluster) -> tf.distribute.Strategy:
    """MultiWorkerMirroredStrategy over ``cluster``, with ``$ANIMALCAM_WORKER_TIMEOUT``
    bounding every wait for another worker.

    Call it before TensorFlow runs anything else (it configures the process's runtime).
    Returns once every worker has joined; raises ClusterError when one does not in time.
    """
    timeout = worker_timeout()
    _configure_coordination(cluster, timeout)
    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=timeout)
    log.info(
        "multi-worker training: this is %s of %d tasks%s; waiting up to %d s for the others",
        cluster.name(cluster.task_type, cluster.task_index),
        cluster.size,
        " (the chief)" if cluster.is_chief else "",
        timeout,
    )
    with worker_failures(cluster, joining=True):
        strategy = _MultiWorkerStrategy(communication_options=options)
    strategy.cluster = cluster
    return strategy


class _MultiWorkerStrategy(tf.distribute.MultiWorkerMirroredStrategy):
    """MultiWorkerMirroredStrategy with a ``reduce`` that Keras 3's ``fit`` can use.

    Keras (3.15) reduces a whole ``(x, y)`` batch in one call and each step's scalar
    metrics with ``axis=0``; MirroredStrategy accepts both, MultiWorkerMirroredStrategy
    neither. Here each tensor is reduced on its own, a scalar across replicas.
    """

    cluster: Cluster

    def reduce(self, reduce_op, value, axis=None):
        def one(v):
            first = self.experimental_local_results(v)[0]
            rank = getattr(getattr(first, "shape", None), "rank", None)
            return super(_MultiWorkerStrategy, self).reduce(
                reduce_op, v, None if rank == 0 else axis
            )

        return tf.nest.map_structure(one, value)


def _configure_coordination(cluster: Cluster, timeout: int) -> None:
    """TensorFlow's coordination service with our timeouts: heartbeats (a worker that is
    gone), joining, and the barrier at shutdown. MultiWorkerMirroredStrategy configures
    it with TensorFlow's defaults (no limit on joining) unless it is configured already;
    there is no public API for it, so a TensorFlow without this one keeps its defaults."""
    try:
        from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2
        from tensorflow.python.distribute import multi_worker_util
        from tensorflow.python.eager import context

        spec = tf.train.ClusterSpec(cluster.jobs)
        context.context().configure_coordination_service(
            service_type="standalone",
            service_leader=multi_worker_util.coordination_leader(spec),
            heartbeat_timeout_in_ms=1000 * min(timeout, HEARTBEAT_SECONDS),
            cluster_register_timeout_in_ms=1000 * timeout,
            shutdown_barrier_timeout_in_ms=1000 * min(timeout, HEARTBEAT_SECONDS),
            coordinated_jobs=[
                coordination_config_pb2.CoordinatedJob(name=job, num_tasks=len(cluster.jobs[job]))
                for job in TRAINING_JOBS
                if job in cluster.jobs
            ],
        )
        # Without the barrier the join timeout does not apply: a missing worker is waited
        # for forever (TensorFlow 2.21).
        context.context().coordination_service.cluster_register_with_barrier = True
    except (ImportError, AttributeError, TypeError) as exc:  # another TensorFlow version
        log.warning("cannot set the coordination service's timeouts (%s); using defaults", exc)


def cluster_of(strategy: tf.distribute.Strategy | None) -> Cluster | None:
    """The cluster ``strategy`` trains on (None: this process alone)."""
    return getattr(strategy, "cluster", None)


def is_chief(strategy: tf.distribute.Strategy | None) -> bool:
    """Whether this process keeps outputs: always, except a non-chief worker's."""
    cluster = cluster_of(strategy)
    return cluster is None or cluster.is_chief


def split_batches(strategy: tf.distribute.Strategy, ds: tf.data.Dataset) -> tf.data.Dataset:
    """``ds`` (global batches, the same on every worker) set to give each worker its
    slice of every batch; unchanged outside a multi-worker cluster.

    tf.data's default (shard by files, else by data) would look for files first and warn;
    DATA on a batched dataset splits each batch, it does not deal batches out.
    """
    if cluster_of(strategy) is None:
        return ds
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options)


@contextlib.contextmanager
def state_directory(strategy: tf.distribute.Strategy | None, state_dir: Path) -> Iterator[Path]:
    """``state_dir`` on the chief; on another worker a temporary directory, deleted on
    the way out, for its copy of the resume state."""
    if is_chief(strategy):
        yield state_dir
        return
    temporary = Path(tempfile.mkdtemp(prefix="animalcam-worker-state-"))
    try:
        yield temporary
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def share_resume_state(strategy: tf.distribute.Strategy | None, store: ResumeStore) -> ResumeStore:
    """Every worker continues from the chief's resume state: the chief's ``store`` (its
    state and the weight files it names) is copied into each other worker's state
    directory; returns this worker's store (the chief's own, or the copy).

    Raises ClusterError on a worker whose fingerprint (params, data, code, libraries)
    differs from the chief's: it would compute other numbers and never agree.
    """
    cluster = cluster_of(strategy)
    if cluster is None:
        return store
    state = store.state
    names = [name for name in dict.fromkeys((state.latest_weights, state.best_weights)) if name]
    files = {STATE_FILE: json.dumps(asdict(state)).encode()}
    files.update({name: (store.state_dir / name).read_bytes() for name in names})
    received = _broadcast_files(strategy, files if cluster.is_chief else {})
    if cluster.is_chief:
        return store
    chief_state = TrainingState(**json.loads(received.pop(STATE_FILE)))
    if chief_state.fingerprint != state.fingerprint:
        changed = ", ".join(changed_keys(chief_state.fingerprint, state.fingerprint))
        raise ClusterError(
            f"this worker's {changed} differ from the chief's, so they cannot train together; "
            "give every host the same params.yaml, data and code (and library versions)."
        )
    for name, content in received.items():
        (store.state_dir / name).write_bytes(content)
    if chief_state.epochs_done:
        log.info("continuing the chief's run after epoch %d", chief_state.epochs_done)
    return ResumeStore(store.state_dir, chief_state)


def _broadcast_files(strategy: tf.distribute.Strategy, files: dict[str, bytes]) -> dict[str, bytes]:
    """The chief's ``files`` (name -> content) on every worker (the others pass {})."""
    header = json.dumps({name: len(content) for name, content in files.items()}).encode()
    size = int(_broadcast(strategy, np.array([len(header)], np.int64))[0])
    names = json.loads(_broadcast_bytes(strategy, header, size))
    return {
        name: _broadcast_bytes(strategy, files.get(name, b""), length)
        for name, length in names.items()
    }


def _broadcast_bytes(strategy, content: bytes, length: int) -> bytes:
    # Collectives reduce numbers: bytes travel as int32 words (zero-padded to 4 bytes).
    words = -(-length // 4)
    buffer = np.zeros(words * 4, np.uint8)
    buffer[: len(content)] = np.frombuffer(content, np.uint8)
    summed = _broadcast(strategy, buffer.view(np.int32))
    return summed.astype(np.int32).view(np.uint8)[:length].tobytes()


def _broadcast(strategy, value: np.ndarray) -> np.ndarray:
    """``value`` as the chief's first replica holds it, on every worker: an all-reduce
    (sum) to which every other replica adds zeros. The same shape on every worker."""
    contributes = [is_chief(strategy)]  # the chief's first local replica only

    def local(context) -> tf.Tensor:
        mine = contributes[0]
        contributes[0] = False
        return tf.constant(value if mine else np.zeros_like(value))

    per_replica = strategy.experimental_distribute_values_from_function(local)
    summed = strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)
    return np.asarray(summed)


# What TensorFlow raises on a worker when another one is gone or stopped answering.
_LOST = (
    tf.errors.UnavailableError,
    tf.errors.DeadlineExceededError,
    tf.errors.AbortedError,
    tf.errors.CancelledError,
)


@contextlib.contextmanager
def worker_failures(cluster: Cluster | None, joining: bool = False) -> Iterator[None]:
    """Turn TensorFlow's errors about a lost worker (or, ``joining``, one that did not
    join) into one ClusterError line that names it, when TensorFlow's message does, and
    says what to do."""
    try:
        yield
    except _LOST as exc:
        if cluster is None:
            raise
        peer = cluster.peer_in(str(exc)) or "a worker"
        reason = _reason(exc)
        # The failed all-reduce's frames hold a thread pool that, left to the end of the
        # interpreter, prints a traceback of its own after our one line.
        traceback.clear_frames(exc.__traceback__)
        gc.collect()
        if joining:
            message = (
                f"{peer} did not join within {worker_timeout()} s ({type(exc).__name__}: "
                f"{reason}); start the train stage on every host of TF_CONFIG, at most "
                f"{WORKER_TIMEOUT} seconds apart."
            )
        else:
            message = (
                f"lost {peer} during training ({type(exc).__name__}: {reason}); {RESUME_HINT}."
            )
        raise ClusterError(message) from exc


def _reason(exc: Exception) -> str:
    """TensorFlow's message in a few words: its first line, without the op's name and
    the relays it came through."""
    text = getattr(exc, "message", None) or str(exc)
    text = re.sub(r"\{\{[^}]*\}\}\s*", "", text)  # {{function_node ...}}
    line = next((part.strip() for part in text.splitlines() if part.strip()), "")
    line = re.sub(r"^(Collective ops is aborted by: |Error reported from \S+: )+", "", line)
    return line.rstrip(":")[:200]
