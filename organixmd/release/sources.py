"""Where releases come from: S3, HTTP(S) and local files behind one small interface.

Each source converts its library's errors into :mod:`organixmd.base.errors` where they
enter, naming the URL (never credentials). Sizes are bounded before memory is
spent: a meta over :data:`~organixmd.release.meta.MAX_META_BYTES` or a signature over
:data:`MAX_SIGNATURE_BYTES` is refused without being read in full.

S3 is read as plain HTTP: :class:`S3Source` is an :class:`HttpSource` whose GETs are
addressed and SigV4-signed by :mod:`organixmd.release.s3client` (no botocore client).

Layout (docs/format.md): the meta is at ``URL.meta``, its signature at
``URL.meta.minisig``; the image object named in the meta is relative to the
meta's directory (for the seed format the image is at ``URL`` itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, NoReturn, Protocol, Self
from urllib.parse import urljoin, urlsplit

import aiohttp
import yarl

from organixmd.base.errors import (
    SourceChanged,
    SourceDenied,
    SourceError,
    SourceNotFound,
    SourceUnreachable,
)
from organixmd.base.objectnames import meta_name, signature_name
from organixmd.release.meta import MAX_META_BYTES, Release

if TYPE_CHECKING:
    from organixmd.base.config import SourceConfig

MAX_SIGNATURE_BYTES = 64 * 1024
#: An S3 error answer is read up to this size for its error code.
MAX_ERROR_BYTES = 64 * 1024
#: Tries of one S3 request that found no server or a failing one (5xx), as botocore's
#: standard retry mode; all within ``source.timeout``.
S3_ATTEMPTS = 3
S3_RETRY_STATUSES = frozenset({500, 502, 503, 504})
READ_SIZE = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Fetched:
    """A small object read whole: the meta or its signature."""

    data: bytes
    etag: str | None


class ByteStream(Protocol):
    """An open image download. ``read`` returns at most ``n`` bytes, ``b""`` at the end."""

    etag: str | None

    async def read(self, n: int) -> bytes: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True)
class LowSpeed:
    """A download averaging under ``limit`` bytes/s over ``seconds`` of waiting is broken."""

    limit: int
    seconds: float


class LowSpeedGuard:
    """Ends a download that trickles in (curl's ``--speed-limit``/``--speed-time``).

    A read timeout only catches a stall; bytes that keep coming, slowly, would hold the
    check for as long as the image takes at that rate. Only the time spent waiting in
    :meth:`read` counts, so a pipeline that is itself slow (a busy disk) never trips it.
    """

    def __init__(self, inner: ByteStream, low: LowSpeed, where: str) -> None:
        self._inner = inner
        self._low = low
        self._where = where
        self._bytes = 0
        self._waited = 0.0
        self.etag = inner.etag

    async def read(self, n: int) -> bytes:
        started = time.monotonic()
        data = await self._inner.read(n)
        self._waited += time.monotonic() - started
        self._bytes += len(data)
        if self._waited >= self._low.seconds:
            rate = self._bytes / self._waited
            if rate < self._low.limit:
                raise SourceUnreachable(
                    f"download of {self._where}: {self._bytes} bytes in {self._waited:.1f} s "
                    f"({rate:.0f} B/s), below source.low_speed_limit = {self._low.limit} B/s "
                    f"for source.low_speed_time = {self._low.seconds:g} s",
                    hint="check the network; the next check resumes from the last checkpoint",
                )
            self._bytes, self._waited = 0, 0.0
        return data

    async def aclose(self) -> None:
        await self._inner.aclose()


async def read_exactly(stream: ByteStream, n: int, what: str) -> bytes:
    """Read exactly ``n`` bytes or raise :class:`SourceError` naming ``what``."""
    first = await stream.read(n)
    if len(first) == n:
        return first
    buffer = bytearray(first)
    while len(buffer) < n:
        piece = await stream.read(n - len(buffer))
        if not piece:
            raise SourceError(
                f"{what}: stream ended after {len(buffer)} of {n} bytes",
                hint="the object is shorter than its meta says; republish the release",
            )
        buffer += piece
    return bytes(buffer)


class Source(ABC):
    """A release location. Use as an async context manager (opens sessions)."""

    def __init__(self, url: str, timeout: float) -> None:
        self.url = url
        self.timeout = timeout
        #: Set from the configuration by :func:`open_source`; ``None``: no low-speed limit.
        self.low_speed: LowSpeed | None = None
        self._stack = contextlib.AsyncExitStack()

    @property
    def meta_url(self) -> str:
        return meta_name(self.url)

    @property
    def signature_url(self) -> str:
        return signature_name(self.url)

    async def __aenter__(self) -> Self:
        await self._open(self._stack)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stack.aclose()

    async def _open(self, stack: contextlib.AsyncExitStack) -> None:
        """Open sessions or clients; whatever is entered on ``stack`` is closed on exit."""
        return None

    @abstractmethod
    async def fetch_meta(self, etag: str | None) -> Fetched | None:
        """The meta's bytes, or ``None`` when unchanged since ``etag``."""

    @abstractmethod
    async def fetch_signature(self) -> Fetched | None:
        """The ``.minisig`` bytes, or ``None`` when there is none."""

    @abstractmethod
    def image_url(self, release: Release) -> str:
        """Where the release's image object is, for logs, status and resume records."""

    @abstractmethod
    async def open_image(self, release: Release, start: int, if_match: str | None) -> ByteStream:
        """Open the image object at byte ``start``; ``if_match`` guards a resume."""

    @abstractmethod
    def object_url(self, name: str) -> str:
        """Where the object ``name`` (relative to the meta's directory) is."""

    @abstractmethod
    async def fetch_object(self, name: str, limit: int) -> bytes | None:
        """The whole object ``name`` (relative to the meta's directory), at most ``limit``
        bytes, or ``None`` when there is none."""

    @abstractmethod
    async def read_range(self, name: str, start: int, length: int) -> bytes:
        """``length`` bytes of object ``name`` from byte ``start`` (one Range request)."""

    async def open_download(self, release: Release, start: int, if_match: str | None) -> ByteStream:
        """:meth:`open_image`, ended by :class:`LowSpeedGuard` if it trickles in."""
        stream = await self.open_image(release, start, if_match)
        if self.low_speed is None:
            return stream
        return LowSpeedGuard(stream, self.low_speed, self.image_url(release))


# --------------------------------------------------------------------------- HTTP


class _HttpStream:
    def __init__(self, response: aiohttp.ClientResponse, where: str | None = None) -> None:
        self._response = response
        self._where = where or str(response.url)
        self.etag: str | None = response.headers.get("ETag")

    async def read(self, n: int) -> bytes:
        try:
            return await self._response.content.read(n)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise SourceUnreachable(
                f"download of {self._where} broke off: {exc or type(exc).__name__}"
            ) from exc

    async def aclose(self) -> None:
        self._response.release()


class HttpSource(Source):
    """Releases on a web server. Every request names its object by ``where``: the URL
    here, ``s3://bucket/key`` in :class:`S3Source`, which addresses and signs it."""

    #: Whether a redirect is followed (S3's redirects name another region instead).
    follow_redirects = True

    def __init__(self, url: str, timeout: float) -> None:
        super().__init__(url, timeout)
        self._session: aiohttp.ClientSession | None = None

    async def _open(self, stack: contextlib.AsyncExitStack) -> None:
        self._session = await stack.enter_async_context(
            aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(
                    total=None, connect=self.timeout, sock_read=self.timeout
                ),
                auto_decompress=False,
            )
        )

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("HttpSource used outside 'async with'")
        return self._session

    async def _prepare(
        self, where: str, headers: dict[str, str], action: str
    ) -> tuple[str | yarl.URL, dict[str, str]]:
        """The URL to GET for ``where`` and the request's headers."""
        return where, headers

    @contextlib.asynccontextmanager
    async def _request(
        self, where: str, headers: dict[str, str], action: str
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        url, headers = await self._prepare(where, headers, action)
        try:
            async with self.session.get(
                url, headers=headers, allow_redirects=self.follow_redirects
            ) as response:
                yield response
        except aiohttp.ClientConnectorError as exc:
            raise SourceUnreachable(f"{action} {where}: cannot connect: {exc.os_error}") from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise SourceUnreachable(f"{action} {where}: {exc or type(exc).__name__}") from exc

    def _stream(self, response: aiohttp.ClientResponse, where: str) -> _HttpStream:
        return _HttpStream(response)

    async def _fail(self, response: aiohttp.ClientResponse, action: str, where: str) -> NoReturn:
        """Raise the error for an answer that is not the one asked for."""
        url = response.url
        status = response.status
        if status == 404:
            raise SourceNotFound(f"{action} {url}: 404 Not Found")
        if status in (401, 403):
            raise SourceDenied(f"{action} {url}: HTTP {status} {response.reason}")
        if status == 412:
            raise SourceChanged(f"{action} {url}: the object changed since the download began")
        if status >= 500:
            # A server that is down or overloaded, as S3's 5xx: retried with backoff.
            raise SourceUnreachable(
                f"{action} {url}: the server failed: HTTP {status} {response.reason}"
            )
        raise SourceError(f"{action} {url}: unexpected HTTP {status} {response.reason}")

    async def _fetch_small(
        self, url: str, limit: int, etag: str | None, action: str, missing_ok: bool
    ) -> Fetched | None:
        headers = {"If-None-Match": etag} if etag else {}
        async with self._request(url, headers, action) as response:
            if response.status == 304:
                return None
            if response.status == 404 and missing_ok:
                return None
            if response.status != 200:
                await self._fail(response, action, url)
            if response.content_length is not None and response.content_length > limit:
                raise SourceError(
                    f"{action} {url}: {response.content_length} bytes, over the {limit}-byte limit"
                )
            # As a whole: a small object that trickles in must not hold the check.
            stream = self._stream(response, url)
            data = await _read_within(stream, limit, action, url, self.timeout)
            return Fetched(data=data, etag=response.headers.get("ETag"))

    async def fetch_meta(self, etag: str | None) -> Fetched | None:
        fetched = await self._fetch_small(
            self.meta_url, MAX_META_BYTES, etag, "fetch meta", missing_ok=False
        )
        return fetched

    async def fetch_signature(self) -> Fetched | None:
        return await self._fetch_small(
            self.signature_url, MAX_SIGNATURE_BYTES, None, "fetch signature", missing_ok=True
        )

    def image_url(self, release: Release) -> str:
        if release.object_is_absolute:
            return self.url
        return urljoin(self.meta_url, release.image_object)

    def object_url(self, name: str) -> str:
        return urljoin(self.meta_url, name)

    async def fetch_object(self, name: str, limit: int) -> bytes | None:
        url = self.object_url(name)
        fetched = await self._fetch_small(url, limit, None, "fetch", missing_ok=True)
        return None if fetched is None else fetched.data

    async def read_range(self, name: str, start: int, length: int) -> bytes:
        url = self.object_url(name)
        headers = {"Range": f"bytes={start}-{start + length - 1}"}
        async with self._request(url, headers, "fetch range of") as response:
            if response.status != 206:
                if response.status == 200:
                    raise SourceError(f"fetch range of {url}: the server ignored the Range request")
                await self._fail(response, "fetch range of", url)
            stream = self._stream(response, url)
            data = await _read_within(stream, length, "fetch range of", url, self.timeout)
        return _whole_range(data, length, start, url)

    async def open_image(self, release: Release, start: int, if_match: str | None) -> ByteStream:
        url = self.image_url(release)
        headers: dict[str, str] = {}
        if start:
            headers["Range"] = f"bytes={start}-"
        if if_match:
            headers["If-Match"] = if_match
        context = self._request(url, headers, "download image")
        response = await context.__aenter__()
        expected = 206 if start else 200
        if response.status != expected:
            try:
                if start and response.status == 200:
                    raise SourceChanged(
                        f"download image {url}: the server ignored the Range request"
                    )
                # While the answer is open: S3's error answer names its code.
                await self._fail(response, "download image", url)
            finally:
                await context.__aexit__(None, None, None)
        return _ContextStream(self._stream(response, url), context)


class _ContextStream:
    """Keeps the request's context open for as long as the stream is read."""

    def __init__(self, inner: _HttpStream, context: contextlib.AbstractAsyncContextManager[Any]):
        self._inner = inner
        self._context = context
        self.etag = inner.etag

    async def read(self, n: int) -> bytes:
        return await self._inner.read(n)

    async def aclose(self) -> None:
        await self._context.__aexit__(None, None, None)


def _whole_range(data: bytes, length: int, start: int, where: str) -> bytes:
    if len(data) != length:
        raise SourceUnreachable(
            f"fetch range of {where}: {len(data)} of {length} bytes from byte {start}"
        )
    return data


async def _read_within(
    stream: ByteStream, limit: int, action: str, where: str, seconds: float
) -> bytes:
    """The whole body, at most ``limit`` bytes, within ``seconds`` in all. A body
    that stalls is a network fault like any other (``source-unreachable``)."""
    try:
        async with asyncio.timeout(seconds):
            return await _read_bounded(stream, limit, f"{action} {where}")
    except TimeoutError as exc:
        raise SourceUnreachable(
            f"{action} {where}: the body did not arrive within {seconds:g} s"
        ) from exc


async def _read_bounded(stream: ByteStream, limit: int, what: str) -> bytes:
    buffer = bytearray()
    while True:
        piece = await stream.read(min(READ_SIZE, limit + 1 - len(buffer)))
        if not piece:
            return bytes(buffer)
        buffer += piece
        if len(buffer) > limit:
            raise SourceError(f"{what}: more than the {limit}-byte limit; refused unread")


# --------------------------------------------------------------------------- files


class _FileStream:
    def __init__(self, handle: Any, etag: str) -> None:
        self._handle = handle
        self.etag: str | None = etag

    async def read(self, n: int) -> bytes:
        data: bytes = await asyncio.to_thread(self._handle.read, n)
        return data

    async def aclose(self) -> None:
        await asyncio.to_thread(self._handle.close)


def _file_etag(stat: os.stat_result) -> str:
    return f'"{stat.st_mtime_ns:x}-{stat.st_size:x}"'


@contextlib.contextmanager
def _file_errors(path: Path, action: str) -> Iterator[None]:
    try:
        yield
    except FileNotFoundError as exc:
        raise SourceNotFound(f"{action} {path}: no such file") from exc
    except PermissionError as exc:
        raise SourceDenied(f"{action} {path}: permission denied") from exc
    except OSError as exc:
        raise SourceUnreachable(f"{action} {path}: {exc.strerror}") from exc


class FileSource(Source):
    """Releases in a local directory: offline updates from a USB stick or a mount."""

    def __init__(self, url: str, timeout: float) -> None:
        super().__init__(url, timeout)
        self.base = Path(urlsplit(url).path)

    @property
    def meta_path(self) -> Path:
        return self.base.with_name(meta_name(self.base.name))

    def _read_small(self, path: Path, limit: int, etag: str | None) -> Fetched | None:
        with open(path, "rb") as handle:
            stat = os.fstat(handle.fileno())
            tag = _file_etag(stat)
            if etag is not None and tag == etag:
                return None
            if stat.st_size > limit:
                raise SourceError(f"{path}: {stat.st_size} bytes, over the {limit}-byte limit")
            return Fetched(data=handle.read(limit + 1)[: limit + 1], etag=tag)

    async def fetch_meta(self, etag: str | None) -> Fetched | None:
        with _file_errors(self.meta_path, "read meta"):
            return await asyncio.to_thread(self._read_small, self.meta_path, MAX_META_BYTES, etag)

    async def fetch_signature(self) -> Fetched | None:
        path = self.base.with_name(signature_name(self.base.name))
        try:
            with _file_errors(path, "read signature"):
                return await asyncio.to_thread(self._read_small, path, MAX_SIGNATURE_BYTES, None)
        except SourceNotFound:
            return None

    def image_path(self, release: Release) -> Path:
        if release.object_is_absolute:
            return self.base
        return self.base.parent / release.image_object

    def image_url(self, release: Release) -> str:
        return f"file://{self.image_path(release)}"

    def object_url(self, name: str) -> str:
        return f"file://{self.base.parent / name}"

    async def fetch_object(self, name: str, limit: int) -> bytes | None:
        path = self.base.parent / name
        try:
            with _file_errors(path, "read"):
                fetched = await asyncio.to_thread(self._read_small, path, limit, None)
        except SourceNotFound:
            return None
        return None if fetched is None else fetched.data

    async def read_range(self, name: str, start: int, length: int) -> bytes:
        path = self.base.parent / name

        def _read() -> bytes:
            with open(path, "rb") as handle:
                return os.pread(handle.fileno(), length, start)

        with _file_errors(path, "read range of"):
            data = await asyncio.to_thread(_read)
        return _whole_range(data, length, start, str(path))

    async def open_image(self, release: Release, start: int, if_match: str | None) -> ByteStream:
        path = self.image_path(release)

        def _open() -> _FileStream:
            handle = open(path, "rb")  # noqa: SIM115 - closed by the stream's aclose
            tag = _file_etag(os.fstat(handle.fileno()))
            if if_match is not None and tag != if_match:
                handle.close()
                raise SourceChanged(f"download image {path}: the file changed since the start")
            handle.seek(start)
            return _FileStream(handle, tag)

        with _file_errors(path, "open image"):
            return await asyncio.to_thread(_open)


# --------------------------------------------------------------------------- S3


class S3Source(HttpSource):
    """Releases in an S3 bucket, read as SigV4-signed GETs with HttpSource's bounded,
    timed reads, Range and If-Match requests and error mapping; S3's error codes name
    what went wrong. Objects are ``s3://bucket/key`` in messages, never the endpoint."""

    follow_redirects = False

    def __init__(self, url: str, config: SourceConfig) -> None:
        super().__init__(url, config.timeout)
        from organixmd.release.s3client import RequestSigner, configured_endpoint, parse_s3_url

        self.bucket, self.key = parse_s3_url(url)
        self._endpoint = configured_endpoint(config.s3_endpoint)
        self._region = config.s3_region
        self._signer = RequestSigner(config.credentials, config.credentials_file, config.s3_region)

    @contextlib.asynccontextmanager
    async def _request(
        self, where: str, headers: dict[str, str], action: str
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """HttpSource's request, tried again (as botocore's standard retry mode did) when
        no server answered or it answered 5xx, with jittered backoff, as long as the
        answer can still come within ``source.timeout``. A body is never retried."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        async with contextlib.AsyncExitStack() as outer:
            for attempt in range(S3_ATTEMPTS):
                inner = contextlib.AsyncExitStack()
                failed: SourceUnreachable | None = None
                try:
                    # A retry must be answered by the deadline too (the first try is
                    # bounded by the session's connect and read timeouts).
                    async with asyncio.timeout_at(deadline if attempt else None):
                        response = await inner.enter_async_context(
                            super()._request(where, headers, action)
                        )
                except SourceUnreachable as exc:
                    failed = exc
                except TimeoutError as exc:
                    raise SourceUnreachable(
                        f"{action} {where}: no answer within {self.timeout:g} s "
                        f"({attempt + 1} tries)"
                    ) from exc
                delay = random.uniform(0, 2**attempt)  # noqa: S311 - jitter, not a secret
                again = attempt + 1 < S3_ATTEMPTS and loop.time() + delay < deadline
                if failed is not None:
                    if not again:
                        raise failed
                elif response.status not in S3_RETRY_STATUSES or not again:
                    await outer.enter_async_context(inner)
                    break
                else:
                    await inner.aclose()
                await asyncio.sleep(delay)
            yield response

    def _key_of(self, where: str) -> str:
        return where.removeprefix(f"s3://{self.bucket}/")

    async def _prepare(
        self, where: str, headers: dict[str, str], action: str
    ) -> tuple[str | yarl.URL, dict[str, str]]:
        from organixmd.release.s3client import object_http_url

        url = object_http_url(self._endpoint, self._region, self.bucket, self._key_of(where))
        signed = await self._signer.sign(url, headers, f"{action} {where}")
        # Sent exactly as signed: aiohttp must not re-encode the path.
        return yarl.URL(url, encoded=True), signed

    def _stream(self, response: aiohttp.ClientResponse, where: str) -> _HttpStream:
        return _HttpStream(response, where)

    async def _fail(self, response: aiohttp.ClientResponse, action: str, where: str) -> NoReturn:
        from organixmd.release.s3client import error_answer, s3_error

        try:
            stream = _HttpStream(response, where)
            body = await _read_within(stream, MAX_ERROR_BYTES, action, where, self.timeout)
        except SourceError:
            body = b""  # the status alone, then
        code, message, region = error_answer(body, response.status, response.headers)
        raise s3_error(
            code,
            response.status,
            message,
            f"{action} {where}",
            self.bucket,
            region_hint=region if region != self._region else "",
        )

    def _directory(self) -> str:
        return self.key.rsplit("/", 1)[0] + "/" if "/" in self.key else ""

    def image_url(self, release: Release) -> str:
        # The seed format names its image by an absolute key in the bucket.
        key = (
            release.image_object
            if release.object_is_absolute
            else (self._directory() + release.image_object)
        )
        return f"s3://{self.bucket}/{key}"

    def object_url(self, name: str) -> str:
        return f"s3://{self.bucket}/{self._directory()}{name}"


def open_source(config: SourceConfig, url: str | None = None) -> Source:
    """The source for ``url`` (default: the configured release URL)."""
    target = url or config.url
    scheme = urlsplit(target).scheme
    source: Source
    if scheme == "s3":
        source = S3Source(target, config)
    elif scheme in ("http", "https"):
        source = HttpSource(target, config.timeout)
    elif scheme == "file":
        source = FileSource(target, config.timeout)
    else:
        raise SourceError(f"unsupported release URL scheme in {target!r}")
    if config.low_speed_limit and scheme != "file":
        source.low_speed = LowSpeed(config.low_speed_limit, config.low_speed_time)
    return source
