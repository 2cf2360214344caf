"""``organixctl keygen``: write a minisign-compatible Ed25519 key pair.

The secret key stays with whoever publishes releases (never on a host); the public
key, or its one base64 line, goes into the daemon configuration as a trusted key.
The files are the same as ``minisign -G`` writes, so either tool can use them.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path

from organixctl.exitcodes import Exit


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--secret-key",
        required=True,
        type=Path,
        metavar="PATH",
        help="where to write the secret key (mode 0600); keep it off the hosts",
    )
    parser.add_argument(
        "--public-key",
        required=True,
        type=Path,
        metavar="PATH",
        help="where to write the public key file",
    )
    password = parser.add_mutually_exclusive_group()
    password.add_argument(
        "--password-file",
        type=Path,
        metavar="FILE",
        help="encrypt the secret key with the password on this file's first line"
        " (scrypt, as minisign does); without this or --no-password, ask on the terminal",
    )
    password.add_argument(
        "--no-password",
        action="store_true",
        help="write the secret key unencrypted (like minisign -W), e.g. for a CI secret store",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="overwrite existing key files (the old key pair is lost)",
    )


def _fail(message: str, code: int = Exit.ERROR) -> int:
    print(f"organixctl keygen: {message}", file=sys.stderr)
    return code


def _password_from_file(path: Path) -> bytes | str:
    """The first line of ``path`` (as minisign reads a password), or an error message."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return f"cannot read password file {path}: {exc.strerror or exc}"
    password = data.split(b"\n", 1)[0].removesuffix(b"\r")
    if not password:
        return f"password file {path} has an empty first line; use --no-password for no password"
    return password


def _password_from_terminal() -> bytes | str:
    if not sys.stdin.isatty():
        return "no password given: pass --password-file FILE, or --no-password"
    first = getpass.getpass("Password for the new secret key: ")
    second = getpass.getpass("Password (again): ")
    if first != second:
        return "the passwords do not match; nothing was written"
    if not first:
        return "empty password; use --no-password for an unencrypted key"
    return first.encode("utf-8")


def run(args: argparse.Namespace) -> int:
    from organixmd.base.errors import OrganixmError
    from organixmd.release.minisign import SecretKey

    secret_path: Path = args.secret_key
    public_path: Path = args.public_key
    if secret_path.resolve() == public_path.resolve():
        return _fail("--secret-key and --public-key name the same file", Exit.USAGE)
    if not args.force:
        # Checked up front so no password is asked for nothing; the writes below
        # still refuse to replace a file that appears meanwhile.
        for path in (secret_path, public_path):
            if path.exists():
                return _fail(
                    f"{path} already exists; pass --force to overwrite it"
                    " (the old key pair is lost)"
                )

    password: bytes | None
    if args.no_password:
        password = None
    else:
        got = (
            _password_from_file(args.password_file)
            if args.password_file is not None
            else _password_from_terminal()
        )
        if isinstance(got, str):
            return _fail(got)
        password = got

    secret = SecretKey.generate()
    public = secret.public_key()
    if password is not None:
        print("deriving the encryption key with scrypt (about 1 GiB, a few seconds)...")
    try:
        secret.save(secret_path, password, overwrite=args.force)
    except OrganixmError as exc:
        return _fail(str(exc))
    try:
        public.save(public_path, overwrite=args.force)
    except OrganixmError as exc:
        return _fail(
            f"{exc}; the secret key was written to {secret_path}, and"
            f" `minisign -R -s {secret_path} -p PATH` recreates its public key"
        )

    protection = "encrypted with scrypt" if password is not None else "NOT encrypted"
    print(f"secret key written to {secret_path} (mode 0600, {protection}); keep it off the hosts")
    print(f"public key written to {public_path}")
    print(f"key id: {public.key_id_hex}")
    print()
    print("trusted key for the daemon configuration ([source] public_keys):")
    print(f"  {public.to_base64()}")
    return Exit.OK
