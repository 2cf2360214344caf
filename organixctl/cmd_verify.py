"""``organixctl verify``: check a published release end to end before hosts see it.

Fetches the meta and its signature like a host would, checks the signature
against the given keys, validates the schema, then streams the whole image and
checks every chunk's SHA-256 and the whole image's. Nothing is written anywhere.
Exit 0 only if every check holds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from organixctl.exitcodes import Exit


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "meta",
        help="the release's meta: s3://bucket/prefix/name.meta, https://.../name.meta, or a path",
    )
    parser.add_argument(
        "--pubkey",
        action="append",
        default=[],
        metavar="KEY",
        help="trusted minisign public key: a .pub file or the base64 line (repeatable); "
        "with none, the signature is not checked and the output says so",
    )
    parser.add_argument("--endpoint", help="S3 endpoint URL (for S3-compatible servers)")
    parser.add_argument("--region", default="us-east-1", help="S3 region (default us-east-1)")
    parser.add_argument(
        "--anonymous", action="store_true", help="read a public bucket without credentials"
    )


def _base_url(meta: str) -> str:
    if not meta.endswith(".meta"):
        raise ValueError(f"{meta!r} does not name a .meta object")
    base = meta[: -len(".meta")]
    if "://" not in base:
        base = "file://" + str(Path(base).resolve())
    return base


def run(args: argparse.Namespace) -> int:
    import asyncio

    from organixmd.errors import OrganixmError

    try:
        base = _base_url(args.meta)
    except ValueError as exc:
        print(f"organixctl verify: {exc}", file=sys.stderr)
        return Exit.USAGE
    try:
        return asyncio.run(_verify(base, args))
    except OrganixmError as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return Exit.ERROR


def _load_key(cls: Any, text: str) -> Any:
    """A key given as a .pub file path or as the bare base64 line."""
    path = Path(text)
    return cls.load(path) if path.is_file() else cls.parse(text)


async def _verify(base: str, args: argparse.Namespace) -> int:
    import time

    from organixmd.config import SourceConfig
    from organixmd.errors import ConfigError, SignatureError
    from organixmd.meta import parse_meta
    from organixmd.minisign import PublicKey, verify
    from organixmd.pipeline import Installer
    from organixmd.sources import open_source

    try:
        config = SourceConfig(
            url=base,
            s3_endpoint=args.endpoint,
            s3_region=args.region,
            credentials="anonymous" if args.anonymous else "env",
        )
    except ValueError as exc:
        raise ConfigError(f"release URL {base!r}: {exc}") from exc
    keys = [_load_key(PublicKey, text) for text in args.pubkey]
    async with open_source(config) as source:
        fetched = await source.fetch_meta(None)
        assert fetched is not None  # noqa: S101 - an unconditional fetch returns data
        if keys:
            signature = await source.fetch_signature()
            if signature is None:
                raise SignatureError(f"{source.signature_url}: no signature")
            verified = verify(fetched.data, signature.data, keys)
            print(
                f"signature: ok (key {verified.key_id_hex}, trusted comment "
                f"{verified.trusted_comment!r})"
            )
        else:
            print("signature: NOT CHECKED (no --pubkey given)")
        release = parse_meta(fetched.data, source=source.meta_url)
        chunks = len(release.image.chunks) if release.image else 0
        kind = f"{chunks} chunks" if release.image else "seed format, single stream"
        print(f"meta: ok ({release.describe()}, {release.size} bytes, {kind})")
        started = time.monotonic()
        result = await Installer(release, source, None).run()
        seconds = time.monotonic() - started
        print(
            f"image: ok ({source.image_url(release)}, every chunk and the whole image match; "
            f"sha256 {result.sha256}; {release.size / seconds / 1e6:.0f} MB/s)"
        )
    return Exit.OK
