"""``organixctl provision``: install organixm onto a disk, or make a bootable disk image.

Writes a GPT (BIOS boot, ESP, boot, slots organixm-a and organixm-b, rw), GRUB
for BIOS and/or UEFI, the static grub.cfg and an environment with slot a
committed, then streams the release into slot a with the daemon's verified
pipeline. A regular file as ``--disk`` becomes a ready-to-boot disk image.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from organixctl.exitcodes import Exit


def add_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--disk",
        type=Path,
        metavar="DEVICE_OR_FILE",
        help="the whole disk to erase (/dev/disk/by-id/... is safest) or a disk image file",
    )
    where.add_argument(
        "--first-disk",
        action="store_true",
        help="use the only non-removable, unmounted disk; refused if there is not exactly one",
    )
    parser.add_argument(
        "--release",
        required=True,
        metavar="META",
        help="the first release: s3://bucket/prefix/name.meta, https://.../name.meta or a path",
    )
    parser.add_argument("--firmware", choices=["bios", "uefi", "both"], default="both")
    parser.add_argument(
        "--slot-size", metavar="SIZE", help="size of each slot (e.g. 4G); default 1.5x the image"
    )
    parser.add_argument(
        "--rw-size",
        metavar="SIZE",
        help="size of the rw partition; default the rest of the disk (256M for a new image file)",
    )
    parser.add_argument(
        "--pubkey",
        action="append",
        default=[],
        metavar="KEY",
        help="trusted minisign public key (.pub file or base64 line); repeatable",
    )
    parser.add_argument("--endpoint", help="S3 endpoint URL")
    parser.add_argument("--region", default="us-east-1", help="S3 region")
    parser.add_argument("--anonymous", action="store_true", help="read a public bucket")
    parser.add_argument(
        "--grub-bios-dir",
        type=Path,
        default=os.environ.get("ORGANIXM_GRUB_BIOS_DIR"),
        help="GRUB i386-pc modules (default $ORGANIXM_GRUB_BIOS_DIR, else /usr/lib/grub/i386-pc)",
    )
    parser.add_argument(
        "--grub-efi-dir",
        type=Path,
        default=os.environ.get("ORGANIXM_GRUB_EFI_DIR"),
        help="GRUB x86_64-efi modules (default $ORGANIXM_GRUB_EFI_DIR, else "
        "/usr/lib/grub/x86_64-efi)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    parser.add_argument("--yes", action="store_true", help="do not ask for confirmation")


def _confirm(target: Path) -> bool:
    if not sys.stdin.isatty():
        print(
            "organixctl provision: not on a terminal; pass --yes to erase without asking",
            file=sys.stderr,
        )
        return False
    answer = input(f"Type the target path ({target}) to erase it and install: ")
    return answer.strip() == str(target)


def run(args: argparse.Namespace) -> int:
    import asyncio

    from organixmd.base.errors import OrganixmError

    try:
        return asyncio.run(_provision(args))
    except OrganixmError as exc:
        print(f"organixctl provision: {exc}", file=sys.stderr)
        return Exit.ERROR


async def _provision(args: argparse.Namespace) -> int:
    import asyncio
    import time

    from organixctl.provisioner import provision
    from organixmd.release.sources import open_source
    from organixmd.release.trust import fetch_release, load_keys, source_config

    target: Path = provision.choose_first_disk() if args.first_disk else args.disk
    provision.check_not_in_use(target)
    config = source_config(
        args.release, endpoint=args.endpoint, region=args.region, anonymous=args.anonymous
    )
    keys = load_keys(args.pubkey)
    async with open_source(config) as source:
        trusted = await fetch_release(source, keys)
        assert trusted is not None  # noqa: S101 - an unconditional fetch returns the meta
        release, verified = trusted.release, trusted.verified
        plan = provision.make_plan(
            target,
            release,
            firmware=args.firmware,
            slot_size=provision.parse_size(args.slot_size) if args.slot_size else None,
            rw_size=provision.parse_size(args.rw_size) if args.rw_size else None,
        )
        print(plan.describe())
        if verified is None:
            print("signature: not checked (no --pubkey given)")
        else:
            print(f"signature: ok (key {verified.key_id_hex})")
        if args.dry_run:
            print("dry run: nothing was changed")
            return Exit.OK
        if not args.yes and not _confirm(target):
            print("organixctl provision: not confirmed; nothing was changed", file=sys.stderr)
            return Exit.ERROR
        started = time.monotonic()
        try:
            print("writing partition table, GRUB, boot and rw file systems ...", flush=True)
            await asyncio.to_thread(
                provision.write_layout, plan, args.grub_bios_dir, args.grub_efi_dir
            )
            print(f"streaming {release.describe()} into slot a ...", flush=True)
            result = await provision.write_release(plan, source)
        except BaseException:
            if plan.create_file:
                # An image file this run created is half-made: remove it, nothing is lost.
                await asyncio.to_thread(target.unlink, missing_ok=True)
            raise
    print(
        f"done in {time.monotonic() - started:.1f}s: {target} boots slot a "
        f"({release.describe()}, sha256 {result.sha256[:16]}..., verified on the device)"
    )
    return Exit.OK
