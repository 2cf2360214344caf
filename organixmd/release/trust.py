"""Fetch a release descriptor and check it before anything trusts it (invariant 5).

Used by ``organixctl verify`` and ``organixctl provision``; the daemon's engine
runs the same checks with conditional requests on top.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from organixmd.base.config import Config, SourceConfig
from organixmd.base.errors import ConfigError, OrganixmError, SignatureError
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
    keys: list[minisign.PublicKey] = []
    if not (config.source.public_keys or config.source.public_key_files):
        return keys
    from organixmd.release import minisign

    for index, text in enumerate(config.source.public_keys):
        try:
            keys.append(minisign.PublicKey.parse(text))
        except OrganixmError as exc:
            raise ConfigError(f"source.public_keys.{index}: {exc.message}") from exc
    for path in config.source.public_key_files:
        try:
            keys.append(minisign.PublicKey.load(path))
        except OrganixmError as exc:
            raise ConfigError(f"source.public_key_files: {path}: {exc.message}") from exc
        except OSError as exc:
            raise ConfigError(f"source.public_key_files: cannot read {path}: {exc}") from exc
    return keys


def load_keys(texts: Sequence[str]) -> list[minisign.PublicKey]:
    """Keys given on an operator's command line as ``.pub`` file paths or bare base64 lines."""
    from organixmd.release import minisign

    keys = []
    for text in texts:
        path = Path(text)
        keys.append(
            minisign.PublicKey.load(path) if path.is_file() else minisign.PublicKey.parse(text)
        )
    return keys


async def fetch_release(
    source: Source, keys: Sequence[minisign.PublicKey]
) -> tuple[Release, minisign.Verified | None]:
    """The release at ``source``: signature checked when ``keys`` are given, schema always."""
    fetched = await source.fetch_meta(None)
    if fetched is None:
        raise SignatureError(f"{source.meta_url}: the source answered 'not modified' unasked")
    verified = None
    if keys:
        signature = await source.fetch_signature()
        if signature is None:
            raise SignatureError(
                f"{source.signature_url}: no signature, and trusted keys were given"
            )
        from organixmd.release import minisign

        verified = minisign.verify(fetched.data, signature.data, list(keys))
    return parse_meta(fetched.data, source=source.meta_url), verified
