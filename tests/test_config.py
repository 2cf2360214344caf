"""The daemon's configuration: strict, with errors that name the key."""

from __future__ import annotations

import grp
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from organixmd.base.config import load_config, parse_config
from organixmd.base.errors import ConfigError
from tests.support.daemon import REPO, DaemonProcess, Host, prepare_host

MINIMAL = '[source]\nurl = "s3://fleet/releases/kiosk"\n'


def test_minimal_config_takes_documented_defaults() -> None:
    """Only the release URL is required; everything else has the documented default."""
    config = parse_config(MINIMAL)
    assert config.slots.a == Path("/dev/disk/by-partlabel/organixm-a")
    assert config.boot.grubenv_copy == Path("/boot/grub/grubenv.bak")
    assert (config.boot.trial_boots, config.boot.reboot) == (3, "never")
    assert config.install.readback is True
    assert config.daemon.socket == Path("/run/organixm/control.sock")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (MINIMAL + "[daemon]\npoll_intervall = 3\n", "daemon.poll_intervall: unknown key"),
        ('[source]\nurl = "ftp://host/x"\n', "source.url: scheme 'ftp' is not supported"),
        ('[source]\nurl = "s3://fleet"\n', "s3 URLs need a bucket and an object name"),
        ('[source]\nurl = "s3://b/kiosk.meta"\n', "without '.meta'"),
        (
            '[source]\nurl = "https://user:secret@host/kiosk"\n',
            "must not carry a user name or password",
        ),
        ('[source]\nurl = "s3://b/k"\ncredentials = "file"\n', "needs credentials_file"),
        (MINIMAL + '[boot]\nreboot = "window"\n', "needs maintenance_window"),
        (MINIMAL + '[boot]\nmaintenance_window = "2-4"\n', "boot.maintenance_window"),
        (MINIMAL + "[boot]\ntrial_boots = 10\n", "boot.trial_boots"),
        (MINIMAL + '[slots]\na = "/dev/x"\nb = "/dev/x"\n', "name the same path"),
        (MINIMAL + "[install]\nbuffers = 1\n", "install.buffers"),
        ("[source\n", "not valid TOML"),
        ("", "source: Field required"),
    ],
)
def test_bad_configuration_names_the_key(text: str, expected: str) -> None:
    """Each mistake stops start-up with a message that names what is wrong."""
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "organixmd.toml")
    assert expected in str(caught.value)
    assert "Value error" not in str(caught.value)
    assert "secret" not in str(caught.value).replace("secrets go", "")


def test_missing_file_says_what_to_do(tmp_path: Path) -> None:
    """A missing configuration file names the path and the way out."""
    with pytest.raises(ConfigError, match=r"cannot read configuration .*pass --config PATH"):
        load_config(tmp_path / "absent.toml")


def test_maintenance_window_is_parsed() -> None:
    """A window is two local times; it may wrap past midnight."""
    config = parse_config(
        MINIMAL + '[boot]\nreboot = "window"\nmaintenance_window = "23:30-02:00"\n'
    )
    window = config.boot.window()
    assert window is not None
    assert (window[0].hour, window[0].minute, window[1].hour) == (23, 30, 2)


def _run_daemon(host: Host, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """The real daemon, to its exit; environment without systemd's sockets."""
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
    return subprocess.run(
        [sys.executable, "-m", "organixmd.cli", "--config", str(host.config)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=env,
        check=False,
    )


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        (
            {"admin_group": "organixm-no-such-group"},
            "daemon.admin_group: no group named 'organixm-no-such-group' on this host "
            "(set admin_group to an existing group (e.g. 'root' or 'sudo')",
        ),
        (
            {"socket_group": "organixm-no-such-group"},
            "daemon.socket_group: no group named 'organixm-no-such-group' on this host "
            "(set socket_group to an existing group",
        ),
        ({"poll_intervall": 5}, "daemon.poll_intervall: unknown key"),
        ({"socket": "/proc/organixm/control.sock"}, "daemon.socket: cannot create /proc/organixm"),
    ],
    ids=["admin-group", "socket-group", "unknown-key", "socket-path"],
)
def test_daemon_start_up_with_bad_configuration_exits_78_with_one_line(
    tmp_path: Path, settings: dict[str, Any], expected: str
) -> None:
    """The real daemon refuses a bad [daemon] setting: exit 78, one line naming the key and
    the fix, no traceback, no socket left behind."""
    host = prepare_host(tmp_path / "host", "file:///nonexistent/releases/kiosk", **settings)
    try:
        result = _run_daemon(host)
        output = result.stdout + result.stderr
        assert result.returncode == 78, output
        assert "Traceback" not in output
        lines = [line for line in output.splitlines() if line.strip()]
        # The error is the last line and the only one that names the key.
        assert expected in lines[-1], output
        key = expected.split(":")[0]
        assert sum(key in line for line in lines) == 1, output
        assert not host.socket.exists()
    finally:
        host.cleanup()


def test_default_admin_group_is_wheel_and_its_absence_says_what_to_set(tmp_path: Path) -> None:
    """``wheel`` (NixOS's admin group) stays the default; on a host without it (Debian) the
    daemon names the setting and the fix instead of crashing."""
    assert parse_config(MINIMAL).daemon.admin_group == "wheel"
    host = prepare_host(tmp_path / "host", "file:///nonexistent/releases/kiosk")
    try:
        # Without the key the default applies (write_config always names it).
        text = host.config.read_text().replace('admin_group = "root"\n', "")
        host.config.write_text(text)
        try:
            grp.getgrnam("wheel")
        except KeyError:
            result = _run_daemon(host)
            assert result.returncode == 78, result.stderr
            assert "Traceback" not in result.stderr
            assert "daemon.admin_group: no group named 'wheel' on this host" in result.stderr
            assert "set admin_group to an existing group (e.g. 'root' or 'sudo')" in result.stderr
        else:
            with DaemonProcess(host).start(ready=False) as daemon:
                assert daemon.stop() == 0
    finally:
        host.cleanup()
