"""The one exception tree of organixm.

Every error an operator can see derives from :class:`OrganixmError` and carries a
stable ``code`` (for logs, the control socket's problem+json and scripts), an
HTTP status for the control socket, and a sentence that says what happened and
what to do next. Errors of outside libraries (botocore, aiohttp, OSError, pydantic)
are converted where they enter our code and chained with ``raise ... from exc``.
Raising never logs: whoever decides the outcome logs once.

    OrganixmError
    ├── ConfigError            bad configuration file or command-line value
    ├── FormatError            a release does not follow docs/format.md
    │   ├── MetaError          the .meta descriptor is malformed or out of range
    │   └── ImageError         the image stream is malformed
    │       ├── ChunkMismatch  a chunk's SHA-256 differs from the meta
    │       └── ImageMismatch  the whole image's SHA-256 or size differs
    ├── SignatureError         missing, malformed or invalid minisign signature
    ├── SourceError            the release source (S3, HTTP, file) failed
    │   ├── SourceUnreachable  network or server down
    │   ├── SourceNotFound     object or bucket missing
    │   ├── SourceDenied       credentials refused
    │   └── SourceChanged      object replaced while resuming
    ├── SlotError              the target slot cannot be written
    ├── BootError              GRUB environment cannot be read or written
    ├── RebootError            the reboot command failed or did not return
    ├── StateError             state file unreadable or unwritable
    ├── PolicyError            a release is refused by policy (downgrade, failed before)
    ├── Busy                   another operation is running (HTTP 409)
    ├── Cancelled              an operation was cancelled by an admin
    ├── BadRequest             a control-socket request is malformed (HTTP 400)
    ├── PermissionDenied       a control-socket peer may not change anything (HTTP 403)
    ├── KeyFileError           a minisign key cannot be read, decrypted or written
    └── PublishError           a release cannot be staged or written to its target
"""

from __future__ import annotations

from typing import ClassVar


class OrganixmError(Exception):
    """Base of every error organixm raises on purpose."""

    code: ClassVar[str] = "organixm-error"
    status: ClassVar[int] = 500
    hint: ClassVar[str] = ""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.instance_hint = hint

    @property
    def advice(self) -> str:
        """What the operator should do next, if anything is known."""
        return self.instance_hint if self.instance_hint is not None else self.hint

    def __str__(self) -> str:
        advice = self.advice
        return f"{self.message} ({advice})" if advice else self.message


class InternalError(OrganixmError):
    """A bug caught at the edge of a check: the traceback is in the journal."""

    code = "internal-error"
    hint = "a bug: the details are in the journal (journalctl -u organixm-update); report it"


class ConfigError(OrganixmError):
    code = "config-invalid"
    status = 400
    hint = "fix the named setting and start again"


class FormatError(OrganixmError):
    code = "format-invalid"
    status = 422


class MetaError(FormatError):
    code = "meta-invalid"
    hint = "republish the release with a current publisher (see docs/format.md)"


class ImageError(FormatError):
    code = "image-invalid"
    hint = "republish the release; the image object does not match its meta"


class ChunkMismatch(ImageError):
    code = "chunk-mismatch"


class ImageMismatch(ImageError):
    code = "image-mismatch"


class SignatureError(OrganixmError):
    code = "signature-invalid"
    status = 422
    hint = "sign the meta with a key listed in trusted public keys"


class SourceError(OrganixmError):
    code = "source-error"
    status = 502


class SourceUnreachable(SourceError):
    code = "source-unreachable"
    hint = "check the network and the release URL; the daemon retries with backoff"


class SourceNotFound(SourceError):
    code = "source-not-found"
    hint = "check the release URL, bucket and object name; has the release been published?"


class SourceDenied(SourceError):
    code = "source-denied"
    hint = "check the credentials file and the bucket policy"


class SourceChanged(SourceError):
    code = "source-changed"
    hint = "the object was replaced during a resumed download; the next check starts over"


class SlotError(OrganixmError):
    code = "slot-unusable"
    status = 409


class BootError(OrganixmError):
    code = "boot-control-error"
    hint = "check the grubenv path and that the boot partition is mounted read-write"


class RebootError(OrganixmError):
    code = "reboot-failed"
    hint = "check boot.reboot_command; the reboot stays pending and the admin may reboot by hand"


class StateError(OrganixmError):
    code = "state-error"
    hint = "check the state directory's permissions and free space"


class PolicyError(OrganixmError):
    code = "policy-refused"
    status = 409


class Busy(OrganixmError):
    code = "busy"
    status = 409
    hint = "wait for the running operation to finish, or cancel it"


class Cancelled(OrganixmError):
    code = "cancelled"
    status = 409


class BadRequest(OrganixmError):
    code = "bad-request"
    status = 400
    hint = "see docs/operations.md for the control socket's requests and their JSON bodies"


class PermissionDenied(OrganixmError):
    code = "permission-denied"
    status = 403


class KeyFileError(OrganixmError):
    code = "key-invalid"
    status = 400
    hint = (
        "check the key file or public key line (`organixctl keygen` and `minisign -G` write them)"
    )


class PublishError(OrganixmError):
    code = "publish-failed"
    hint = "check free space and permissions where the image is staged and at the target"
