"""``organixctl verify``: check a published release end to end before hosts see it.

Fetches the meta and its signature like a host would, checks the signature
against the given keys, validates the schema, then streams the whole image and
checks every chunk's SHA-256 and the whole image's. Nothing is written anywhere.
Exit 0 only if every check holds.
"""

from __future__ import annotations

import argparse
import sys

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


def run(args: argparse.Namespace) -> int:
    import asyncio

    from organixmd.base.errors import OrganixmError

    try:
        return asyncio.run(_verify(args))
    except OrganixmError as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return Exit.ERROR


async def _verify(args: argparse.Namespace) -> int:
    import time

    from organixmd.install.pipeline import Installer
    from organixmd.release.sources import open_source
    from organixmd.release.trust import fetch_release, load_keys, source_config

    config = source_config(
        args.meta, endpoint=args.endpoint, region=args.region, anonymous=args.anonymous
    )
    keys = load_keys(args.pubkey)
    async with open_source(config) as source:
        trusted = await fetch_release(source, keys)
        assert trusted is not None  # noqa: S101 - an unconditional fetch returns the meta
        release, verified = trusted.release, trusted.verified
        if verified is not None:
            print(
                f"signature: ok (key {verified.key_id_hex}, trusted comment "
                f"{verified.trusted_comment!r})"
            )
        else:
            print("signature: NOT CHECKED (no --pubkey given)")
        chunks = len(release.image.chunks) if release.image else 0
        kind = f"{chunks} chunks" if release.image else "seed format, single stream"
        print(f"meta: ok ({release.describe()}, {release.size} bytes, {kind})")
        started = time.monotonic()
        result = await Installer(release, source, None).run()
        seconds = max(time.monotonic() - started, 1e-6)
        print(
            f"image: ok ({source.image_url(release)}, every chunk and the whole image match; "
            f"sha256 {result.sha256}; {release.size / seconds / 1e6:.0f} MB/s)"
        )
    return Exit.OK
