"""A model's state, worked out in one place and named in one vocabulary.

The state is derived, never stored: from the model's files, its download's progress record
and its lock (every worker and every node sharing the directory reads the same ones). Its
phases:

* ``local``: the files are here (or on the shared path);
* ``queued``: a download is started and waits for the node's one download slot;
* ``downloading``: a download is running (``progress`` says how far);
* ``failed``: the last download failed (``error`` says why);
* ``interrupted``: a download was under way, but the process running it is gone;
* ``absent``: none of that (in the catalog, maybe; not here).

The two interfaces that report it translate these words, and only here: RS-7's
``/v0/models/{id}/status`` (``local | downloading | error | not_downloaded``) and the hub's
HB-1 statuses (``Available | Registered | Downloading | Ready | Error``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

LOCAL, QUEUED, DOWNLOADING, FAILED, INTERRUPTED, ABSENT = (
    "local", "queued", "downloading", "failed", "interrupted", "absent")
UNDER_WAY = (QUEUED, DOWNLOADING)

INTERRUPTED_MESSAGE = ("Download interrupted: the process downloading it stopped. The next "
                       "request, or a pull, resumes it.")

# HB-1's words.
AVAILABLE, REGISTERED, HUB_DOWNLOADING, READY, HUB_ERROR = (
    "Available", "Registered", "Downloading", "Ready", "Error")


@dataclass(frozen=True)
class ModelState:
    model_id: str
    phase: str
    downloaded_bytes: int = 0
    total_bytes: int = 0
    local_path: Path | None = None
    error: str | None = None

    @property
    def progress(self) -> float:
        if self.phase == LOCAL:
            return 1.0
        if not self.total_bytes:
            return 0.0
        return round(min(1.0, self.downloaded_bytes / self.total_bytes), 4)

    # --- RS-7: GET /v0/models/{id}/status ----------------------------------------------------

    def status_body(self) -> dict:
        """The RS-7 status: ``local``, ``downloading`` (``queued`` while waiting for the
        node's download slot), ``error`` or ``not_downloaded``."""
        word = {LOCAL: "local", QUEUED: "downloading", DOWNLOADING: "downloading",
                FAILED: "error", INTERRUPTED: "error", ABSENT: "not_downloaded"}[self.phase]
        body = {"model_id": self.model_id, "status": word, "progress": self.progress,
                "downloaded_bytes": self.downloaded_bytes, "total_bytes": self.total_bytes}
        if self.local_path is not None:
            body["local_path"] = str(self.local_path)
        if self.phase == QUEUED:
            body["queued"] = True
        if word == "error":
            body["error_message"] = self.error or INTERRUPTED_MESSAGE
        return body

    # --- HB-1: the hub's statuses ------------------------------------------------------------

    def hub_status(self, registered: bool = False) -> str:
        """The hub's word: a pull waiting for its slot is still Registered, and a model
        nobody asked for is Available."""
        if self.phase == ABSENT:
            return REGISTERED if registered else AVAILABLE
        return {LOCAL: READY, QUEUED: REGISTERED, DOWNLOADING: HUB_DOWNLOADING,
                FAILED: HUB_ERROR, INTERRUPTED: HUB_ERROR}[self.phase]
