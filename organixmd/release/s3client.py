"""The one adapter to S3: addressing, credentials, request signing and error mapping.

The daemon reads S3 as plain HTTP GETs (``organixmd/release/sources.py``, ``S3Source``,
over HttpSource's machinery): :func:`object_http_url` addresses an object as
botocore does, :class:`RequestSigner` signs each GET with SigV4
(``botocore.auth.S3SigV4Auth`` on a bare ``AWSRequest``) and :func:`s3_error`
maps an S3 error answer. No botocore client is made there, so neither aiobotocore
nor botocore's S3 service model and endpoint rules are loaded (~23 MiB of RSS).

The publisher uploads through an aiobotocore client made by :func:`open_client`;
every call of it runs inside :func:`s3_errors`, which turns botocore, aiohttp and
timeout errors into :mod:`organixmd.base.errors` (chained with ``from``).

Every message names the bucket, key and action and never a credential.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import quote

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
    from botocore.exceptions import ClientError
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

_NO_CREDENTIALS = (
    "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, an AWS profile, or a credentials file"
)

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
    # Imported here: aiobotocore is slow to import and only the publisher needs it.
    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session
    from botocore import UNSIGNED

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


def _error_code(exc: ClientError) -> str:
    """The S3 error code of ``exc`` (``"NoSuchKey"``, or the HTTP status for HEAD/304)."""
    code = exc.response.get("Error", {}).get("Code")
    if code:
        return str(code)
    return str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "unknown"))


def _describe(bucket: str, key: str, action: str) -> str:
    if bucket == "-":
        return action
    return f"{action} s3://{bucket}/{key}" if key else f"{action} s3://{bucket}"


def s3_error(
    code: str, status: int | None, message: str, where: str, bucket: str, region_hint: str = ""
) -> SourceError:
    """The error for an S3 answer with error ``code`` (the HTTP status when the answer
    had none), HTTP ``status`` and the server's ``message``, about ``where`` (the action
    and object). The server's message is kept only where it cannot quote a credential."""
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
    message = message[:200]
    detail = f"{code}: {message}" if message else code
    if code in _SERVER_BUSY or (status is not None and status >= 500):
        return SourceUnreachable(f"{where}: the S3 server failed ({detail})")
    if region_hint:
        return SourceError(
            f"{where}: {detail}",
            hint=f'the bucket is in region {region_hint}: set source.s3_region = "{region_hint}"',
        )
    return SourceError(f"{where}: {detail}")


def _client_error(exc: ClientError, where: str, bucket: str) -> SourceError:
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    message = str(exc.response.get("Error", {}).get("Message", ""))
    return s3_error(
        _error_code(exc), status if isinstance(status, int) else None, message, where, bucket
    )


@contextmanager
def s3_errors(bucket: str, key: str, action: str) -> Iterator[None]:
    """Convert errors of the S3 call(s) inside the block into :mod:`organixmd.base.errors`.

    ``NoSuchKey``/``NoSuchBucket``/404 → :class:`SourceNotFound`; ``AccessDenied``,
    signature and key errors, 403 → :class:`SourceDenied`; 412 → :class:`SourceChanged`;
    connection failures, timeouts and 5xx → :class:`SourceUnreachable`; anything
    else from botocore → :class:`SourceError`. The original error is the
    ``__cause__``. Use ``"-"`` as ``bucket`` for calls that concern no bucket.
    """
    # Imported here, with botocore: a publish to a local directory loads neither.
    import aiohttp
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

    where = _describe(bucket, key, action)
    try:
        yield
    except ClientError as exc:
        raise _client_error(exc, where, bucket) from exc
    except (NoCredentialsError, PartialCredentialsError) as exc:
        raise SourceDenied(f"{where}: no S3 credentials found", hint=_NO_CREDENTIALS) from exc
    except (BotoConnectionError, ReadTimeoutError, aiohttp.ClientError) as exc:
        raise SourceUnreachable(f"{where}: {type(exc).__name__}: {exc}") from exc
    except TimeoutError as exc:
        raise SourceUnreachable(f"{where}: timed out") from exc
    except BotoCoreError as exc:
        raise SourceError(f"{where}: {type(exc).__name__}: {exc}") from exc


# ------------------------------------------------------------- the daemon's signed GETs

#: A bucket name that is one DNS label: addressed virtual-hosted on AWS, as botocore does.
_VIRTUAL_HOST_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$")
_IPV4_RE = re.compile(r"^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$")
#: The fields of an S3 error answer (``<Error><Code>..</Code><Message>..</Message>``):
#: matched, not parsed, so a hostile answer cannot expand entities.
_ERROR_FIELDS = {
    name: re.compile(rf"<{name}>([^<]{{1,512}})</{name}>".encode())
    for name in ("Code", "Message", "Region")
}
_CODE_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_REGION_RE = re.compile(r"^[a-z0-9-]{1,64}$")


def configured_endpoint(endpoint: str | None) -> str | None:
    """Where S3 requests go: ``source.s3_endpoint``, else ``AWS_ENDPOINT_URL_S3`` or
    ``AWS_ENDPOINT_URL`` from the environment (as botocore reads them, unless
    ``AWS_IGNORE_CONFIGURED_ENDPOINT_URLS=true``), else ``None``: AWS itself."""
    if endpoint is not None:
        return endpoint
    if os.environ.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").lower() == "true":
        return None
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def object_http_url(endpoint: str | None, region: str, bucket: str, key: str) -> str:
    """The HTTP URL of ``key`` in ``bucket``, addressed as botocore's S3 client addresses
    it: path-style (``ENDPOINT/bucket/key``) against a configured endpoint; against AWS
    virtual-hosted (``https://bucket.s3.REGION.amazonaws.com/key``, ``s3.amazonaws.com``
    in us-east-1) when the bucket name is one DNS label, else path-style. The key is
    percent-encoded as botocore encodes it (``/`` and ``~`` kept); the URL is sent as is."""
    path = quote(key, safe="/~")
    if endpoint is not None:
        return f"{endpoint.rstrip('/')}/{quote(bucket, safe='')}/{path}"
    suffix = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
    host = f"s3.{suffix}" if region == "us-east-1" else f"s3.{region}.{suffix}"
    if _VIRTUAL_HOST_BUCKET_RE.match(bucket) and not _IPV4_RE.match(bucket):
        return f"https://{bucket}.{host}/{path}"
    return f"https://{host}/{quote(bucket, safe='')}/{path}"


def error_answer(body: bytes, status: int, headers: Any) -> tuple[str, str, str]:
    """The error code (the HTTP status when there is none), message and the bucket's
    region if the answer names one, of an S3 error answer."""
    fields = {}
    for name, pattern in _ERROR_FIELDS.items():
        found = pattern.search(body)
        fields[name] = found.group(1).decode("utf-8", "replace").strip() if found else ""
    code = fields["Code"] if _CODE_RE.match(fields["Code"]) else str(status)
    region = str(headers.get("x-amz-bucket-region") or fields["Region"])
    return code, fields["Message"], region if _REGION_RE.match(region) else ""


class _Keys:
    """Keys from a credentials file in the shape botocore's signer reads."""

    __slots__ = ("access_key", "secret_key", "token")

    def __init__(self, keys: FileCredentials) -> None:
        self.access_key = keys.access_key_id.get_secret_value()
        self.secret_key = keys.secret_access_key.get_secret_value()
        self.token = None if keys.session_token is None else keys.session_token.get_secret_value()

    def __repr__(self) -> str:
        return "_Keys(...)"


def _chain_credentials() -> Any:
    """botocore's default credential chain (no service model is loaded for it).

    Its first link, the environment, is tried alone first: most hosts stop there, and
    the rest of the chain needs ``botocore.session`` and the client machinery it imports
    (~3 MiB). Blocking (files, instance metadata): run in a thread.
    """
    from botocore.credentials import EnvProvider

    found = EnvProvider().load()
    if found is not None:
        return found
    import botocore.session

    return botocore.session.get_session().get_credentials()


class RequestSigner:
    """Signs the daemon's S3 GETs with SigV4 (``botocore.auth.S3SigV4Auth`` on a bare
    ``AWSRequest``): no botocore client, so no service model or endpoint rules.

    Credentials are resolved on the first request, as a botocore client resolved them
    when it was made: ``env`` by botocore's default chain, ``file`` from
    ``credentials_file`` (a rotated file is picked up by the next source), ``anonymous``
    not at all (requests go unsigned). Refreshable credentials (an instance role,
    ``AWS_CREDENTIAL_EXPIRATION``) are refreshed as each request is signed.
    """

    def __init__(
        self,
        credentials: Literal["env", "anonymous", "file"],
        credentials_file: Path | None,
        region: str,
    ) -> None:
        self._mode = credentials
        self._file = credentials_file
        self._region = region
        self._credentials: Any = None

    async def sign(self, url: str, headers: dict[str, str], where: str) -> dict[str, str]:
        """``headers`` with the signature of a GET of ``url`` added; ``where`` (the action
        and object) names a failure to find credentials."""
        if self._mode == "anonymous":
            return headers
        keys = await self._frozen(where)
        from botocore.auth import S3SigV4Auth
        from botocore.awsrequest import AWSRequest

        request = AWSRequest(method="GET", url=url, headers=headers)
        S3SigV4Auth(keys, "s3", self._region).add_auth(request)
        return dict(request.headers.items())

    async def _frozen(self, where: str) -> Any:
        if self._credentials is None:
            self._credentials = await self._resolve(where)
        credentials = self._credentials
        if isinstance(credentials, _Keys):
            return credentials
        refresh_needed = getattr(credentials, "refresh_needed", None)
        if refresh_needed is not None and refresh_needed():
            # A refresh asks the instance metadata service or STS: not on the event loop.
            return await self._guarded(credentials.get_frozen_credentials, where)
        return credentials.get_frozen_credentials()

    async def _resolve(self, where: str) -> Any:
        if self._mode == "file":
            assert self._file is not None  # noqa: S101 - enforced by the configuration model
            return _Keys(load_credentials_file(self._file))
        found = await self._guarded(_chain_credentials, where)
        if found is None:
            raise SourceDenied(f"{where}: no S3 credentials found", hint=_NO_CREDENTIALS)
        return found

    @staticmethod
    async def _guarded(call: Any, where: str) -> Any:
        """``call()`` in a thread, botocore's errors converted."""
        from botocore.exceptions import (
            BotoCoreError,
            NoCredentialsError,
            PartialCredentialsError,
        )

        try:
            return await asyncio.to_thread(call)
        except (NoCredentialsError, PartialCredentialsError) as exc:
            raise SourceDenied(
                f"{where}: no S3 credentials found ({type(exc).__name__})", hint=_NO_CREDENTIALS
            ) from exc
        except BotoCoreError as exc:
            raise SourceError(
                f"{where}: the S3 credentials could not be read: {type(exc).__name__}: "
                f"{str(exc)[:200]}"
            ) from exc


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
