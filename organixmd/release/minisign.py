"""Minisign-compatible Ed25519 keys and signatures.

Reads and writes the file formats of the stock ``minisign`` tool (version 0.10 and
later) byte for byte, so operators can sign releases with either ``minisign -S`` or
``organixctl`` and hosts can verify both:

* public key: ``untrusted comment: ...`` line, then base64 of
  ``"Ed" || key id (8 bytes) || Ed25519 public key (32 bytes)``. The base64 line alone
  is what ``minisign -P`` and the daemon's ``public_keys`` setting take.
* secret key: comment line, then base64 of ``"Ed" || kdf ("Sc" or two NUL bytes) ||
  "B2" || salt (32) || opslimit (u64 LE) || memlimit (u64 LE) || key id (8) ||
  Ed25519 secret key (64) || checksum (32)``; the last 104 bytes are XORed with a
  scrypt(N, r=8, p) stream derived from the password when the kdf is ``Sc``, and the
  checksum is BLAKE2b-256 over ``"Ed" || key id || secret key``.
* signature (``.minisig``): four lines: untrusted comment; base64 of
  ``algorithm || key id || Ed25519 signature``, where algorithm ``ED`` signs the
  BLAKE2b-512 digest of the data (minisign's default since 0.8) and the legacy ``Ed``
  signs the data itself; ``trusted comment: ...``; base64 of a second Ed25519
  signature over ``signature || trusted comment`` (the global signature).

Key ids are shown as minisign shows them: the 8 bytes read as a little-endian
integer, 16 upper-case hex digits.

Everything here is synchronous and CPU-bound (the scrypt derivation of an encrypted
secret key takes seconds and 1 GiB of memory at minisign's parameters); async
callers run it in a worker thread.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import os
import struct
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from organixmd.base.errors import KeyFileError, SignatureError

__all__ = [
    "MAX_KEY_FILE_BYTES",
    "MAX_SIGNATURE_BYTES",
    "PublicKey",
    "SecretKey",
    "Verified",
    "load_signature",
    "verify",
]

SIGALG = b"Ed"
SIGALG_HASHED = b"ED"
KDF_SCRYPT = b"Sc"
KDF_NONE = b"\x00\x00"
CHK_BLAKE2B = b"B2"

UNTRUSTED_PREFIX = b"untrusted comment: "
TRUSTED_PREFIX = b"trusted comment: "

#: A .minisig larger than this is refused before it is parsed (or, from a file,
#: before it is read). minisign's own limits add up to about 9.3 KiB.
MAX_SIGNATURE_BYTES = 64 * 1024
#: Key files are a comment line (at most 1 KiB) and one base64 line.
MAX_KEY_FILE_BYTES = 16 * 1024

# minisign reads comment lines with fgets() into buffers of these sizes (including
# the newline and the terminating NUL); longer lines are refused there, so they are
# refused here too and never written.
_COMMENT_LINE_MAX = 1024 - 2
_TRUSTED_LINE_MAX = 8192 - 2
_PASSWORD_MAX = 1024 - 2

_KEY_ID_BYTES = 8
_PK_BYTES = 32
_SK_BYTES = 64
_SIG_BYTES = 64
_CHK_BYTES = 32
_SALT_BYTES = 32
_PUBLIC_STRUCT = struct.Struct(f"<2s{_KEY_ID_BYTES}s{_PK_BYTES}s")
_SIG_STRUCT = struct.Struct(f"<2s{_KEY_ID_BYTES}s{_SIG_BYTES}s")
# sig_alg, kdf_alg, chk_alg, salt, opslimit, memlimit, then the (maybe encrypted) tail.
_SECRET_HEAD = struct.Struct(f"<2s2s2s{_SALT_BYTES}sQQ")
_SECRET_TAIL_BYTES = _KEY_ID_BYTES + _SK_BYTES + _CHK_BYTES
_SECRET_BYTES = _SECRET_HEAD.size + _SECRET_TAIL_BYTES

#: libsodium's crypto_pwhash_scryptsalsa208sha256 OPSLIMIT/MEMLIMIT_SENSITIVE, the
#: parameters ``minisign -G`` uses: scrypt N=2**20, r=8, p=1 (1 GiB, a few seconds).
SCRYPT_OPSLIMIT_SENSITIVE = 33554432
SCRYPT_MEMLIMIT_SENSITIVE = 1073741824
# hashlib.scrypt cannot use more memory than this (OpenSSL takes an int).
_SCRYPT_MAXMEM = 2**31 - 1
# Refuse absurd work factors from a damaged key file instead of spinning for hours.
_SCRYPT_OPSLIMIT_MAX = 2**40

DEFAULT_SIGNATURE_COMMENT = "signature from minisign secret key"


def _key_id_hex(key_id: bytes) -> str:
    """The key id as minisign prints it: ``%PRIX64`` of the little-endian id, no zero padding."""
    return f"{int.from_bytes(key_id, 'little'):X}"


def _b64decode(line: bytes, size: int) -> bytes | None:
    """Strict base64 of exactly ``size`` bytes, or None."""
    try:
        raw = base64.b64decode(line, validate=True)
    except binascii.Error:
        return None
    return raw if len(raw) == size else None


def _b64encode(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _lines(data: bytes) -> list[bytes]:
    """Split like minisign's fgets()+trim(): lines end at LF, a CR before it is dropped."""
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return [line.removesuffix(b"\r") for line in lines]


def _read_bounded(path: Path, limit: int, what: str) -> bytes:
    """Read a whole small file, refusing one larger than ``limit`` without reading it."""
    try:
        with path.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size > limit:
                raise KeyFileError(
                    f"{what} {path} is {size} bytes, more than the {limit} a key file can be",
                    hint="point the setting at the minisign key file itself",
                )
            data = handle.read(limit + 1)
    except OSError as exc:
        raise KeyFileError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    if len(data) > limit:
        raise KeyFileError(f"{what} {path} grew beyond {limit} bytes while being read")
    return data


def _write_file(path: Path, text: str, *, mode: int, overwrite: bool, what: str) -> None:
    """Write ``text`` to ``path`` with ``mode``, atomically (temporary file + rename/link).

    With ``overwrite`` false an existing file is never replaced, even one created by
    someone else between our check and our write (the final step is ``link``, which
    fails if the name exists).
    """
    path = Path(path)
    directory = path.parent
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=directory)
    except OSError as exc:
        raise KeyFileError(
            f"cannot write {what} {path}: {exc.strerror or exc}",
            hint="check that the directory exists and is writable",
        ) from exc
    tmp = Path(tmp_name)
    try:
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                # mkstemp made the file 0600; a public key is then opened up to ``mode``.
                os.fchmod(handle.fileno(), mode)
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            if overwrite:
                tmp.replace(path)
            else:
                os.link(tmp, path)
        except FileExistsError as exc:
            raise KeyFileError(
                f"{what} {path} already exists; refusing to overwrite it",
                hint="choose another path, or remove the old key pair first",
            ) from exc
        except OSError as exc:
            raise KeyFileError(f"cannot write {what} {path}: {exc.strerror or exc}") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    # The rename or link is durable only once the directory entry is on disk.
    with contextlib.suppress(OSError):
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _check_comment(comment: str, prefix: bytes, limit: int, what: str) -> bytes:
    raw = comment.encode("utf-8")
    if b"\n" in raw or b"\r" in raw:
        raise SignatureError(f"the {what} must be a single line", hint="remove the line breaks")
    if len(prefix) + len(raw) > limit:
        raise SignatureError(
            f"the {what} is {len(raw)} bytes; minisign accepts at most {limit - len(prefix)}",
            hint="shorten it",
        )
    return raw


@dataclass(frozen=True, eq=False, repr=False)
class PublicKey:
    """A minisign public key: an 8-byte key id and an Ed25519 public key.

    Equal (and hashing equal) when key id and key bytes are equal.
    """

    key_id: bytes
    key: Ed25519PublicKey

    def _identity(self) -> tuple[bytes, bytes]:
        return self.key_id, self.key.public_bytes_raw()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PublicKey):
            return NotImplemented
        return self._identity() == other._identity()

    def __hash__(self) -> int:
        return hash(self._identity())

    def __repr__(self) -> str:
        return f"PublicKey(key_id_hex={self.key_id_hex!r}, base64={self.to_base64()!r})"

    @property
    def key_id_hex(self) -> str:
        """The key id as minisign prints it (``minisign public key 89307496B0FAF3D5``)."""
        return _key_id_hex(self.key_id)

    @classmethod
    def parse(cls, text: str) -> PublicKey:
        """Parse a public key file's text, or the bare base64 line alone.

        Raises :class:`KeyFileError` naming what is wrong.
        """
        if len(text) > MAX_KEY_FILE_BYTES:
            raise KeyFileError(f"public key text is {len(text)} characters long, too long")
        lines = [line.strip() for line in _lines(text.encode("utf-8")) if line.strip()]
        if not lines:
            raise KeyFileError("public key is empty")
        # minisign never checks the comment line's prefix; we only use it to tell the
        # file form from the bare base64 line.
        expected = 2 if lines[0].startswith(UNTRUSTED_PREFIX.rstrip()) else 1
        if len(lines) != expected:
            raise KeyFileError(
                "public key must be a comment line and one base64 line, or the base64 line"
                f" alone; found {len(lines)} lines"
            )
        key_line = lines[-1]
        raw = _b64decode(key_line, _PUBLIC_STRUCT.size)
        if raw is None:
            shown = key_line[:60].decode("utf-8", "replace")
            raise KeyFileError(
                f"public key {shown!r} is not the base64 of a {_PUBLIC_STRUCT.size}-byte"
                " minisign public key",
                hint="copy the second line of the minisign .pub file (it starts with 'RW')",
            )
        alg, key_id, key = _PUBLIC_STRUCT.unpack(raw)
        if alg != SIGALG:
            raise KeyFileError(
                f"public key has algorithm {alg!r}; minisign public keys have {SIGALG!r}"
            )
        return cls(key_id=key_id, key=Ed25519PublicKey.from_public_bytes(key))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PublicKey:
        """Read a minisign public key file (``minisign -G -p``'s output)."""
        path = Path(path)
        data = _read_bounded(path, MAX_KEY_FILE_BYTES, "public key file")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise KeyFileError(f"public key file {path} is not text") from exc
        try:
            return cls.parse(text)
        except KeyFileError as exc:
            raise KeyFileError(f"{path}: {exc.message}", hint=exc.instance_hint) from exc

    def to_base64(self) -> str:
        """The bare base64 line, as ``minisign -P`` and ``public_keys`` take it."""
        raw_key = self.key.public_bytes(Encoding.Raw, PublicFormat.Raw)
        return _b64encode(_PUBLIC_STRUCT.pack(SIGALG, self.key_id, raw_key))

    def to_file_text(self, comment: str | None = None) -> str:
        """The public key file's content; the comment defaults to minisign's."""
        if comment is None:
            comment = f"minisign public key {self.key_id_hex}"
        raw_comment = _check_comment(
            comment, UNTRUSTED_PREFIX, _COMMENT_LINE_MAX, "public key comment"
        )
        return f"{UNTRUSTED_PREFIX.decode()}{raw_comment.decode()}\n{self.to_base64()}\n"

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = True) -> None:
        """Write the public key file (mode 0644), atomically."""
        _write_file(
            Path(path),
            self.to_file_text(),
            mode=0o644,
            overwrite=overwrite,
            what="public key file",
        )


def _scrypt_params(opslimit: int, memlimit: int) -> tuple[int, int, int]:
    """(N, r, p) as libsodium's crypto_pwhash_scryptsalsa208sha256 picks them."""
    opslimit = max(opslimit, 32768)
    r = 8
    memory_bound = opslimit >= memlimit // 32
    max_n = memlimit // (r * 128) if memory_bound else opslimit // (r * 4)
    n_log2 = 1
    while n_log2 < 63 and (1 << n_log2) <= max_n // 2:
        n_log2 += 1
    p = 1
    if memory_bound:
        p = min((opslimit // 4) // (1 << n_log2), 0x3FFFFFFF) // r
    return 1 << n_log2, r, p


def _scrypt_stream(password: bytes, salt: bytes, opslimit: int, memlimit: int) -> bytes:
    if opslimit > _SCRYPT_OPSLIMIT_MAX:
        raise KeyFileError(f"secret key asks for an absurd scrypt opslimit ({opslimit})")
    n, r, p = _scrypt_params(opslimit, memlimit)
    # OpenSSL needs 128*r*(N+2) bytes for V plus 128*r*p for B; a little slack on top.
    needed = 128 * r * (n + 2) + 128 * r * p + (1 << 20)
    if needed > _SCRYPT_MAXMEM or p < 1:
        raise KeyFileError(
            f"secret key's scrypt parameters (N={n}, r={r}, p={p}) are outside what this"
            " host can derive",
            hint="re-encrypt the key with `minisign -C` on a current minisign",
        )
    try:
        return hashlib.scrypt(
            password, salt=salt, n=n, r=r, p=p, maxmem=needed, dklen=_SECRET_TAIL_BYTES
        )
    except (ValueError, MemoryError) as exc:
        raise KeyFileError(
            f"scrypt key derivation failed (N={n}, r={r}, p={p}): {exc}",
            hint="the derivation needs about 1 GiB of free memory",
        ) from exc


def _checksum(key_id: bytes, secret: bytes) -> bytes:
    return hashlib.blake2b(SIGALG + key_id + secret, digest_size=_CHK_BYTES).digest()


def _xor(left: bytes, right: bytes) -> bytes:
    return bytes(a ^ b for a, b in zip(left, right, strict=True))


def _check_password(password: bytes) -> None:
    # minisign reads passwords as one C-string line, so these bytes cannot be part of one.
    if not password:
        raise KeyFileError("the password is empty", hint="pass None for an unencrypted key")
    if any(byte in password for byte in b"\x00\r\n"):
        raise KeyFileError("the password contains a NUL or line break; minisign cannot read it")
    if len(password) > _PASSWORD_MAX:
        raise KeyFileError(f"the password is longer than minisign's {_PASSWORD_MAX} bytes")


class SecretKey:
    """A minisign secret key. Its repr never shows key material."""

    __slots__ = ("_private", "key_id")

    def __init__(self, key_id: bytes, private_key: Ed25519PrivateKey) -> None:
        if len(key_id) != _KEY_ID_BYTES:
            raise ValueError(f"key id must be {_KEY_ID_BYTES} bytes, got {len(key_id)}")
        self.key_id = key_id
        self._private = private_key

    def __repr__(self) -> str:
        return f"SecretKey(key_id_hex={self.key_id_hex!r})"

    @property
    def key_id_hex(self) -> str:
        return _key_id_hex(self.key_id)

    @classmethod
    def generate(cls) -> SecretKey:
        """A new key pair with a random key id, as ``minisign -G`` makes one."""
        return cls(os.urandom(_KEY_ID_BYTES), Ed25519PrivateKey.generate())

    def public_key(self) -> PublicKey:
        return PublicKey(key_id=self.key_id, key=self._private.public_key())

    def _secret_bytes(self) -> bytes:
        """libsodium's 64-byte Ed25519 secret key: seed || public key."""
        seed = self._private.private_bytes_raw()
        return seed + self._private.public_key().public_bytes_raw()

    @classmethod
    def load(cls, path: str | os.PathLike[str], password: bytes | None = None) -> SecretKey:
        """Read a minisign secret key file, decrypting it with ``password`` if encrypted.

        An unencrypted key (``minisign -G -W``) ignores ``password``. Raises
        :class:`KeyFileError` for a malformed file, a missing or wrong password, or
        an unsupported algorithm.
        """
        path = Path(path)
        lines = _lines(_read_bounded(path, MAX_KEY_FILE_BYTES, "secret key file"))
        if len(lines) < 2 or not lines[0].startswith(UNTRUSTED_PREFIX):
            raise KeyFileError(
                f"secret key file {path} is not a minisign secret key"
                " (expected an 'untrusted comment:' line and a base64 line)"
            )
        raw = _b64decode(lines[1].strip(), _SECRET_BYTES)
        if raw is None:
            raise KeyFileError(
                f"secret key file {path}: the key line is not the base64 of a"
                f" {_SECRET_BYTES}-byte minisign secret key"
            )
        sig_alg, kdf_alg, chk_alg, salt, opslimit, memlimit = _SECRET_HEAD.unpack_from(raw)
        tail = raw[_SECRET_HEAD.size :]
        if sig_alg != SIGALG:
            raise KeyFileError(
                f"secret key file {path}: unsupported signature algorithm {sig_alg!r}"
            )
        if chk_alg != CHK_BLAKE2B:
            raise KeyFileError(f"secret key file {path}: unsupported checksum function {chk_alg!r}")
        if kdf_alg == KDF_SCRYPT:
            if password is None:
                raise KeyFileError(
                    f"secret key file {path} is encrypted and no password was given",
                    hint="pass the password (for organixctl: --password-file)",
                )
            tail = _xor(tail, _scrypt_stream(password, salt, opslimit, memlimit))
        elif kdf_alg != KDF_NONE:
            raise KeyFileError(
                f"secret key file {path}: unsupported key derivation function {kdf_alg!r}"
            )
        key_id = tail[:_KEY_ID_BYTES]
        secret = tail[_KEY_ID_BYTES : _KEY_ID_BYTES + _SK_BYTES]
        chk = tail[_KEY_ID_BYTES + _SK_BYTES :]
        expected = _checksum(key_id, secret)
        # minisign -G -W leaves the checksum of an unencrypted key zeroed; minisign -C -W
        # keeps the real one. Both are valid files.
        unchecked = kdf_alg == KDF_NONE and chk == bytes(_CHK_BYTES)
        if not unchecked and not hmac.compare_digest(chk, expected):
            if kdf_alg == KDF_SCRYPT:
                raise KeyFileError(
                    f"wrong password for secret key file {path}", hint="check the password"
                )
            raise KeyFileError(f"secret key file {path} is corrupted (checksum mismatch)")
        private = Ed25519PrivateKey.from_private_bytes(secret[:32])
        if private.public_key().public_bytes_raw() != secret[32:]:
            raise KeyFileError(
                f"secret key file {path} is corrupted (its public half does not match)"
            )
        return cls(key_id, private)

    def to_file_text(
        self,
        password: bytes | None,
        *,
        comment: str | None = None,
        kdf_opslimit: int = SCRYPT_OPSLIMIT_SENSITIVE,
        kdf_memlimit: int = SCRYPT_MEMLIMIT_SENSITIVE,
    ) -> str:
        """The secret key file's content, encrypted with ``password`` unless it is None.

        The scrypt parameters default to minisign's; lower ones are for tests only.
        """
        secret = self._secret_bytes()
        tail = self.key_id + secret + _checksum(self.key_id, secret)
        if password is None:
            head = _SECRET_HEAD.pack(SIGALG, KDF_NONE, CHK_BLAKE2B, bytes(_SALT_BYTES), 0, 0)
            default_comment = "minisign unencrypted secret key"
        else:
            _check_password(password)
            salt = os.urandom(_SALT_BYTES)
            head = _SECRET_HEAD.pack(
                SIGALG, KDF_SCRYPT, CHK_BLAKE2B, salt, kdf_opslimit, kdf_memlimit
            )
            tail = _xor(tail, _scrypt_stream(password, salt, kdf_opslimit, kdf_memlimit))
            default_comment = "minisign encrypted secret key"
        raw_comment = _check_comment(
            comment if comment is not None else default_comment,
            UNTRUSTED_PREFIX,
            _COMMENT_LINE_MAX,
            "secret key comment",
        )
        return f"{UNTRUSTED_PREFIX.decode()}{raw_comment.decode()}\n{_b64encode(head + tail)}\n"

    def save(
        self,
        path: str | os.PathLike[str],
        password: bytes | None,
        *,
        overwrite: bool = True,
        kdf_opslimit: int = SCRYPT_OPSLIMIT_SENSITIVE,
        kdf_memlimit: int = SCRYPT_MEMLIMIT_SENSITIVE,
    ) -> None:
        """Write the secret key file with mode 0600, atomically.

        The file is created 0600 from the start, so the key is never readable by
        others, not even briefly. With ``overwrite`` false an existing file is kept
        and :class:`KeyFileError` raised.
        """
        text = self.to_file_text(password, kdf_opslimit=kdf_opslimit, kdf_memlimit=kdf_memlimit)
        _write_file(Path(path), text, mode=0o600, overwrite=overwrite, what="secret key file")

    def sign(
        self,
        data: bytes,
        trusted_comment: str,
        untrusted_comment: str = DEFAULT_SIGNATURE_COMMENT,
        *,
        prehash: bool = True,
    ) -> bytes:
        """The whole ``.minisig`` content for ``data``.

        ``prehash`` (the default, algorithm ``ED``) signs the BLAKE2b-512 digest of the
        data, like current minisign; ``prehash=False`` writes the legacy ``Ed`` form.
        """
        raw_trusted = _check_comment(
            trusted_comment, TRUSTED_PREFIX, _TRUSTED_LINE_MAX, "trusted comment"
        )
        raw_untrusted = _check_comment(
            untrusted_comment, UNTRUSTED_PREFIX, _COMMENT_LINE_MAX, "untrusted comment"
        )
        if prehash:
            alg, message = SIGALG_HASHED, hashlib.blake2b(data, digest_size=64).digest()
        else:
            alg, message = SIGALG, data
        signature = self._private.sign(message)
        global_signature = self._private.sign(signature + raw_trusted)
        sig_line = base64.b64encode(_SIG_STRUCT.pack(alg, self.key_id, signature))
        return b"".join(
            [
                UNTRUSTED_PREFIX + raw_untrusted + b"\n",
                sig_line + b"\n",
                TRUSTED_PREFIX + raw_trusted + b"\n",
                base64.b64encode(global_signature) + b"\n",
            ]
        )


@dataclass(frozen=True)
class Verified:
    """What a valid signature vouches for: which key signed, and its trusted comment."""

    key_id_hex: str
    trusted_comment: str


def load_signature(path: str | os.PathLike[str]) -> bytes:
    """Read a ``.minisig`` file, refusing one over :data:`MAX_SIGNATURE_BYTES` unread."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size > MAX_SIGNATURE_BYTES:
                raise SignatureError(_oversized(size, f"signature file {path}"))
            data = handle.read(MAX_SIGNATURE_BYTES + 1)
    except OSError as exc:
        raise SignatureError(
            f"cannot read signature file {path}: {exc.strerror or exc}",
            hint="publish the signature next to the meta as <object>.meta.minisig",
        ) from exc
    if len(data) > MAX_SIGNATURE_BYTES:
        raise SignatureError(_oversized(len(data), f"signature file {path}"))
    return data


def _oversized(size: int, what: str) -> str:
    return (
        f"{what} is {size} bytes, more than the {MAX_SIGNATURE_BYTES} a minisign"
        " signature can be; refusing to parse it"
    )


def _malformed(detail: str) -> SignatureError:
    return SignatureError(
        f"malformed minisign signature: {detail}",
        hint="the .minisig must be the four lines minisign -S writes; re-sign the release",
    )


def verify(
    data: bytes,
    signature: bytes,
    keys: Sequence[PublicKey],
    *,
    allow_legacy: bool = True,
) -> Verified:
    """Check a ``.minisig`` over ``data`` against trusted ``keys``, as ``minisign -V`` does.

    The signature must be made by one of ``keys`` (matched by key id), the data
    signature must hold (algorithm ``ED`` over the BLAKE2b-512 digest, or legacy ``Ed``
    over the data unless ``allow_legacy`` is false), and the global signature must
    hold over the signature and the trusted comment, which only then is returned.
    Raises :class:`SignatureError` naming the problem otherwise. Pure and
    thread-safe; cost is one BLAKE2b pass over ``data`` and two Ed25519 checks.
    """
    if len(signature) > MAX_SIGNATURE_BYTES:
        raise SignatureError(_oversized(len(signature), "the signature"))
    if not keys:
        raise SignatureError(
            "no trusted public keys to verify the signature with",
            hint="configure at least one minisign public key",
        )
    lines = _lines(signature)
    if len(lines) < 4:
        raise _malformed(f"expected 4 lines, found {len(lines)}")
    if any(line.strip() for line in lines[4:]):
        raise _malformed(f"expected 4 lines, found {len(lines)} non-empty ones")
    untrusted_line, sig_line, trusted_line, global_line = lines[:4]
    if not untrusted_line.startswith(UNTRUSTED_PREFIX):
        raise _malformed("line 1 does not start with 'untrusted comment: '")
    if len(untrusted_line) > _COMMENT_LINE_MAX:
        raise _malformed(f"the untrusted comment is longer than {_COMMENT_LINE_MAX} bytes")
    raw_sig = _b64decode(sig_line.strip(), _SIG_STRUCT.size)
    if raw_sig is None:
        raise _malformed(f"line 2 is not the base64 of a {_SIG_STRUCT.size}-byte signature")
    alg, key_id, sig = _SIG_STRUCT.unpack(raw_sig)
    if alg == SIGALG_HASHED:
        message = hashlib.blake2b(data, digest_size=64).digest()
    elif alg == SIGALG:
        if not allow_legacy:
            raise SignatureError(
                "legacy (not prehashed) 'Ed' signature refused",
                hint="re-sign with a current minisign (without -l)",
            )
        message = data
    else:
        shown = alg.decode("latin-1")
        raise SignatureError(
            f"unknown signature algorithm {shown!r}; minisign signatures use 'ED' or 'Ed'",
            hint="sign with minisign or organixctl",
        )
    if not trusted_line.startswith(TRUSTED_PREFIX):
        raise _malformed("line 3 does not start with 'trusted comment: '")
    if len(trusted_line) > _TRUSTED_LINE_MAX:
        raise _malformed(f"the trusted comment is longer than {_TRUSTED_LINE_MAX} bytes")
    trusted = trusted_line[len(TRUSTED_PREFIX) :]
    global_sig = _b64decode(global_line.strip(), _SIG_BYTES)
    if global_sig is None:
        raise _malformed(f"line 4 is not the base64 of a {_SIG_BYTES}-byte signature")
    key = next((candidate for candidate in keys if candidate.key_id == key_id), None)
    if key is None:
        trusted_ids = ", ".join(candidate.key_id_hex for candidate in keys)
        raise SignatureError(
            f"signed by key id {_key_id_hex(key_id)}, which is not a trusted key"
            f" (trusted: {trusted_ids})",
            hint="sign with a trusted key, or add this key's public key to the configuration",
        )
    try:
        key.key.verify(sig, message)
    except InvalidSignature as exc:
        raise SignatureError(
            f"signature by key {key.key_id_hex} does not match the data: the data was"
            " altered after signing, or signed by another key claiming this key id",
            hint="re-publish and re-sign the release; do not trust this copy",
        ) from exc
    try:
        key.key.verify(global_sig, sig + trusted)
    except InvalidSignature as exc:
        raise SignatureError(
            f"global signature by key {key.key_id_hex} does not match: the trusted"
            " comment was altered after signing",
            hint="re-sign the release; do not trust this copy",
        ) from exc
    return Verified(key_id_hex=key.key_id_hex, trusted_comment=trusted.decode("utf-8", "replace"))
