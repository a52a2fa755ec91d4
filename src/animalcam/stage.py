"""What every ``stages/*.py`` entry point shares: logging set-up and clean failures.

A stage is a thin ``main()`` wrapped by :func:`run_stage`. Expected problems
(:class:`~animalcam.errors.AnimalcamError`) become one line on stderr and exit code 2;
set ``ANIMALCAM_DEBUG=1`` to see the traceback instead. Anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable

from animalcam import environment
from animalcam.errors import AnimalcamError, EnvironmentVariableError

EXIT_USER_ERROR = 2


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


def run_stage(main: Callable[[], object], name: str) -> None:
    """Run ``main`` as the DVC stage ``name``; never returns.

    SIGTERM (and SIGHUP, unless ignored) stop the stage as Ctrl-C does: every ``with``
    block unwinds, so temporary outputs are removed, the previous outputs stay and the
    MLflow runs end KILLED; then one line and exit code 128 + the signal's number.
    """
    configure_logging()
    _stop_on_signals()
    try:
        main()
    except AnimalcamError as exc:
        if os.environ.get("ANIMALCAM_DEBUG"):
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
    sys.exit(0)


class Terminated(KeyboardInterrupt):
    """The stage got a stop signal; unwinds like Ctrl-C (``except Exception`` misses it)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
        self.signal_name = signal.Signals(signum).name


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
        raise Terminated(signum)

    for signum in STOP_SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, stop)
