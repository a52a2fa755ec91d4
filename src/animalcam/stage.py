"""What every ``stages/*.py`` entry point shares: logging set-up and clean failures.

A stage is a thin ``main()`` wrapped by :func:`run_stage`. Expected problems
(:class:`~animalcam.errors.AnimalcamError`) become one line on stderr and exit code 2;
set ``ANIMALCAM_DEBUG=1`` to see the traceback instead. Anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator

from animalcam import environment, outputs
from animalcam.errors import AnimalcamError, EnvironmentVariableError
from animalcam.outputs import Terminated

EXIT_USER_ERROR = 2
log = logging.getLogger(__name__)


def configure_logging(stage: str | None = None) -> None:
    """Log to stderr at ``$ANIMALCAM_LOG_LEVEL``, after checking our environment variables.

    A bad value ends the stage here with one line and exit code 2: this runs before
    :func:`run_stage` handles errors, and without logging there is nothing to run.
    ``stage`` names the stage in that line (default: the script's name).
    """
    try:
        environment.check_environment()
    except EnvironmentVariableError as exc:
        name = stage or os.path.splitext(os.path.basename(sys.argv[0]))[0] or "stage"
        print(f"animalcam {name}: error: {exc}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    logging.basicConfig(
        level=environment.log_level(),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    # MLflow's and its database migrations' set-up chatter is not news to a stage's user.
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger().level))


def run_stage(main: Callable[[], object], name: str, *, tensorflow: bool = False) -> None:
    """Run ``main`` as the DVC stage ``name``; never returns.

    SIGTERM (and SIGHUP, unless ignored) stop the stage as Ctrl-C does: every ``with``
    block unwinds, so temporary outputs are removed, the previous outputs stay and the
    MLflow runs end KILLED; then one line and exit code 128 + the signal's number.
    ``tensorflow``: start TensorFlow first, quietly (see :func:`start_tensorflow`); the
    stage's script then imports the modules that use it inside ``main``.
    """
    configure_logging(name)
    _stop_on_signals()
    try:
        if tensorflow:
            start_tensorflow()
        main()
    except AnimalcamError as exc:
        if environment.debug_enabled():
            raise
        message = " ".join(str(exc).split())  # one line, whatever the message held
        print(f"animalcam {name}: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except Terminated as exc:
        print(f"animalcam {name}: stopped by {exc.signal_name}", file=sys.stderr)
        sys.exit(128 + exc.signum)
    except KeyboardInterrupt:
        print(f"animalcam {name}: interrupted", file=sys.stderr)
        sys.exit(130)
    if (signum := outputs.stop_requested()) is not None:  # its exception got lost
        print(f"animalcam {name}: stopped by {signal.Signals(signum).name}", file=sys.stderr)
        sys.exit(128 + signum)
    sys.exit(0)


# SIGHUP: the terminal that started the stage closed.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _stop_on_signals() -> None:
    """Make SIGTERM and SIGHUP raise :class:`Terminated` in this process's main thread.

    A signal someone chose to ignore (``nohup``) stays ignored. After the first one the
    rest are ignored, so that the clean-up it started runs to its end (SIGKILL still
    stops it). A process forked from this one (prepare's worker pool) inherits the
    handler; there the signal kills as by default, and the stage's own process cleans up.
    """
    owner = os.getpid()

    def stop(signum, frame):
        if os.getpid() != owner:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        for other in STOP_SIGNALS:
            if signal.getsignal(other) is stop:
                signal.signal(other, signal.SIG_IGN)
        raise outputs.request_stop(signum)

    for signum in STOP_SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, stop)


# What TensorFlow's C++ side writes to stderr while it starts, before any setting of ours
# (or TF_CPP_MIN_LOG_LEVEL) applies: a banner, oneDNN and CPU-feature notices, and on a
# machine without a GPU the CUDA probes' complaints. Not news to a stage's user.
_STARTUP_NOISE = re.compile(
    r"absl::InitializeLog|oneDNN custom operations|cpu_feature_guard|rebuild TensorFlow|"
    r"AVX|cuda drivers|cuInit|CUDA error|TensorRT|Unable to register cu|computation placer|"
    r"This TensorFlow binary is optimized"
)
_TF_LINE = re.compile(r"^([IWEF])\d{4} ")


def start_tensorflow() -> None:
    """Import TensorFlow and list its devices with its C++ start-up output captured.

    Expected start-up lines are logged at DEBUG; any other warning or error it writes (a
    GPU library that does not load, on a GPU runner) is logged as a WARNING. So a stage's
    user sees our lines, and a bad input still ends in exactly one.
    """
    if "tensorflow" in sys.modules:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's INFO once it is up
    with native_stderr_logged():
        import tensorflow as tf

        tf.config.list_physical_devices()  # the CUDA probe writes here, not later


@contextlib.contextmanager
def native_stderr_logged() -> Iterator[None]:
    """Capture what C++ code writes to file descriptor 2 inside the block (TensorFlow's
    start-up, the TFLite converter's ``fully_quantize`` line) and log it: expected and
    INFO lines at DEBUG, anything else as a WARNING."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = captured.read().decode("utf-8", "replace")
            for line in text.splitlines():
                kind = _TF_LINE.match(line)
                quiet = (
                    not line.strip()
                    or _STARTUP_NOISE.search(line)
                    or (kind and kind[1] == "I")
                    or line.startswith("fully_quantize:")
                )
                (log.debug if quiet else log.warning)("tensorflow: %s", line)
