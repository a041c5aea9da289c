"""OUTPUT/train.log: the run's own log file, holding the lines the console shows.

The console shows either the progress bar (stderr is a terminal) or one line per `log_every` steps
(a pipe or a file), never both. Step lines go to their own logger, `tailoredgen_train.progress`, so
that a terminal with a bar does not get them while train.log always does. When stderr already *is*
OUTPUT/train.log (the service's launchers redirect into it), nothing is added: every line would be
written twice.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

LOG_FILE = "train.log"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
progress_log = logging.getLogger("tailoredgen_train.progress")
progress_log.propagate = False  # its handlers are chosen per run, below


def stderr_is(path: Path) -> bool:
    """True when this process's stderr is the file at `path` (a launcher redirected it there)."""
    try:
        ours, theirs = os.fstat(sys.stderr.fileno()), os.stat(path)
    except (OSError, ValueError, AttributeError):  # no real stderr (pytest capture), or no file yet
        return False
    return (ours.st_dev, ours.st_ino) == (theirs.st_dev, theirs.st_ino)


def console_shows_bar() -> bool:
    return sys.stderr.isatty()


@contextmanager
def run_log(output_dir: Path, *, is_main_process: bool) -> Iterator[None]:
    """For the length of a run: train.log gets every INFO line of the engine and every warning, and
    step lines reach the console only when it shows no progress bar."""
    if not is_main_process:
        yield
        return
    handlers: list[tuple[logging.Logger, logging.Handler]] = []
    path = Path(output_dir) / LOG_FILE
    if not stderr_is(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        to_file = logging.FileHandler(path, encoding="utf-8")
        to_file.setFormatter(logging.Formatter(LOG_FORMAT))
        to_file.setLevel(logging.INFO)
        handlers += [(logging.getLogger(), to_file), (progress_log, to_file)]
    if not console_shows_bar():
        to_console = logging.StreamHandler(sys.stderr)
        to_console.setFormatter(logging.Formatter(LOG_FORMAT))
        handlers.append((progress_log, to_console))
    quiet_loading = _hf_progress_bars(enabled=False)  # a render's loading bar would cut into the training bar
    engine_log = logging.getLogger("tailoredgen_train")
    previous_level = engine_log.level
    if engine_log.getEffectiveLevel() > logging.INFO:  # a library caller's logging config drops INFO
        engine_log.setLevel(logging.INFO)
    progress_log.setLevel(logging.INFO)
    for logger, handler in handlers:
        logger.addHandler(handler)
    try:
        yield
    finally:
        for logger, handler in handlers:
            logger.removeHandler(handler)
            handler.close()
        engine_log.setLevel(previous_level)
        if quiet_loading:
            _hf_progress_bars(enabled=True)


def _hf_progress_bars(*, enabled: bool) -> bool:
    """transformers' and diffusers' loading bars ("Loading weights: 100%|..."): noise between the
    engine's lines in a log file, and a second bar cutting into the training bar on a terminal."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    for module in (diffusers_logging, transformers_logging):
        (module.enable_progress_bar if enabled else module.disable_progress_bar)()
    return True
