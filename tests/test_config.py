"""The daemon's configuration: strict, with errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from organixmd.config import load_config, parse_config
from organixmd.errors import ConfigError

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
