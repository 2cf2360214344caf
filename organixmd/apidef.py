"""The control API's one definition, shared by the daemon and ``organixctl``.

The daemon's control socket (``organixmd.service.api``) builds these documents,
``organixctl`` reads them, and the Prometheus metrics render from them, in the way
one API definition is shared by a server and its client. Only the standard library
is used (enums, ``Literal`` and ``TypedDict``; not :mod:`dataclasses`, whose import
alone would cost ``organixctl status`` about 8 ms of start-up).

Owns: the API version, the route paths, the verdict outcomes and codes (the closed set
a check can end in, with the outcomes each code can have; docs/operations.md lists
them and ``tests/test_apidef.py`` keeps that list equal to this one), and the JSON
documents of ``/v1/...`` exactly as they are served (``tests/test_apidef.py`` compares
a real daemon's answers with them, key for key).

The documents describe the decoded JSON: times are ISO 8601 strings, and an
``Outcome`` field holds a plain string equal to its member (compare with ``==`` or
``in``, never ``is``).

May import: the standard library only.
"""

# No ``from __future__ import annotations`` here: Python 3.11 does not see
# ``NotRequired`` in a string annotation, and the tests read ``__required_keys__``.

from enum import StrEnum
from typing import Literal, NotRequired, TypedDict

API_VERSION = 1


class Route(StrEnum):
    """The paths the control socket serves (docs/operations.md, "The control socket API")."""

    STATUS = "/v1/status"
    HISTORY = "/v1/history"
    EVENTS = "/v1/events"
    CHECK = "/v1/check"
    UPDATE = "/v1/update"
    CANCEL = "/v1/cancel"
    MARK_GOOD = "/v1/mark-good"
    MARK_BAD = "/v1/mark-bad"
    ROLLBACK = "/v1/rollback"
    METRICS = "/metrics"


class Outcome(StrEnum):
    """How a check ended, in one word."""

    UP_TO_DATE = "up-to-date"
    AVAILABLE = "available"
    INSTALLING = "installing"
    STAGED = "staged"
    BLOCKED = "blocked"
    ERROR = "error"


class VerdictCode(StrEnum):
    """Why a check ended as it did: the stable code of every verdict.

    The first group is decided by policy (``organixmd.host.policy``); the rest are the
    codes of the error tree (``organixmd.base.errors``), which end a check that failed.
    """

    # Decided by policy.
    UP_TO_DATE = "up-to-date"
    UPDATE_AVAILABLE = "update-available"
    WAITING_FOR_COMMIT = "waiting-for-commit"
    ROLLOUT_EXCLUDED = "rollout-excluded"
    STAGED = "staged"
    VERIFIED = "verified"
    DOWNGRADE_REFUSED = "downgrade-refused"
    RELEASE_FAILED_BEFORE = "release-failed-before"
    BOOTED_SLOT_UNKNOWN = "booted-slot-unknown"
    BOOT_ENV_DISAGREES = "boot-env-disagrees"
    # Raised by a part and ending the check (the error tree's codes).
    SLOT_UNUSABLE = "slot-unusable"
    POLICY_REFUSED = "policy-refused"
    SIGNATURE_INVALID = "signature-invalid"
    SOURCE_UNREACHABLE = "source-unreachable"
    SOURCE_NOT_FOUND = "source-not-found"
    SOURCE_DENIED = "source-denied"
    SOURCE_CHANGED = "source-changed"
    SOURCE_ERROR = "source-error"
    META_INVALID = "meta-invalid"
    FORMAT_INVALID = "format-invalid"
    IMAGE_INVALID = "image-invalid"
    CHUNK_MISMATCH = "chunk-mismatch"
    IMAGE_MISMATCH = "image-mismatch"
    BOOT_CONTROL_ERROR = "boot-control-error"
    STATE_ERROR = "state-error"
    CANCELLED = "cancelled"
    INTERNAL_ERROR = "internal-error"


_BLOCKED = frozenset({Outcome.BLOCKED})
_ERROR = frozenset({Outcome.ERROR})

#: The outcome(s) a verdict with each code can have (the "outcome" column of the table
#: in docs/operations.md, "Why did my host not update?"). A refusal by policy or trust
#: blocks; any other error of the tree ends the check in ``error``, and is retried.
VERDICT_OUTCOMES: dict[VerdictCode, frozenset[Outcome]] = {
    VerdictCode.UP_TO_DATE: frozenset({Outcome.UP_TO_DATE}),
    VerdictCode.UPDATE_AVAILABLE: frozenset({Outcome.AVAILABLE}),
    VerdictCode.WAITING_FOR_COMMIT: frozenset({Outcome.AVAILABLE}),
    VerdictCode.ROLLOUT_EXCLUDED: frozenset({Outcome.AVAILABLE}),
    VerdictCode.STAGED: frozenset({Outcome.STAGED}),
    VerdictCode.VERIFIED: frozenset({Outcome.STAGED}),
    VerdictCode.DOWNGRADE_REFUSED: _BLOCKED,
    VerdictCode.RELEASE_FAILED_BEFORE: _BLOCKED,
    VerdictCode.BOOTED_SLOT_UNKNOWN: _BLOCKED,
    VerdictCode.BOOT_ENV_DISAGREES: _BLOCKED,
    # Blocked when the policy finds the target slot unusable before installing; an
    # error when writing the slot fails during the install.
    VerdictCode.SLOT_UNUSABLE: frozenset({Outcome.BLOCKED, Outcome.ERROR}),
    VerdictCode.POLICY_REFUSED: _BLOCKED,
    VerdictCode.SIGNATURE_INVALID: _BLOCKED,
    VerdictCode.SOURCE_UNREACHABLE: _ERROR,
    VerdictCode.SOURCE_NOT_FOUND: _ERROR,
    VerdictCode.SOURCE_DENIED: _ERROR,
    VerdictCode.SOURCE_CHANGED: _ERROR,
    VerdictCode.SOURCE_ERROR: _ERROR,
    VerdictCode.META_INVALID: _ERROR,
    VerdictCode.FORMAT_INVALID: _ERROR,
    VerdictCode.IMAGE_INVALID: _ERROR,
    VerdictCode.CHUNK_MISMATCH: _ERROR,
    VerdictCode.IMAGE_MISMATCH: _ERROR,
    VerdictCode.BOOT_CONTROL_ERROR: _ERROR,
    VerdictCode.STATE_ERROR: _ERROR,
    VerdictCode.CANCELLED: _ERROR,
    VerdictCode.INTERNAL_ERROR: _ERROR,
}

# ---------------------------------------------------------------------------- values

Slot = Literal["a", "b"]
#: The slots in the order the status document lists them.
SLOT_NAMES: tuple[Slot, Slot] = ("a", "b")
#: GRUB's state of a slot.
GrubState = Literal["good", "trial", "bad"]
#: What the daemon wrote to a slot.
SlotStatus = Literal["writing", "verified", "staged", "installed"]
#: Which copy of the GRUB environment was read.
EnvCopy = Literal["primary", "backup"]


class ReleaseDoc(TypedDict):
    """A release, as named in status, history and verdicts."""

    version: str
    serial: int
    uuid: str
    sha256: str
    size: int
    legacy: bool


class VerdictDoc(TypedDict):
    """How one check ended."""

    outcome: Outcome
    #: A :class:`VerdictCode` (a state file written by an older daemon may hold a code
    #: that is no longer one).
    code: str
    message: str
    release: ReleaseDoc | None
    #: When the check ended (``...Z``).
    at: str


# ---------------------------------------------------------------------------- GET /v1/status


class DaemonDoc(TypedDict):
    version: str
    pid: int
    started: str
    #: False while the boot-time check still runs.
    ready: bool


class BootDoc(TypedDict):
    """Which slot booted and why (GRUB's record, read at start-up)."""

    #: ``None`` when the kernel command line names no slot.
    booted: Slot | None
    #: ``committed``, ``trial``, ``fallback-...``, ``default-env-unusable``, ``last-resort``.
    reason: str | None
    trial_try: int | None
    on_trial: bool
    explanation: str
    next_slot: Slot | None
    env_copy: EnvCopy | None


class SlotDoc(TypedDict):
    device: str
    state: GrubState | None
    tries_left: int | None
    status: SlotStatus | None
    release: ReleaseDoc | None


class ProgressCounts(TypedDict):
    """How far the running install is: image bytes written and verified, rate in
    bytes/s, compressed bytes fetched, image bytes copied from this host's own slots."""

    bytes_done: int
    bytes_total: int
    rate: int
    downloaded: int
    reused: int


class ProgressDoc(ProgressCounts):
    """The running install in the status, with its ETA in seconds."""

    eta: float | None


class ErrorDoc(TypedDict):
    """The last failure (an error of the tree in organixmd.base.errors)."""

    code: str
    message: str
    hint: str


class StatusDoc(TypedDict):
    """``GET /v1/status``."""

    api: int
    daemon: DaemonDoc
    source: str
    boot: BootDoc
    slots: dict[Slot, SlotDoc]
    #: ``idle``, ``checking``, ``downloading``, ``verifying``, ``staged``,
    #: ``waiting-reboot``, ``error``.
    phase: str
    #: The release the running (or last) check is about.
    current: ReleaseDoc | None
    progress: ProgressDoc | None
    last_check: str | None
    next_check: str | None
    verdict: VerdictDoc | None
    last_error: ErrorDoc | None
    #: Why a reboot is wanted but not done (policy), or ``None``.
    reboot_pending: str | None
    failed_releases: int


# ---------------------------------------------------------------------------- GET /v1/history


class HistoryEntryDoc(TypedDict):
    at: str
    #: ``identified``, ``installed``, ``staged``, ``committed``, ``fell-back``, ...
    event: str
    slot: Slot | None
    release: ReleaseDoc | None
    detail: str


class FailedDoc(TypedDict):
    """A release that failed here and is not installed again."""

    release: ReleaseDoc
    reason: str
    at: str


class HistoryDoc(TypedDict):
    """``GET /v1/history``."""

    history: list[HistoryEntryDoc]
    failed: list[FailedDoc]


# ---------------------------------------------------------------------------- GET /v1/events
# One JSON object per line; ``event`` names the kind, ``at`` is when it was published.


class StatusEvent(StatusDoc):
    """The first event of every stream: the whole status (it has no ``at``)."""

    event: Literal["status"]


class PhaseEvent(TypedDict):
    event: Literal["phase"]
    at: str
    phase: str


class ProgressEvent(ProgressCounts):
    event: Literal["progress"]
    at: str


class VerdictEvent(VerdictDoc):
    """A check ended (``at`` is the verdict's time)."""

    event: Literal["verdict"]


class StoppingEvent(TypedDict):
    """The last event: the daemon stops and the stream ends."""

    event: Literal["stopping"]
    at: str


Event = StatusEvent | PhaseEvent | ProgressEvent | VerdictEvent | StoppingEvent
EventKind = Literal["status", "phase", "progress", "verdict", "stopping"]

# ---------------------------------------------------------------------------- POST answers


class CheckAnswer(TypedDict):
    """``POST /v1/check``, and ``POST /v1/update`` with ``"wait": true``."""

    verdict: VerdictDoc


class UpdateStarted(TypedDict):
    """``POST /v1/update`` (202): the check and install run on in the daemon."""

    started: Literal[True]


class CancelAnswer(TypedDict):
    """``POST /v1/cancel``: whether anything was running."""

    cancelled: bool


class MarkGoodAnswer(TypedDict):
    committed: Slot | None
    next_slot: Slot | None


class MarkBadAnswer(TypedDict):
    marked_bad: Slot | None
    next_slot: Slot | None
    rebooting: bool


class RollbackAnswer(TypedDict):
    next_slot: Slot | None


# ---------------------------------------------------------------------------- errors


class ProblemDoc(TypedDict):
    """An RFC 9457 ``application/problem+json`` answer; ``code`` is stable."""

    #: ``urn:organixm:error:<code>``.
    type: str
    title: str
    status: int
    code: str
    detail: str
    hint: NotRequired[str]
