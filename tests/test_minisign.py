"""Minisign interoperability and refusal tests, against the real ``minisign`` binary."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from organixctl.cli import main as organixctl_main
from organixctl.exitcodes import Exit
from organixmd.base.errors import KeyFileError, SignatureError
from organixmd.release.minisign import (
    MAX_SIGNATURE_BYTES,
    PublicKey,
    SecretKey,
    Verified,
    load_signature,
    verify,
)

# A release descriptor's bytes; what is signed is opaque to the signature code.
META = json.dumps(
    {"schema": "organixm.meta/1", "version": "2026.11.26", "serial": 42},
    indent=2,
).encode()

# Cheap scrypt parameters (N=2**10) for tests that only exercise our own code paths;
# the interop tests use minisign's real ones (N=2**20, 1 GiB).
FAST_OPSLIMIT = 32768
FAST_MEMLIMIT = 1 << 20


@pytest.fixture(scope="session")
def minisign() -> str:
    """Path of the system minisign (0.10 or later: -W and -l); a missing one fails the test."""
    path = shutil.which("minisign")
    if path is None:
        pytest.fail("minisign is not installed: run `make deps` (Debian package minisign)")
    out = subprocess.run([path, "-v"], capture_output=True, text=True, check=True, timeout=10)
    match = re.search(r"minisign (\d+)\.(\d+)", out.stdout + out.stderr)
    assert match, f"unexpected `minisign -v` output: {out.stdout!r}"
    assert (int(match[1]), int(match[2])) >= (0, 10), f"minisign too old: {match[0]}"
    return path


def run(
    *args: str | Path, stdin: bytes | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(arg) for arg in args],
        input=stdin.decode() if stdin is not None else None,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if check and result.returncode != 0:
        pytest.fail(f"{args} failed ({result.returncode}): {result.stdout}{result.stderr}")
    return result


@pytest.fixture
def minisign_pair(minisign: str, tmp_path: Path) -> tuple[Path, Path]:
    """An unencrypted key pair made by ``minisign -G -W``: (secret key, public key)."""
    secret, public = tmp_path / "ms.key", tmp_path / "ms.pub"
    run(minisign, "-G", "-W", "-s", secret, "-p", public)
    return secret, public


@pytest.fixture
def meta_file(tmp_path: Path) -> Path:
    path = tmp_path / "release.meta"
    path.write_bytes(META)
    return path


@pytest.fixture
def ours() -> SecretKey:
    return SecretKey.generate()


def signed_by_ours(key: SecretKey, comment: str = "serial:42") -> bytes:
    return key.sign(META, comment)


def sig_struct(signature: bytes) -> bytes:
    return base64.b64decode(signature.splitlines()[1])


def replace_line(signature: bytes, index: int, line: bytes) -> bytes:
    lines = signature.splitlines()
    lines[index] = line
    return b"\n".join(lines) + b"\n"


# --- minisign signs, we verify ------------------------------------------------------


def test_minisign_prehashed_signature_verifies(
    minisign: str, minisign_pair: tuple[Path, Path], meta_file: Path
) -> None:
    """A meta signed by `minisign -S` (prehashed ED) verifies, with the file or the bare line."""
    secret, public = minisign_pair
    run(minisign, "-S", "-s", secret, "-m", meta_file, "-t", "version:2026.11.26 serial:42")
    signature = load_signature(meta_file.with_suffix(".meta.minisig"))
    assert sig_struct(signature)[:2] == b"ED"

    from_file = PublicKey.load(public)
    bare_line = public.read_text().splitlines()[1]
    from_line = PublicKey.parse(bare_line)
    assert from_line == from_file
    shown_id = public.read_text().splitlines()[0].rsplit(" ", 1)[1]
    assert from_file.key_id_hex == shown_id

    for key in (from_file, from_line):
        assert verify(META, signature, [key]) == Verified(
            key_id_hex=shown_id, trusted_comment="version:2026.11.26 serial:42"
        )


def test_minisign_legacy_signature_verifies(
    minisign: str, minisign_pair: tuple[Path, Path], meta_file: Path
) -> None:
    """A legacy `minisign -S -l` (Ed) signature verifies, unless legacy is disallowed."""
    secret, public = minisign_pair
    run(minisign, "-S", "-l", "-s", secret, "-m", meta_file, "-t", "legacy")
    signature = meta_file.with_suffix(".meta.minisig").read_bytes()
    assert sig_struct(signature)[:2] == b"Ed"
    key = PublicKey.load(public)
    assert verify(META, signature, [key]).trusted_comment == "legacy"
    with pytest.raises(SignatureError, match="legacy"):
        verify(META, signature, [key], allow_legacy=False)


def test_minisign_signature_with_default_comment_verifies(
    minisign: str, minisign_pair: tuple[Path, Path], meta_file: Path
) -> None:
    """minisign's default trusted comment (timestamp, file name, hashed) comes back intact."""
    secret, public = minisign_pair
    run(minisign, "-S", "-s", secret, "-m", meta_file)
    signature = meta_file.with_suffix(".meta.minisig").read_bytes()
    comment = verify(META, signature, [PublicKey.load(public)]).trusted_comment
    assert re.fullmatch(r"timestamp:\d+\tfile:release\.meta\thashed", comment)


def test_minisign_unencrypted_secret_key_loads_and_signs(
    minisign: str, minisign_pair: tuple[Path, Path], meta_file: Path
) -> None:
    """A `minisign -G -W` secret key loads in our code, and minisign verifies what it signs."""
    secret, public = minisign_pair
    key = SecretKey.load(secret)
    assert key.public_key() == PublicKey.load(public)
    meta_file.with_suffix(".meta.minisig").write_bytes(key.sign(META, "signed by us"))
    out = run(minisign, "-V", "-p", public, "-m", meta_file)
    assert "Trusted comment: signed by us" in out.stdout


def test_minisign_encrypted_secret_key_loads(minisign: str, tmp_path: Path) -> None:
    """A password-protected `minisign -G` key decrypts with our scrypt; no password is refused."""
    secret, public = tmp_path / "enc.key", tmp_path / "enc.pub"
    run(minisign, "-G", "-s", secret, "-p", public, stdin=b"correct horse\ncorrect horse\n")
    assert base64.b64decode(secret.read_text().splitlines()[1])[2:4] == b"Sc"
    key = SecretKey.load(secret, b"correct horse")
    assert key.public_key() == PublicKey.load(public)
    with pytest.raises(KeyFileError, match="is encrypted and no password"):
        SecretKey.load(secret)


# --- we sign, minisign verifies ------------------------------------------------------


def test_our_signature_verifies_with_minisign(
    minisign: str, ours: SecretKey, tmp_path: Path, meta_file: Path
) -> None:
    """Our default (ED) .minisig passes `minisign -V -p pub -m file`, even with -H."""
    public = tmp_path / "ours.pub"
    ours.public_key().save(public)
    signature = ours.sign(META, "version:2026.11.26 serial:42")
    assert sig_struct(signature)[:2] == b"ED"
    meta_file.with_suffix(".meta.minisig").write_bytes(signature)
    out = run(minisign, "-V", "-H", "-p", public, "-m", meta_file)
    assert "Signature and comment signature verified" in out.stdout
    assert "Trusted comment: version:2026.11.26 serial:42" in out.stdout


def test_our_legacy_signature_verifies_with_minisign(
    minisign: str, ours: SecretKey, tmp_path: Path, meta_file: Path
) -> None:
    """Our legacy (Ed) .minisig passes `minisign -V`, and `-H` refuses it as minisign should."""
    signature = ours.sign(META, "legacy", prehash=False)
    assert sig_struct(signature)[:2] == b"Ed"
    meta_file.with_suffix(".meta.minisig").write_bytes(signature)
    bare = ours.public_key().to_base64()
    assert "Trusted comment: legacy" in run(minisign, "-V", "-P", bare, "-m", meta_file).stdout
    refused = run(minisign, "-V", "-H", "-P", bare, "-m", meta_file, check=False)
    assert refused.returncode != 0


def test_minisign_rejects_our_signature_over_other_data(
    minisign: str, ours: SecretKey, tmp_path: Path, meta_file: Path
) -> None:
    """minisign itself refuses our signature once the meta changed (the check is real)."""
    meta_file.with_suffix(".meta.minisig").write_bytes(ours.sign(META, "x"))
    meta_file.write_bytes(META.replace(b"42", b"43"))
    refused = run(minisign, "-V", "-P", ours.public_key().to_base64(), "-m", meta_file, check=False)
    assert refused.returncode != 0
    assert "Signature verification failed" in refused.stderr


def test_our_unencrypted_key_signs_with_minisign(
    minisign: str, tmp_path: Path, meta_file: Path
) -> None:
    """A key pair from `organixctl keygen --no-password` works with `minisign -S -s`."""
    secret, public = tmp_path / "k.key", tmp_path / "k.pub"
    code = organixctl_main(
        ["keygen", "--secret-key", str(secret), "--public-key", str(public), "--no-password"]
    )
    assert code == Exit.OK
    run(minisign, "-S", "-s", secret, "-m", meta_file, "-t", "from minisign")
    signature = meta_file.with_suffix(".meta.minisig").read_bytes()
    assert verify(META, signature, [PublicKey.load(public)]).trusted_comment == "from minisign"
    run(minisign, "-V", "-p", public, "-m", meta_file)


def test_our_encrypted_key_signs_with_minisign(
    minisign: str, tmp_path: Path, meta_file: Path
) -> None:
    """A password-protected keygen key decrypts in `minisign -S` (password on stdin)."""
    secret, public = tmp_path / "k.key", tmp_path / "k.pub"
    password_file = tmp_path / "password"
    password_file.write_text("tr0ub4dor&3\n")
    code = organixctl_main(
        [
            "keygen",
            "--secret-key",
            str(secret),
            "--public-key",
            str(public),
            "--password-file",
            str(password_file),
        ]
    )
    assert code == Exit.OK
    assert base64.b64decode(secret.read_text().splitlines()[1])[2:4] == b"Sc"
    run(minisign, "-S", "-s", secret, "-m", meta_file, "-t", "enc", stdin=b"tr0ub4dor&3\n")
    signature = meta_file.with_suffix(".meta.minisig").read_bytes()
    assert verify(META, signature, [PublicKey.load(public)]).trusted_comment == "enc"
    wrong = run(minisign, "-S", "-s", secret, "-m", meta_file, stdin=b"nope\n", check=False)
    assert wrong.returncode != 0
    assert "Wrong password" in wrong.stderr


# --- our own key files ----------------------------------------------------------------


def test_encrypted_secret_key_round_trip(ours: SecretKey, tmp_path: Path) -> None:
    """An encrypted key saved by us loads back with its password and signs the same key id."""
    path = tmp_path / "enc.key"
    ours.save(path, b"pw", kdf_opslimit=FAST_OPSLIMIT, kdf_memlimit=FAST_MEMLIMIT)
    loaded = SecretKey.load(path, b"pw")
    assert loaded.public_key() == ours.public_key()
    assert verify(META, loaded.sign(META, "c"), [ours.public_key()]).key_id_hex == ours.key_id_hex


def test_wrong_password_is_refused(ours: SecretKey, tmp_path: Path) -> None:
    """Decrypting with a wrong password fails on the BLAKE2b checksum, naming the file."""
    path = tmp_path / "enc.key"
    ours.save(path, b"right", kdf_opslimit=FAST_OPSLIMIT, kdf_memlimit=FAST_MEMLIMIT)
    with pytest.raises(KeyFileError, match=f"wrong password for secret key file {path}"):
        SecretKey.load(path, b"wrong")


def test_secret_key_file_is_private(ours: SecretKey, tmp_path: Path) -> None:
    """The secret key file has mode 0600 and its repr shows no key material."""
    path = tmp_path / "plain.key"
    ours.save(path, None)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert repr(ours) == f"SecretKey(key_id_hex={ours.key_id_hex!r})"


def test_save_without_overwrite_keeps_existing_file(ours: SecretKey, tmp_path: Path) -> None:
    """save(overwrite=False) refuses an existing file and leaves it and no temp file behind."""
    path = tmp_path / "existing.key"
    path.write_text("precious")
    with pytest.raises(KeyFileError, match="already exists"):
        ours.save(path, None, overwrite=False)
    assert path.read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing.key"]


def test_corrupted_unencrypted_key_is_refused(ours: SecretKey, tmp_path: Path) -> None:
    """A flipped bit in an unencrypted key with a checksum is reported as corruption."""
    path = tmp_path / "plain.key"
    ours.save(path, None)
    comment, line = path.read_text().splitlines()
    raw = bytearray(base64.b64decode(line))
    raw[70] ^= 0x01  # inside the Ed25519 secret key
    path.write_text(f"{comment}\n{base64.b64encode(bytes(raw)).decode()}\n")
    with pytest.raises(KeyFileError, match="corrupted"):
        SecretKey.load(path)


def test_public_key_parse_forms_and_errors(ours: SecretKey) -> None:
    """Public keys parse from file text or a padded bare line; broken ones name the problem."""
    public = ours.public_key()
    assert PublicKey.parse(public.to_file_text("my key")) == public
    assert PublicKey.parse(f"  {public.to_base64()}\n") == public
    assert public.to_file_text().startswith(
        f"untrusted comment: minisign public key {public.key_id_hex}\n"
    )
    with pytest.raises(KeyFileError, match="empty"):
        PublicKey.parse("\n")
    with pytest.raises(KeyFileError, match="not the base64"):
        PublicKey.parse("RWQnotbase64!!")
    with pytest.raises(KeyFileError, match="not the base64"):
        PublicKey.parse(public.to_base64()[:-4])
    wrong_alg = base64.b64encode(b"Xx" + base64.b64decode(public.to_base64())[2:]).decode()
    with pytest.raises(KeyFileError, match="algorithm"):
        PublicKey.parse(wrong_alg)
    with pytest.raises(KeyFileError, match="lines"):
        PublicKey.parse(public.to_file_text() + public.to_base64())


def test_public_keys_compare_and_hash_by_value(ours: SecretKey) -> None:
    """Equal keys parsed twice are one set member; a different key id makes them differ."""
    public = ours.public_key()
    again = PublicKey.parse(public.to_base64())
    assert {public, again} == {public}
    assert PublicKey(key_id=bytes(8), key=public.key) != public
    assert repr(public) == (
        f"PublicKey(key_id_hex={public.key_id_hex!r}, base64={public.to_base64()!r})"
    )


# --- refusals ---------------------------------------------------------------------------


def test_tampered_data_byte_is_refused(ours: SecretKey) -> None:
    """One changed byte of the meta fails the signature check."""
    signature = signed_by_ours(ours)
    tampered = bytearray(META)
    tampered[len(META) // 2] ^= 0x20
    with pytest.raises(SignatureError, match="does not match the data"):
        verify(bytes(tampered), signature, [ours.public_key()])


def test_tampered_trusted_comment_is_refused(ours: SecretKey) -> None:
    """An edited trusted comment fails the global signature check."""
    signature = replace_line(signed_by_ours(ours, "serial:42"), 2, b"trusted comment: serial:99")
    with pytest.raises(SignatureError, match="trusted comment was altered"):
        verify(META, signature, [ours.public_key()])


def test_untrusted_comment_is_not_covered(ours: SecretKey) -> None:
    """The untrusted comment may change freely, as in minisign; the rest still verifies."""
    signature = replace_line(signed_by_ours(ours), 0, b"untrusted comment: anything")
    assert verify(META, signature, [ours.public_key()]).trusted_comment == "serial:42"


def test_unknown_key_is_refused_by_id(ours: SecretKey) -> None:
    """A signature by a key that is not trusted names its key id and the trusted ones."""
    other = SecretKey.generate().public_key()
    with pytest.raises(SignatureError) as caught:
        verify(META, signed_by_ours(ours), [other])
    message = str(caught.value)
    assert f"key id {ours.key_id_hex}, which is not a trusted key" in message
    assert other.key_id_hex in message


def test_key_id_collision_with_wrong_key_is_refused(ours: SecretKey) -> None:
    """Another key claiming the trusted key id cannot pass: the Ed25519 check fails."""
    impostor = SecretKey(ours.key_id, SecretKey.generate()._private)
    with pytest.raises(SignatureError, match="does not match the data"):
        verify(META, impostor.sign(META, "serial:42"), [ours.public_key()])


def test_any_of_several_trusted_keys_verifies(ours: SecretKey) -> None:
    """With several trusted keys, the one whose id matches is used."""
    keys = [SecretKey.generate().public_key(), ours.public_key()]
    assert verify(META, signed_by_ours(ours), keys).key_id_hex == ours.key_id_hex


def test_unknown_algorithm_is_refused(ours: SecretKey) -> None:
    """A signature line with an algorithm tag other than ED or Ed is refused by name."""
    signature = signed_by_ours(ours)
    raw = sig_struct(signature)
    forged = replace_line(signature, 1, base64.b64encode(b"Zq" + raw[2:]))
    with pytest.raises(SignatureError, match="unknown signature algorithm 'Zq'"):
        verify(META, forged, [ours.public_key()])


@pytest.mark.parametrize(
    ("garbage", "problem"),
    [
        (b"", "expected 4 lines, found 0"),
        (b"\x00\xff garbage", "expected 4 lines"),
        (b"hello\nworld\nfoo\nbar\n", "line 1 does not start with 'untrusted comment: '"),
        (b"untrusted comment: x\n!!!!\ntrusted comment: y\nAAAA\n", "line 2 is not the base64"),
    ],
)
def test_garbage_signature_is_refused(ours: SecretKey, garbage: bytes, problem: str) -> None:
    """Garbage instead of a .minisig is refused as malformed, saying which part is wrong."""
    with pytest.raises(SignatureError, match="malformed minisign signature") as caught:
        verify(META, garbage, [ours.public_key()])
    assert problem in str(caught.value)


def test_broken_lines_of_real_signature_are_refused(ours: SecretKey) -> None:
    """A real signature with its trusted-comment prefix or global signature broken is malformed."""
    signature = signed_by_ours(ours)
    no_prefix = replace_line(signature, 2, b"comment: serial:42")
    with pytest.raises(SignatureError, match="line 3 does not start with 'trusted comment: '"):
        verify(META, no_prefix, [ours.public_key()])
    short_global = replace_line(signature, 3, base64.b64encode(b"x" * 63))
    with pytest.raises(SignatureError, match="line 4 is not the base64"):
        verify(META, short_global, [ours.public_key()])
    with pytest.raises(SignatureError, match="expected 4 lines"):
        verify(META, signature + b"extra line\n", [ours.public_key()])


def test_oversized_signature_is_refused(ours: SecretKey) -> None:
    """A signature over 64 KiB is refused before parsing, even if it would otherwise verify."""
    signature = replace_line(
        signed_by_ours(ours), 0, b"untrusted comment: " + b"x" * MAX_SIGNATURE_BYTES
    )
    with pytest.raises(SignatureError, match=f"more than the {MAX_SIGNATURE_BYTES}"):
        verify(META, signature, [ours.public_key()])


def test_oversized_signature_file_is_refused_unread(tmp_path: Path) -> None:
    """load_signature refuses a 64 GiB (sparse) file from its size, without reading it."""
    path = tmp_path / "huge.minisig"
    with path.open("wb") as handle:
        handle.truncate(64 << 30)
    with pytest.raises(SignatureError, match=f"is {64 << 30} bytes, more than the"):
        load_signature(path)


def test_missing_signature_file_is_reported(tmp_path: Path) -> None:
    """A missing .minisig is a SignatureError naming the path."""
    path = tmp_path / "absent.minisig"
    with pytest.raises(SignatureError, match=f"cannot read signature file {path}"):
        load_signature(path)


def test_no_trusted_keys_is_refused(ours: SecretKey) -> None:
    """verify with an empty key list refuses instead of accepting anything."""
    with pytest.raises(SignatureError, match="no trusted public keys"):
        verify(META, signed_by_ours(ours), [])


def test_sign_refuses_multiline_trusted_comment(ours: SecretKey) -> None:
    """A trusted comment with a line break would break the format and is refused."""
    with pytest.raises(SignatureError, match="single line"):
        ours.sign(META, "one\ntwo")


# --- organixctl keygen end to end ------------------------------------------------------------


def test_keygen_writes_pair_and_prints_config_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """keygen writes a 0600 secret key and a public key, and prints the line for the config."""
    secret, public = tmp_path / "sign.key", tmp_path / "sign.pub"
    code = organixctl_main(
        ["keygen", "--secret-key", str(secret), "--public-key", str(public), "--no-password"]
    )
    assert code == Exit.OK
    out = capsys.readouterr().out
    public_key = PublicKey.load(public)
    assert f"  {public_key.to_base64()}\n" in out
    assert f"key id: {public_key.key_id_hex}" in out
    assert "NOT encrypted" in out
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert SecretKey.load(secret).public_key() == public_key


def test_keygen_refuses_to_overwrite_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An existing key file is kept unless --force is given; with --force it is replaced."""
    secret, public = tmp_path / "sign.key", tmp_path / "sign.pub"
    argv = ["keygen", "--secret-key", str(secret), "--public-key", str(public), "--no-password"]
    assert organixctl_main(argv) == Exit.OK
    before = (secret.read_bytes(), public.read_bytes())
    capsys.readouterr()
    assert organixctl_main(argv) == Exit.ERROR
    assert f"{secret} already exists; pass --force" in capsys.readouterr().err
    assert (secret.read_bytes(), public.read_bytes()) == before
    assert organixctl_main([*argv, "--force"]) == Exit.OK
    assert public.read_bytes() != before[1]
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600


def test_keygen_needs_a_password_source_without_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a terminal, keygen asks for --password-file or --no-password and writes nothing."""
    secret, public = tmp_path / "sign.key", tmp_path / "sign.pub"
    monkeypatch.setattr("sys.stdin", io.StringIO("typed ahead\n"))
    code = organixctl_main(["keygen", "--secret-key", str(secret), "--public-key", str(public)])
    assert code == Exit.ERROR
    assert "--password-file FILE, or --no-password" in capsys.readouterr().err
    assert not secret.exists()
    assert not public.exists()


def test_keygen_rejects_both_password_options(tmp_path: Path) -> None:
    """--password-file and --no-password together are a usage error."""
    argv = [
        "keygen",
        "--secret-key",
        str(tmp_path / "k"),
        "--public-key",
        str(tmp_path / "p"),
        "--password-file",
        str(tmp_path / "pw"),
        "--no-password",
    ]
    assert organixctl_main(argv) == Exit.USAGE


def test_key_id_is_shown_like_minisign_shows_it() -> None:
    """Key ids print as minisign prints them (%PRIX64 of the little-endian id): no zero padding."""
    key = SecretKey.generate()
    small = PublicKey(
        key_id=bytes([0x85, 0x86, 0x2D, 0x4C, 0x95, 0x06, 0xA9, 0x00]), key=key.public_key().key
    )
    assert small.key_id_hex == "A906954C2D8685"
    assert (
        small.to_file_text().splitlines()[0]
        == "untrusted comment: minisign public key A906954C2D8685"
    )
