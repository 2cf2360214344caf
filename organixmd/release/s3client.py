"""The one adapter to S3: client creation, credentials, and error mapping.

Every S3 client in organixm is made by :func:`open_client`, and every S3 call
runs inside :func:`s3_errors`, which turns botocore, aiohttp and timeout errors
into :mod:`organixmd.base.errors` (chained with ``from``) with a message naming the
bucket, key and action and never a credential.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import aiohttp
from botocore import UNSIGNED
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from organixmd.base.errors import (
    ConfigError,
    SourceChanged,
    SourceDenied,
    SourceError,
    SourceNotFound,
    SourceUnreachable,
)

if TYPE_CHECKING:
    from types_aiobotocore_s3.client import S3Client

_NOT_FOUND = frozenset({"NoSuchKey", "NoSuchBucket", "NoSuchUpload", "NotFound", "404"})
_DENIED = frozenset(
    {
        "AccessDenied",
        "SignatureDoesNotMatch",
        "InvalidAccessKeyId",
        "InvalidToken",
        "ExpiredToken",
        "TokenRefreshRequired",
        "AllAccessDisabled",
        "403",
    }
)
_CHANGED = frozenset({"PreconditionFailed", "412"})
_SERVER_BUSY = frozenset({"InternalError", "ServiceUnavailable", "SlowDown", "500", "503"})

_BUCKET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")
_CREDENTIAL_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


class S3Settings(BaseModel):
    """How to reach S3. Holds no secret itself: credentials are read when a client opens."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: ``None``: AWS's endpoint for the region (or ``AWS_ENDPOINT_URL``).
    endpoint: str | None = None
    region: str = Field(default="us-east-1", min_length=1, max_length=64)
    #: ``env``: botocore's usual chain (environment, profile, instance role);
    #: ``anonymous``: unsigned requests (public buckets); ``file``: ``credentials_file``.
    credentials: Literal["env", "anonymous", "file"] = "env"
    credentials_file: Path | None = None
    connect_timeout: float = Field(default=10.0, gt=0, le=600)
    read_timeout: float = Field(default=60.0, gt=0, le=3600)
    max_connections: int = Field(default=10, ge=1, le=100)

    @model_validator(mode="after")
    def _file_given(self) -> S3Settings:
        if self.credentials == "file" and self.credentials_file is None:
            raise ValueError("credentials 'file' needs credentials_file")
        return self


class FileCredentials(BaseModel):
    """Keys read from a credentials file; ``repr`` and ``str`` never show the secrets."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    access_key_id: SecretStr
    secret_access_key: SecretStr
    session_token: SecretStr | None = None


def load_credentials_file(path: Path) -> FileCredentials:
    """Parse ``KEY=value`` lines (``#`` comments and blank lines allowed).

    Raises :class:`ConfigError` naming the path and line, never a value.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"cannot read the S3 credentials file {path}: {reason}") from exc
    values: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        name, sep, value = stripped.partition("=")
        name = name.strip().removeprefix("export ").strip()
        if not sep or name not in _CREDENTIAL_KEYS:
            raise ConfigError(
                f"S3 credentials file {path}, line {number}: expected one of "
                f"{', '.join(k + '=...' for k in _CREDENTIAL_KEYS)}"
            )
        values[name] = value.strip().strip("'\"")
    missing = [k for k in _CREDENTIAL_KEYS[:2] if not values.get(k)]
    if missing:
        raise ConfigError(f"S3 credentials file {path}: {' and '.join(missing)} missing or empty")
    token = values.get("AWS_SESSION_TOKEN")
    return FileCredentials(
        access_key_id=SecretStr(values["AWS_ACCESS_KEY_ID"]),
        secret_access_key=SecretStr(values["AWS_SECRET_ACCESS_KEY"]),
        session_token=SecretStr(token) if token else None,
    )


@asynccontextmanager
async def open_client(settings: S3Settings) -> AsyncIterator[S3Client]:
    """An aiobotocore S3 client for ``settings``, closed on exit.

    Credentials are resolved now (a rotated credentials file is picked up by the
    next client). Retries are botocore's standard mode; callers bound every call
    with their own timeout as well.
    """
    # Imported here: aiobotocore is slow to import and only S3 users need it.
    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session

    config = AioConfig(
        signature_version=UNSIGNED if settings.credentials == "anonymous" else None,
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
        max_pool_connections=settings.max_connections,
        retries={"mode": "standard", "max_attempts": 3},
        # botocore would CRC32 every downloaded byte on the event loop; the image's
        # chunks are SHA-256-checked against the signed meta anyway.
        response_checksum_validation="when_required",
    )
    kwargs: dict[str, Any] = {"region_name": settings.region, "config": config}
    if settings.endpoint is not None:
        kwargs["endpoint_url"] = settings.endpoint
    if settings.credentials == "file":
        assert settings.credentials_file is not None  # noqa: S101 - enforced by the model
        keys = load_credentials_file(settings.credentials_file)
        kwargs["aws_access_key_id"] = keys.access_key_id.get_secret_value()
        kwargs["aws_secret_access_key"] = keys.secret_access_key.get_secret_value()
        if keys.session_token is not None:
            kwargs["aws_session_token"] = keys.session_token.get_secret_value()
    # Creating the client makes no request: errors surface on the first call,
    # inside the caller's s3_errors block.
    async with get_session().create_client("s3", **kwargs) as client:
        yield client


def error_code(exc: ClientError) -> str:
    """The S3 error code of ``exc`` (``"NoSuchKey"``, or the HTTP status for HEAD/304)."""
    code = exc.response.get("Error", {}).get("Code")
    if code:
        return str(code)
    return str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "unknown"))


def _describe(bucket: str, key: str, action: str) -> str:
    if bucket == "-":
        return action
    return f"{action} s3://{bucket}/{key}" if key else f"{action} s3://{bucket}"


def _client_error(exc: ClientError, where: str, bucket: str) -> SourceError:
    code = error_code(exc)
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if code in _NOT_FOUND or status == 404:
        return SourceNotFound(f"{where}: not found ({code})")
    if code in _DENIED or status == 403:
        # The server's own message is left out on purpose: for signature errors it
        # can quote the access key id and the string that was signed.
        return SourceDenied(
            f"{where}: access denied ({code})",
            hint=f"check the S3 credentials and that they may access bucket {bucket!r}",
        )
    if code in _CHANGED or status == 412:
        return SourceChanged(f"{where}: the object changed ({code})")
    message = str(exc.response.get("Error", {}).get("Message", ""))[:200]
    detail = f"{code}: {message}" if message else code
    if code in _SERVER_BUSY or (isinstance(status, int) and status >= 500):
        return SourceUnreachable(f"{where}: the S3 server failed ({detail})")
    return SourceError(f"{where}: {detail}")


@contextmanager
def s3_errors(bucket: str, key: str, action: str) -> Iterator[None]:
    """Convert errors of the S3 call(s) inside the block into :mod:`organixmd.base.errors`.

    ``NoSuchKey``/``NoSuchBucket``/404 → :class:`SourceNotFound`; ``AccessDenied``,
    signature and key errors, 403 → :class:`SourceDenied`; 412 → :class:`SourceChanged`;
    connection failures, timeouts and 5xx → :class:`SourceUnreachable`; anything
    else from botocore → :class:`SourceError`. The original error is the
    ``__cause__`` (callers that expect e.g. a 304 inspect it with :func:`error_code`).
    Use ``"-"`` as ``bucket`` for calls that concern no bucket.
    """
    where = _describe(bucket, key, action)
    try:
        yield
    except ClientError as exc:
        raise _client_error(exc, where, bucket) from exc
    except (NoCredentialsError, PartialCredentialsError) as exc:
        raise SourceDenied(
            f"{where}: no S3 credentials found",
            hint="set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, an AWS profile, or a "
            "credentials file",
        ) from exc
    except (BotoConnectionError, ReadTimeoutError, aiohttp.ClientError) as exc:
        raise SourceUnreachable(f"{where}: {type(exc).__name__}: {exc}") from exc
    except TimeoutError as exc:
        raise SourceUnreachable(f"{where}: timed out") from exc
    except BotoCoreError as exc:
        raise SourceError(f"{where}: {type(exc).__name__}: {exc}") from exc


def parse_s3_url(url: str, *, require_key: bool = True) -> tuple[str, str]:
    """Split ``s3://bucket/a/b`` into ``("bucket", "a/b")``.

    Raises :class:`ConfigError` for another scheme, a bad bucket name, or (with
    ``require_key``) no object name.
    """
    scheme, sep, rest = url.partition("://")
    if scheme != "s3" or not sep:
        raise ConfigError(f"{url!r} is not an s3:// URL (expected s3://bucket/path/name)")
    bucket, _, key = rest.partition("/")
    if not _BUCKET_RE.match(bucket):
        raise ConfigError(f"{url!r}: {bucket!r} is not a valid bucket name")
    if require_key and not key:
        raise ConfigError(f"{url!r}: no object name after the bucket (s3://bucket/path/name)")
    if "//" in key or key.startswith("/"):
        raise ConfigError(f"{url!r}: the object name has an empty path component")
    return bucket, key
