"""What every ``stages/*.py`` entry point shares: logging set-up and clean failures.

A stage is a thin ``main()`` wrapped by :func:`run_stage`. Expected problems
(:class:`~animalcam.errors.AnimalcamError`) become one line on stderr and exit code 2;
set ``ANIMALCAM_DEBUG=1`` to see the traceback instead. Anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

from animalcam.errors import AnimalcamError

EXIT_USER_ERROR = 2


def configure_logging() -> None:
    level = os.environ.get("ANIMALCAM_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # MLflow's and its database migrations' set-up chatter is not news to a stage's user.
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger().level))


def run_stage(main: Callable[[], object], name: str) -> None:
    """Run ``main`` as the DVC stage ``name``; never returns."""
    configure_logging()
    try:
        main()
    except AnimalcamError as exc:
        if os.environ.get("ANIMALCAM_DEBUG"):
            raise
        message = " ".join(str(exc).split())  # one line, whatever the message held
        print(f"animalcam {name}: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print(f"animalcam {name}: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(0)
