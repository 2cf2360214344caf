"""The daemon's persistent state: what each slot holds, install progress, failed
releases, the last verdict and a bounded history.

One JSON file in the state directory, written atomically (temp file, fsync,
rename, fsync of the directory) so a power cut leaves either the old or the new
state, never a torn one. An unreadable state file is moved aside, not silently
overwritten, and the daemon starts from what the slots and GRUB say.
"""

from __future__ import annotations

import asyncio
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from organixmd.apidef import Outcome
from organixmd.base.errors import StateError
from organixmd.base.fsutil import write_atomic
from organixmd.base.logsetup import get_logger
from organixmd.base.slotname import SlotName

STATE_SCHEMA = "organixm.state/1"
HISTORY_LIMIT = 200


def utcnow() -> datetime:
    return datetime.now(UTC)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ReleaseRef(_Model):
    """Enough of a release to name it in status, history and policy decisions."""

    version: str
    serial: int
    uuid: str
    sha256: str
    size: int
    legacy: bool = False


class SlotRecord(_Model):
    release: ReleaseRef
    #: ``written`` while data is being put in place, ``verified`` once read back,
    #: ``staged`` once GRUB was pointed at it.
    status: Literal["writing", "verified", "staged", "installed"]
    at: datetime


class Checkpoint(_Model):
    """A resumable install: chunks below ``chunks_done`` are on the device and verified."""

    slot: SlotName
    release: ReleaseRef
    image_url: str
    etag: str | None = None
    chunk_size: int
    chunks_done: int = 0
    started: datetime


class FailedRelease(_Model):
    release: ReleaseRef
    reason: str
    at: datetime


class Verdict(_Model):
    """How one check ended: the answer to "why did (or didn't) this host update?"."""

    outcome: Outcome
    #: Stable machine code, one of :class:`organixmd.apidef.VerdictCode` (e.g.
    #: ``downgrade-refused``, ``signature-invalid``).
    code: str
    message: str
    release: ReleaseRef | None = None
    at: datetime


class HistoryEntry(_Model):
    at: datetime
    event: str
    slot: SlotName | None = None
    release: ReleaseRef | None = None
    detail: str = ""


class State(_Model):
    schema_: Literal["organixm.state/1"] = Field(default="organixm.state/1", alias="schema")
    slots: dict[SlotName, SlotRecord] = Field(default_factory=dict)
    progress: Checkpoint | None = None
    failed: list[FailedRelease] = Field(default_factory=list)
    meta_etag: str | None = None
    last_check: datetime | None = None
    last_verdict: Verdict | None = None
    history: list[HistoryEntry] = Field(default_factory=list)

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    def record(self, event: str, **fields: Any) -> HistoryEntry:
        entry = HistoryEntry(at=utcnow(), event=event, **fields)
        self.history.append(entry)
        del self.history[:-HISTORY_LIMIT]
        return entry

    def has_failed(self, release: ReleaseRef) -> FailedRelease | None:
        for failed in self.failed:
            if failed.release.uuid == release.uuid and failed.release.sha256 == release.sha256:
                return failed
        return None


class StateStore:
    """Loads and atomically writes :class:`State`. ``write`` blocks: call it in a thread."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / "state.json"

    def load(self) -> tuple[State, str | None]:
        """Return the state and, if the file was unusable, a note on what was done."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return State(), None
        except OSError as exc:
            raise StateError(f"cannot read state file {self.path}: {exc.strerror}") from exc
        try:
            return State.model_validate(json.loads(raw)), None
        except (ValueError, ValidationError) as exc:
            aside = self.path.with_name(f"state.json.unreadable-{int(utcnow().timestamp())}")
            try:
                os.replace(self.path, aside)
                kept = f"moved to {aside}"
            except OSError as move_exc:
                kept = (
                    f"could not be moved to {aside} ({move_exc.strerror}) and is replaced at "
                    "the next write"
                )
            return State(), (
                f"state file {self.path} was unreadable ({type(exc).__name__}); {kept}; "
                "started fresh from what the slots and GRUB say"
            )

    @staticmethod
    def encode(state: State) -> bytes:
        return state.model_dump_json(by_alias=True, indent=1).encode()

    def write(self, data: bytes) -> None:
        """Write encoded state atomically and durably. Blocking; runs in a worker thread."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path, data, 0o600)
        except OSError as exc:
            raise StateError(f"cannot write state file {self.path}: {exc.strerror}") from exc


class StateKeeper:
    """The one holder of this host's :class:`State`, shared by the engine and boot
    assessment: they change ``state`` in memory and ask the keeper to write it.

    Writes are serialised (one at a time, each a whole encoded copy) and run in a
    worker thread.
    """

    def __init__(self, store: StateStore, state: State) -> None:
        self.store = store
        self.state = state
        self._lock = asyncio.Lock()
        self._log = get_logger("organixmd.state")

    async def persist(self) -> None:
        """Write the state file. Raises StateError."""
        async with self._lock:
            data = self.store.encode(self.state)
            await asyncio.to_thread(self.store.write, data)

    async def try_persist(self) -> StateError | None:
        """Write the state file; a failure (say a full file system) is logged and returned.

        The state stays in memory and the next write carries it; the old file stays
        intact (the write is atomic). For callers that must go on without it.
        """
        try:
            await self.persist()
        except StateError as exc:
            self._log.error("state_unwritable", code=exc.code, error=str(exc))
            return exc
        return None

    async def record_failed(
        self, slot: SlotName, reason: str, *, event: str | None = "fell-back", persist: bool = True
    ) -> FailedRelease | None:
        """Remember the release in ``slot`` as failed so it is never installed again.

        With ``persist=False`` the caller writes the state file itself.
        """
        record = self.state.slots.get(slot)
        if record is None:
            return None
        failed = FailedRelease(release=record.release, reason=reason, at=utcnow())
        if self.state.has_failed(record.release) is None:
            self.state.failed.append(failed)
        if event is not None:
            self.state.record(event, slot=slot, release=record.release, detail=reason)
        if persist:
            await self.persist()
        return failed
