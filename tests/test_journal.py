"""Under journald the daemon logs native journal fields with stable MESSAGE_IDs.

The test plays journald: it binds the journal's datagram socket (the fixed path
libsystemd sends to) and decodes the native protocol, as journald would.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from organixmd.base.journal import MESSAGE_IDS
from organixmd.boot.machine import BootControl
from tests.support.images import make_ext4_image
from tests.support.releases import build_release

JOURNAL_SOCKET = Path("/run/systemd/journal/socket")
MiB = 1024 * 1024


def decode(datagram: bytes) -> dict[str, str]:
    """One journal native-protocol datagram: KEY=VALUE lines, or KEY\\n<len64><data>\\n."""
    fields: dict[str, str] = {}
    rest = datagram
    while rest:
        newline = rest.index(b"\n")
        line, rest = rest[:newline], rest[newline + 1 :]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            fields[key.decode()] = value.decode()
        else:
            (length,) = struct.unpack("<Q", rest[:8])
            fields[line.decode()] = rest[8 : 8 + length].decode()
            rest = rest[8 + length + 1 :]
    return fields


@pytest.fixture
def journal() -> Iterator[socket.socket]:
    """The journal socket, served by this test (fails loudly if a real journald owns it)."""
    if JOURNAL_SOCKET.exists():
        pytest.fail(
            f"{JOURNAL_SOCKET} exists: a real journald runs here; this test plays journald "
            "itself and needs the path free"
        )
    created_dir = not JOURNAL_SOCKET.parent.exists()
    JOURNAL_SOCKET.parent.mkdir(parents=True, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(JOURNAL_SOCKET))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * MiB)
    try:
        yield sock
    finally:
        sock.close()
        JOURNAL_SOCKET.unlink(missing_ok=True)
        if created_dir:
            for directory in (JOURNAL_SOCKET.parent, JOURNAL_SOCKET.parent.parent):
                if directory.exists() and not any(directory.iterdir()):
                    directory.rmdir()


def test_install_events_carry_message_ids(journal: socket.socket, tmp_path: Path) -> None:
    """update_found, install_done and flipped reach the journal with fields and MESSAGE_IDs."""
    image = make_ext4_image(tmp_path / "root.img", 16 * MiB, payload_bytes=4 * MiB)
    release = build_release(image, tmp_path / "pub", version="3.1", serial=3)
    for slot in "ab":
        with open(tmp_path / f"slot-{slot}.img", "wb") as handle:
            handle.truncate(32 * MiB)
    (tmp_path / "cmdline").write_text("organixm.slot=a\n")
    BootControl(tmp_path / "grubenv", tmp_path / "grubenv.bak").initialize("a")
    config = tmp_path / "organixmd.toml"
    config.write_text(
        f"""
[source]
url = "{release.url}"
[slots]
a = "{tmp_path / "slot-a.img"}"
b = "{tmp_path / "slot-b.img"}"
cmdline = "{tmp_path / "cmdline"}"
[boot]
grubenv = "{tmp_path / "grubenv"}"
[daemon]
state_dir = "{tmp_path / "state"}"
host_id_file = "{tmp_path / "machine-id"}"
"""
    )
    env = {**os.environ, "JOURNAL_STREAM": "8:12345"}
    result = subprocess.run(
        [sys.executable, "-m", "organixmd.cli", "--config", str(config), "--once"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    # Logs went to the journal, not to stderr.
    assert "install_done" not in result.stderr
    journal.settimeout(1.0)
    entries = []
    while True:
        try:
            entries.append(decode(journal.recv(1 << 20)))
        except TimeoutError:
            break
    by_event = {entry.get("EVENT"): entry for entry in entries}
    for event in ("update_found", "install_done", "flipped"):
        assert event in by_event, sorted(e for e in by_event if e)
        entry = by_event[event]
        assert entry["MESSAGE_ID"] == MESSAGE_IDS[event]
        assert entry["SYSLOG_IDENTIFIER"] == "organixmd"
        assert entry["VERSION"] == "3.1"
        assert entry["PRIORITY"] == "6"
    assert by_event["install_done"]["SLOT"] == "b"
    assert by_event["check_done"]["OUTCOME"] == "staged"
    assert by_event["check_done"]["CHECK_ID"] == by_event["install_done"]["CHECK_ID"]
