"""Fetch a release descriptor and check it before anything trusts it (invariant 5).

The one path from a source to a release (:func:`fetch_release`), taken by the
daemon's engine (with conditional requests), ``organixctl verify`` and
``organixctl provision``; and the loading of trusted keys.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from organixmd.base.config import Config, SourceConfig
from organixmd.base.errors import ConfigError, OrganixmError, SignatureError, SourceError
from organixmd.base.objectnames import META_SUFFIX
from organixmd.release.meta import Release, parse_meta
from organixmd.release.sources import Source

if TYPE_CHECKING:
    # cryptography, through minisign, is imported only when keys are used: the idle
    # daemon of a host without keys never loads it.
    from organixmd.release import minisign


def base_url(meta: str) -> str:
    """The release URL a ``.meta`` location belongs to (a bare path becomes ``file://``)."""
    if not meta.endswith(META_SUFFIX):
        raise ConfigError(f"{meta!r} does not name a .meta object (NAME.meta)")
    base = meta[: -len(META_SUFFIX)]
    if "://" not in base:
        base = "file://" + str(Path(base).resolve())
    return base


def source_config(
    meta: str, *, endpoint: str | None = None, region: str = "us-east-1", anonymous: bool = False
) -> SourceConfig:
    url = base_url(meta)
    try:
        return SourceConfig(
            url=url,
            s3_endpoint=endpoint,
            s3_region=region,
            credentials="anonymous" if anonymous else "env",
        )
    except ValueError as exc:
        raise ConfigError(f"release URL {url!r}: {exc}") from exc


def load_public_keys(config: Config) -> list[minisign.PublicKey]:
    """The trusted keys of the configuration; a bad key stops start-up (ConfigError)."""
    if not (config.source.public_keys or config.source.public_key_files):
        return []
    keys = []
    for index, text in enumerate(config.source.public_keys):
        keys.append(_key(text, None, f"source.public_keys.{index}"))
    for path in config.source.public_key_files:
        keys.append(_key(None, path, f"source.public_key_files: {path}"))
    return keys


def load_keys(texts: Sequence[str]) -> list[minisign.PublicKey]:
    """Keys given on an operator's command line as ``.pub`` file paths or bare base64 lines."""
    keys = []
    for text in texts:
        path = Path(text)
        keys.append(_key(None, path, str(path)) if path.is_file() else _key(text, None, "key"))
    return keys


def _key(text: str | None, path: Path | None, where: str) -> minisign.PublicKey:
    """One key from its text or its file; a bad or unreadable one is a ConfigError naming
    ``where`` it was given."""
    from organixmd.release import minisign

    try:
        if path is not None:
            return minisign.PublicKey.load(path)
        assert text is not None  # noqa: S101 - one of the two is given
        return minisign.PublicKey.parse(text)
    except OrganixmError as exc:
        raise ConfigError(f"{where}: {exc.message}") from exc
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read the key: {exc.strerror or exc}") from exc


@dataclass(frozen=True, slots=True)
class TrustedRelease:
    """A release whose meta passed the signature check (when keys are given) and the
    strict schema."""

    release: Release
    #: The meta object's ETag, for the next conditional request.
    etag: str | None
    #: The signature that verified it; ``None`` without trusted keys.
    verified: minisign.Verified | None


async def fetch_release(
    source: Source, keys: Sequence[minisign.PublicKey], *, if_none_match: str | None = None
) -> TrustedRelease | None:
    """The release at ``source``: the signature checked over the exact meta bytes when
    ``keys`` are given, then the schema; the one path from a source to a release that
    the daemon, ``organixctl verify`` and ``organixctl provision`` all take.

    With ``if_none_match`` (an ETag) the meta is asked for conditionally, and ``None``
    means it did not change. Raises SignatureError, MetaError, SourceError.
    """
    fetched = await source.fetch_meta(if_none_match)
    if fetched is None:
        if if_none_match is None:
            raise SourceError(f"{source.meta_url}: the source answered 'not modified' unasked")
        return None
    verified = None
    if keys:
        signature = await source.fetch_signature()
        if signature is None:
            raise SignatureError(
                f"{source.signature_url}: no signature, and trusted keys are configured; "
                "refusing the unsigned meta"
            )
        from organixmd.release import minisign

        verified = minisign.verify(fetched.data, signature.data, list(keys))
    release = parse_meta(fetched.data, source=source.meta_url)
    return TrustedRelease(release, fetched.etag, verified)
