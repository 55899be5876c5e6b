"""What every stage shares: the log it reports through and atomic JSON writes (the sample schema of the shards
is `stages/data/schema.py`)."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Protocol


class StageLog(Protocol):
    """Where a stage reports. The pipeline passes one that writes to the stage's log file and to MLflow."""

    def info(self, msg: str) -> None: ...
    def metrics(self, values: dict[str, float], step: int | None = None) -> None: ...
    def artifact(self, path: Path) -> None: ...
    def progress(self, step: int, total: int | None = None) -> None: ...


class PrintLog:
    """A StageLog for tests and direct calls: Python logging, metrics kept in memory."""

    def __init__(self, name: str = "narvl") -> None:
        self._log = logging.getLogger(name)
        self.history: list[tuple[int | None, dict[str, float]]] = []
        self.artifacts: list[Path] = []

    def info(self, msg: str) -> None:
        self._log.info(msg)

    def metrics(self, values: dict[str, float], step: int | None = None) -> None:
        self.history.append((step, dict(values)))
        self._log.info("step %s: %s", step, ", ".join(f"{k}={v:.4g}" for k, v in values.items()))

    def artifact(self, path: Path) -> None:
        self.artifacts.append(Path(path))

    def progress(self, step: int, total: int | None = None) -> None:
        pass

    def last(self, key: str) -> float | None:
        for _, values in reversed(self.history):
            if key in values:
                return values[key]
        return None


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON through a temporary file and a rename, so a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
