"""``organixctl publish``: compress, sign and upload a release (docs/format.md, "Publishing")."""

from __future__ import annotations

import argparse
import os
import re
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import TextIO

from organixctl.exitcodes import Exit

_SIZE_RE = re.compile(r"^(\d+)([KMG]?)(i?B)?$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}

#: Option names for the meta fields, so validation errors name what the operator typed.
_LABELS = {
    "version": "--version",
    "serial": "--serial",
    "rollout_percent": "--rollout-percent",
    "kernel": "--kernel",
    "initrd": "--initrd",
    "init": "--init",
    "params": "--param",
}


def _size(text: str) -> int:
    match = _SIZE_RE.match(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 4M, 1024K, 4194304)")
    return int(match.group(1)) * _UNITS[match.group(2).upper()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", type=Path, metavar="IMAGE", help="raw root image (file or device)")
    parser.add_argument(
        "--to",
        required=True,
        metavar="TARGET",
        help="s3://bucket/prefix/name or DIR/name; writes NAME.meta, NAME.meta.minisig "
        "and images/<sha256>.img.zst beside it",
    )
    parser.add_argument("--version", required=True, help="human version, e.g. 24.05.1")
    parser.add_argument(
        "--serial", required=True, type=int, help="release serial; must grow with every release"
    )
    parser.add_argument("--secret-key", type=Path, metavar="PATH", help="minisign secret key")
    parser.add_argument(
        "--password-file",
        type=Path,
        metavar="FILE",
        help="file holding the secret key's password (first line)",
    )
    parser.add_argument("--allow-unsigned", action="store_true", help="publish without a signature")
    boot = parser.add_argument_group(
        "boot entry", "paths inside the image (default: /boot/bzImage, /boot/initrd, /sbin/init)"
    )
    boot.add_argument("--kernel", metavar="PATH")
    boot.add_argument("--initrd", metavar="PATH")
    boot.add_argument("--init", metavar="PATH")
    boot.add_argument(
        "--param",
        action="append",
        metavar="X",
        help="kernel parameter; repeat for several (default: none)",
    )
    image = parser.add_argument_group("image format")
    image.add_argument(
        "--chunk-size",
        type=_size,
        default=4 * 1024 * 1024,
        metavar="SIZE",
        help="uncompressed bytes per zstd frame, multiple of 4K, 64K..64M (default 4M)",
    )
    image.add_argument(
        "--level", type=int, default=3, help="zstd compression level, -7..22 (default 3)"
    )
    image.add_argument(
        "--no-delta",
        dest="delta",
        action="store_false",
        help="publish no delta index and frames object (hosts then always download the "
        "whole image; default: publish them)",
    )
    image.add_argument(
        "--workdir",
        type=Path,
        metavar="DIR",
        help="where the compressed image is staged for S3 targets (default: $TMPDIR)",
    )
    parser.add_argument(
        "--rollout-percent",
        type=int,
        default=100,
        metavar="N",
        help="share of hosts (0..100) that install this release (default 100)",
    )
    parser.add_argument("--uuid", metavar="U", help="the release's UUID (default: a new one)")
    s3 = parser.add_argument_group("S3", "credentials come from the usual AWS environment")
    s3.add_argument("--endpoint", metavar="URL", help="S3 endpoint (default: AWS)")
    s3.add_argument(
        "--region", help="S3 region (default: $AWS_REGION, $AWS_DEFAULT_REGION or us-east-1)"
    )
    s3.add_argument(
        "--credentials-file",
        type=Path,
        metavar="FILE",
        help="file with AWS_ACCESS_KEY_ID=... and AWS_SECRET_ACCESS_KEY=... lines",
    )


class _ProgressBar:
    """One plain-text line on a terminal, redrawn at most 5 times a second. Thread-safe."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self._phase = ""
        self._phase_start = 0.0
        self._last = 0.0
        self._drawn = False
        self._width = 0

    def __call__(self, phase: str, done: int, total: int) -> None:
        with self._lock:
            now = time.monotonic()
            if phase != self._phase:
                if self._drawn:
                    self._stream.write("\n")
                self._phase, self._phase_start, self._last = phase, now, 0.0
                self._width = 0
            if now - self._last < 0.2 and done < total:
                return
            self._last = now
            elapsed = now - self._phase_start
            percent = 100 * done // total if total else 100
            filled = percent * 30 // 100
            # A rate over a few milliseconds (a local rename, a skipped upload) means nothing.
            rate = f"{done / elapsed / 1e6:7.1f} MB/s" if elapsed >= 0.2 else ""
            line = (
                f"{phase:<9} [{'#' * filled}{'.' * (30 - filled)}] {percent:3d}% "
                f"{done / 2**20:9.1f}/{total / 2**20:.1f} MiB {rate}"
            )
            # Pad over the previous, possibly longer, line: plain text, no escape codes.
            self._stream.write("\r" + line.ljust(self._width))
            self._width = len(line)
            self._stream.flush()
            self._drawn = True

    def close(self) -> None:
        with self._lock:
            if self._drawn:
                self._stream.write("\n")
                self._stream.flush()
                self._drawn = False


def _fail(message: str, code: Exit) -> int:
    print(f"organixctl publish: {message}", file=sys.stderr)
    return code


def run(args: argparse.Namespace) -> int:
    import asyncio

    from pydantic import ValidationError

    from organixmd.errors import ConfigError, OrganixmError
    from organixmd.image import check_chunk_size
    from organixmd.publish import (
        PublishRequest,
        check_release_fields,
        check_signing,
        make_boot_entry,
        publish,
        split_target,
    )
    from organixmd.s3client import S3Settings

    try:
        check_release_fields(
            version=args.version,
            serial=args.serial,
            rollout_percent=args.rollout_percent,
            labels=_LABELS,
        )
        boot = make_boot_entry(
            kernel=args.kernel,
            initrd=args.initrd,
            init=args.init,
            params=args.param,
            labels=_LABELS,
        )
        try:
            check_chunk_size(args.chunk_size)
        except ConfigError as exc:
            raise ConfigError(f"--chunk-size: {exc.message}", hint="") from exc
        if not -7 <= args.level <= 22:
            raise ConfigError(f"--level {args.level}: must be between -7 and 22", hint="")
        try:
            release_uuid = uuid.UUID(args.uuid) if args.uuid is not None else None
        except ValueError as exc:
            raise ConfigError(f"--uuid {args.uuid!r}: not a UUID", hint="") from exc
        if args.secret_key is not None and args.allow_unsigned:
            raise ConfigError("--secret-key and --allow-unsigned exclude each other", hint="")
        check_signing(args.secret_key, args.allow_unsigned)
        split_target(args.to)
        password = None
        if args.password_file is not None:
            try:
                password = args.password_file.read_bytes().split(b"\n", 1)[0]
            except OSError as exc:
                raise ConfigError(
                    f"--password-file {args.password_file}: {exc.strerror}", hint=""
                ) from exc
        region = (
            args.region
            or os.environ.get("AWS_REGION")
            or os.environ.get("AWS_DEFAULT_REGION")
            or "us-east-1"
        )
        try:
            settings = S3Settings(
                endpoint=args.endpoint,
                region=region,
                credentials="file" if args.credentials_file is not None else "env",
                credentials_file=args.credentials_file,
            )
        except ValidationError as exc:
            raise ConfigError(f"S3 options: {exc.errors()[0]['msg']}", hint="") from exc
        request = PublishRequest(
            image=args.image,
            target=args.to,
            version=args.version,
            serial=args.serial,
            boot=boot,
            secret_key=args.secret_key,
            password=password,
            allow_unsigned=args.allow_unsigned,
            uuid=release_uuid,
            chunk_size=args.chunk_size,
            level=args.level,
            rollout_percent=args.rollout_percent,
            s3=settings,
            workdir=args.workdir,
            delta=args.delta,
        )
    except ConfigError as exc:
        return _fail(str(exc), Exit.USAGE)

    bar = _ProgressBar(sys.stderr) if sys.stderr.isatty() else None
    try:
        result = asyncio.run(publish(request, bar))
    except OrganixmError as exc:
        if bar is not None:
            bar.close()
        return _fail(str(exc), Exit.ERROR)
    if bar is not None:
        bar.close()
    print(result.summary())
    return Exit.OK
