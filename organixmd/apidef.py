"""The control API's one definition, shared by the daemon and ``organixctl``.

The daemon's control socket (``organixmd.service.api``) builds these documents,
``organixctl`` reads them, and the Prometheus metrics render from them, in the way
one API definition is shared by a server and its client. Only the standard library
is used (enums and ``TypedDict``), so the admin's commands stay fast to start.

Owns: the API version, the verdict outcomes and codes (the closed set a check can end
in; docs/operations.md lists them and ``tests/test_apidef.py`` keeps that list equal
to this one), and the JSON documents of ``/v1/...``.

May import: the standard library only.
"""

from __future__ import annotations

from enum import StrEnum

API_VERSION = 1


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
