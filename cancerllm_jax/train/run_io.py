"""Reading a training run's folder (``WORKDIR``) back: its resolved config and latest checkpoint."""
from __future__ import annotations

import os

RUN_FILE = "run.json"


def is_run_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, RUN_FILE))


def read_run_weights(path: str):
    raise NotImplementedError
