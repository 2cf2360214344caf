"""The daemon's configuration: one TOML file, one frozen pydantic model tree.

Unknown keys are rejected and every error names the key (``source.url: ...``);
bad configuration stops start-up, it is never replaced by defaults. Secrets are
never part of this file: S3 credentials come from a credentials file (a systemd
credential), the AWS environment, or nowhere (anonymous). See docs/configuration.md.
"""

from __future__ import annotations

import re
import tomllib
from datetime import time
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from organixmd.base.errors import ConfigError
from organixmd.base.objectnames import META_SUFFIX

DEFAULT_CONFIG_PATH = Path("/etc/organixm/organixmd.toml")

PositiveSeconds = Annotated[float, Field(gt=0, le=366 * 24 * 3600)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceConfig(_Section):
    url: str = Field(description="release URL; the meta is at url + '.meta'")
    s3_endpoint: str | None = None
    s3_region: str = "us-east-1"
    credentials: Literal["env", "anonymous", "file"] = "env"
    credentials_file: Path | None = None
    public_keys: tuple[str, ...] = ()
    public_key_files: tuple[Path, ...] = ()
    timeout: PositiveSeconds = 30.0
    #: A download averaging fewer bytes/s than this over ``low_speed_time`` seconds of
    #: waiting is ended (source-unreachable; the next check resumes). 0: no limit.
    low_speed_limit: int = Field(default=1024, ge=0, le=10**10)
    low_speed_time: PositiveSeconds = 60.0

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("s3", "http", "https", "file"):
            raise ValueError(
                f"scheme {parts.scheme!r} is not supported; use s3://bucket/key, "
                "https://..., http://... or file:///path"
            )
        if parts.scheme == "s3" and (not parts.netloc or not parts.path.strip("/")):
            raise ValueError("s3 URLs need a bucket and an object name: s3://bucket/path/name")
        if parts.scheme in ("http", "https") and not parts.netloc:
            raise ValueError("http(s) URLs need a host")
        if parts.username is not None or parts.password is not None:
            # The URL is shown in status, logs and metrics; secrets must not be.
            raise ValueError(
                "must not carry a user name or password; secrets go in credentials_file"
            )
        if parts.scheme == "file" and not parts.path.startswith("/"):
            raise ValueError("file URLs need an absolute path: file:///path/name")
        if value.endswith((META_SUFFIX, "/")):
            raise ValueError("give the release name without '.meta' (the daemon appends it)")
        return value

    @model_validator(mode="after")
    def _credentials_file_given(self) -> SourceConfig:
        if self.credentials == "file" and self.credentials_file is None:
            raise ValueError("credentials = 'file' needs credentials_file")
        return self


class SlotsConfig(_Section):
    a: Path = Path("/dev/disk/by-partlabel/organixm-a")
    b: Path = Path("/dev/disk/by-partlabel/organixm-b")
    cmdline: Path = Path("/proc/cmdline")
    mountinfo: Path = Path("/proc/self/mountinfo")


_WINDOW_RE = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)$")


class BootConfig(_Section):
    grubenv: Path = Path("/boot/grub/grubenv")
    #: The second copy GRUB falls back to when the primary is torn; default ``<grubenv>.bak``.
    grubenv_backup: Path | None = None
    trial_boots: int = Field(default=3, ge=1, le=9)
    reboot: Literal["never", "immediately", "window"] = "never"
    maintenance_window: str | None = None
    reboot_command: tuple[str, ...] = ("systemctl", "reboot")
    commit_deadline: PositiveSeconds = 900.0
    #: Seconds since boot (first field); the commit deadline counts from boot.
    uptime: Path = Path("/proc/uptime")

    @field_validator("maintenance_window")
    @classmethod
    def _window_format(cls, value: str | None) -> str | None:
        if value is not None and not _WINDOW_RE.match(value):
            raise ValueError("must look like '02:00-04:00' (local time, may wrap past midnight)")
        return value

    @model_validator(mode="after")
    def _window_needed(self) -> BootConfig:
        if self.reboot == "window" and self.maintenance_window is None:
            raise ValueError("reboot = 'window' needs maintenance_window = 'HH:MM-HH:MM'")
        if not self.reboot_command:
            raise ValueError("reboot_command must not be empty")
        return self

    @property
    def grubenv_copy(self) -> Path:
        return self.grubenv_backup or self.grubenv.with_name(self.grubenv.name + ".bak")

    def window(self) -> tuple[time, time] | None:
        if self.maintenance_window is None:
            return None
        match = _WINDOW_RE.match(self.maintenance_window)
        assert match is not None  # noqa: S101 - validated above
        h1, m1, h2, m2 = (int(g) for g in match.groups())
        return time(h1, m1), time(h2, m2)


class DaemonConfig(_Section):
    state_dir: Path = Path("/var/lib/organixm")
    socket: Path = Path("/run/organixm/control.sock")
    socket_group: str = "root"
    admin_group: str = "wheel"
    poll_interval: PositiveSeconds = 3600.0
    poll_jitter: Annotated[float, Field(ge=0, le=24 * 3600)] = 300.0
    backoff_max: PositiveSeconds = 3600.0
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    host_id_file: Path = Path("/etc/machine-id")


class InstallConfig(_Section):
    readback: bool = True
    buffers: int = Field(default=4, ge=2, le=64)
    #: Seconds between durable progress records (fsync of the slot, then the state file).
    checkpoint_interval: float = Field(default=1.0, ge=0.0, le=600.0)
    #: Delta updates: copy the blocks this host already holds, fetch only the rest
    #: (when the release has a delta index; docs/format.md).
    delta: bool = True


class Config(_Section):
    source: SourceConfig
    slots: SlotsConfig = SlotsConfig()
    boot: BootConfig = BootConfig()
    daemon: DaemonConfig = DaemonConfig()
    install: InstallConfig = InstallConfig()

    @model_validator(mode="after")
    def _distinct_slots(self) -> Config:
        if self.slots.a == self.slots.b:
            raise ValueError("slots.a and slots.b name the same path; they must differ")
        return self


def _describe(exc: ValidationError, origin: str) -> str:
    lines = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"]) or "(top level)"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown key (check the spelling against docs/configuration.md)"
        lines.append(f"{origin}: {where}: {message}")
    return "\n".join(lines)


def parse_config(text: str, origin: str = "configuration") -> Config:
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{origin}: not valid TOML: {exc}") from exc
    try:
        return Config.model_validate(document)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, origin)) from exc


def load_config(path: Path) -> Config:
    """Read and validate the configuration file at ``path``."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(
            f"cannot read configuration {path}: {exc.strerror}",
            hint="pass --config PATH or create /etc/organixm/organixmd.toml",
        ) from exc
    return parse_config(text, str(path))
