"""Download progress every process can read (RS-7): one small JSON file per model next to its
lock, replaced atomically, so gunicorn workers and nodes sharing the directory all see it."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import quote

QUEUED, DOWNLOADING, ERROR = "queued", "downloading", "error"
_SUFFIX = ".progress.json"


@dataclass
class Progress:
    model_id: str
    status: str  # queued | downloading | error
    downloaded_bytes: int = 0
    total_bytes: int = 0
    error_message: str | None = None
    host: str = field(default_factory=lambda: os.uname().nodename)
    pid: int = field(default_factory=os.getpid)
    updated_at: float = field(default_factory=time.time)

    @property
    def fraction(self) -> float:
        return min(1.0, self.downloaded_bytes / self.total_bytes) if self.total_bytes else 0.0


_MAX_KEY = 200  # leaves room for the longest suffix within one file name (255 bytes)


def key(model_id: str) -> str:
    """A file name for an id (ids may contain '/', and reach 256 characters: too long for one
    file name once quoted, so long ones are cut and end with a hash of the whole id; '~'
    never occurs in a quoted valid id, so the two kinds cannot collide)."""
    quoted = quote(model_id, safe="")
    if len(quoted) <= _MAX_KEY:
        return quoted
    digest = hashlib.sha256(model_id.encode("utf-8")).hexdigest()[:32]
    return f"{quoted[:_MAX_KEY - 33]}~{digest}"


class ProgressStore:
    def __init__(self, locks_dir: Path) -> None:
        self.dir = locks_dir

    def _path(self, model_id: str) -> Path:
        return self.dir / f"{key(model_id)}{_SUFFIX}"

    def write(self, record: Progress) -> None:
        record.updated_at = time.time()
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self._path(record.model_id)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        text = json.dumps(asdict(record))
        try:
            tmp.write_text(text)
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno != errno.ENOSPC or not path.exists():
                raise
            # A full disk (the download that failed may have filled it) has no block for a
            # new file, but the record's own block is still there: overwrite it in place, so
            # that the failure is told rather than read as an interrupted download.
            with path.open("r+") as f:
                f.truncate(0)
                f.write(text)

    def read(self, model_id: str) -> Progress | None:
        try:
            return Progress(**json.loads(self._path(model_id).read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def clear(self, model_id: str) -> None:
        self._path(model_id).unlink(missing_ok=True)

    def all(self) -> list[Progress]:
        records = []
        for path in self.dir.glob(f"*{_SUFFIX}"):
            try:  # the id is in the record: long ids' file names are hashed
                records.append(Progress(**json.loads(path.read_text())))
            except (OSError, ValueError, TypeError):
                continue
        return records
