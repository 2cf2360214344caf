"""A real Debian guest that updates itself: guest tree, releases, disk, QEMU boots.

The guest tree is built with ``mmdebstrap`` from the host's apt sources and cached
under ``$ORGANIXM_E2E_CACHE`` (default /var/cache/organixm-e2e), keyed by a hash
of its inputs (packages, the project's wheel contents, the initramfs hooks and the
guest files), so a second run reuses it. The project is installed from its own
wheel; the dependency wheels are downloaded on the host (pip has no index inside
the chroot).
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from organixmd.boot import BootControl, BootState, write_boot_env
from organixmd.meta import BootEntry

ROOT = Path(__file__).resolve().parents[2]
GUEST_FILES = Path(__file__).parent / "guest"
HOOKS = ROOT / "organixmd" / "data" / "initramfs-tools"
CACHE = Path(os.environ.get("ORGANIXM_E2E_CACHE", "/var/cache/organixm-e2e"))
APT_SOURCES = Path("/etc/apt/sources.list.d/debian.sources")
SUITE = "bookworm"
PACKAGES = (
    "systemd",
    "systemd-sysv",
    "udev",
    "dbus",
    "python3",
    "python3-venv",
    "python3-systemd",
    "linux-image-cloud-amd64",
    "initramfs-tools",
    "e2fsprogs",
    "util-linux",
    "kmod",
    "zstd",
    "procps",
)
#: Runtime dependencies installed from wheels; systemd-python comes from Debian.
WHEEL_DEPS = ("aiohttp", "aiobotocore", "pydantic", "structlog", "zstandard", "cryptography")
TOOLS = ("mmdebstrap", "qemu-system-x86_64", "mkfs.ext4", "debugfs", "journalctl", "sgdisk")
STICK_LABEL = "e2e-stick"
RELEASE_NAME = "e2e"
#: Kernel, initrd and root in the slot; the initrd finds the root by organixm.slot=.
BOOT_PARAMS = ["console=ttyS0,115200", "ro", "panic=5"]


def require_tools() -> None:
    """Fail loudly (never skip) when a tool the end-to-end test needs is missing."""
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        raise AssertionError(
            f"end-to-end test needs {', '.join(missing)} on PATH (make deps installs them)"
        )
    if not APT_SOURCES.exists():
        raise AssertionError(f"no apt sources at {APT_SOURCES} for mmdebstrap")


def run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, check=False, **kwargs)
    if result.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} exited with {result.returncode}:\n"
            f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


def _wheel_digest(wheel: Path) -> str:
    """A hash of the wheel's files (zip timestamps change at every build)."""
    digest = hashlib.sha256()
    with zipfile.ZipFile(wheel) as archive:
        for name in sorted(archive.namelist()):
            digest.update(name.encode() + b"\0" + archive.read(name))
    return digest.hexdigest()


def _files_digest(*roots: Path) -> str:
    digest = hashlib.sha256()
    for top in roots:
        for path in sorted(p for p in top.rglob("*") if p.is_file()):
            digest.update(str(path.relative_to(top)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def build_wheels(into: Path) -> Path:
    """The project's wheel and its pinned dependency wheels; returns the project's wheel."""
    into.mkdir(parents=True, exist_ok=True)
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(into), str(ROOT)])
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in WHEEL_DEPS]
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--only-binary=:all:",
            "-d",
            str(into),
            *pins,
        ]
    )
    (wheel,) = into.glob("organixm-*.whl")
    return wheel


def _customize(wheels: Path) -> list[str]:
    """mmdebstrap hooks ("$1" is the new root): project, hooks, units, read-only root."""
    g = GUEST_FILES
    d = ROOT / "organixmd" / "data" / "systemd"
    steps = [
        # initramfs-tools: the project's hooks; a small initrd with the virtio drivers.
        f'cp {HOOKS}/hooks/organixm "$1/etc/initramfs-tools/hooks/organixm"',
        f'cp {HOOKS}/scripts/init-top/organixm "$1/etc/initramfs-tools/scripts/init-top/organixm"',
        f'cp {HOOKS}/scripts/local-bottom/organixm "$1/etc/initramfs-tools/scripts/local-bottom/"',
        'sed -i "s/^MODULES=.*/MODULES=list/" "$1/etc/initramfs-tools/initramfs.conf"',
        'printf "virtio_pci\\nvirtio_blk\\n" >> "$1/etc/initramfs-tools/modules"',
        'chroot "$1" update-initramfs -u -k all',
        # The project from its own wheel.
        f'mkdir -p "$1/tmp/wheels" && cp {wheels}/*.whl "$1/tmp/wheels/"',
        'chroot "$1" python3 -m venv --system-site-packages /opt/organixm',
        'chroot "$1" /opt/organixm/bin/pip install -q --no-index --find-links /tmp/wheels organixm',
        'rm -rf "$1/tmp/wheels"',
        'ln -s /opt/organixm/bin/organixmd "$1/usr/bin/organixmd"',
        'ln -s /opt/organixm/bin/organixctl "$1/usr/bin/organixctl"',
        f'cp {d}/*.service "$1/etc/systemd/system/"',
        # Guest files: fstab, journal, the test's own units.
        f'cp {g}/fstab "$1/etc/fstab"',
        f'mkdir -p "$1/etc/systemd/journald.conf.d" && cp {g}/journald.conf '
        '"$1/etc/systemd/journald.conf.d/e2e.conf"',
        f'cp {g}/e2e-success {g}/e2e-report "$1/usr/local/bin/"',
        f'cp {g}/*.service "$1/etc/systemd/system/"',
        'mkdir -p "$1/media/stick" "$1/etc/organixm" "$1/etc/e2e" "$1/organixm"',
        # Read-only root: fixed machine id, nothing that wants to write /etc or /var at boot.
        'echo 0123456789abcdef0123456789abcdef > "$1/etc/machine-id"',
        'echo e2e > "$1/etc/hostname"',
        'chroot "$1" systemctl enable organixm-update.service organixm-mark-good.service '
        "e2e-success.service e2e-after.service e2e-report.service",
        'chroot "$1" systemctl mask systemd-firstboot.service apt-daily.timer '
        "apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer getty@tty1.service",
        'rm -rf "$1/var/cache/apt" "$1/var/lib/apt/lists" "$1/usr/share/doc" "$1/usr/share/man"',
    ]
    return [f"--customize-hook={step}" for step in steps]


def guest_tree(work: Path) -> Path:
    """The cached guest root tree (built when its inputs changed)."""
    require_tools()
    wheels = work / "wheels"
    wheel = build_wheels(wheels)
    key = hashlib.sha256(
        json.dumps(
            [PACKAGES, _wheel_digest(wheel), sorted(p.name for p in wheels.glob("*.whl"))]
        ).encode()
        + _files_digest(HOOKS, GUEST_FILES, ROOT / "organixmd" / "data" / "systemd").encode()
    ).hexdigest()[:16]
    tree = CACHE / f"guest-{key}"
    if tree.is_dir():
        return tree
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f"guest-{key}.", dir=CACHE))
    partial.rmdir()
    run(
        [
            "mmdebstrap",
            "--variant=minbase",
            "--mode=root",
            "--include=" + ",".join(PACKAGES),
            "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/doc/*",
            "--dpkgopt=path-exclude=/usr/share/locale/*",
            *_customize(wheels),
            SUITE,
            str(partial),
            str(APT_SOURCES),
        ]
    )
    partial.rename(tree)
    return tree


@dataclass(frozen=True, slots=True)
class Release:
    version: str
    serial: int
    #: What the release's boot success unit does: pass, fail or hang.
    behaviour: str = "pass"
    trial_boots: int = 2
    extra_params: tuple[str, ...] = ()


def _daemon_config(release: Release) -> str:
    return (
        "[source]\n"
        f'url = "file:///media/stick/{RELEASE_NAME}"\n'
        "[boot]\n"
        f"trial_boots = {release.trial_boots}\n"
        'reboot = "immediately"\n'
        "commit_deadline = 3600\n"
        "[daemon]\n"
        'admin_group = "root"\n'
        "poll_jitter = 0\n"
    )


def kernel_paths(tree: Path) -> tuple[str, str]:
    (kernel,) = sorted((tree / "boot").glob("vmlinuz-*"))
    (initrd,) = sorted((tree / "boot").glob("initrd.img-*"))
    return f"/boot/{kernel.name}", f"/boot/{initrd.name}"


def build_release_image(tree: Path, release: Release, out: Path) -> Path:
    """One ext4 slot image of the guest tree plus the release's own files (via debugfs)."""
    size = int(run(["du", "-sb", str(tree)]).stdout.split()[0])
    size = (size * 13 // 10 + 64 * 2**20) // 2**20 * 2**20
    with open(out, "wb") as handle:
        handle.truncate(size)
    run(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-L",
            "organixm-root",
            "-E",
            "root_owner=0:0",
            "-d",
            str(tree),
            str(out),
        ],
        env={**os.environ, "E2FSPROGS_FAKE_TIME": "1700000000"},
    )
    kernel, initrd = kernel_paths(tree)
    extra = out.with_suffix(".files")
    extra.mkdir(exist_ok=True)
    write_boot_env(
        extra / "boot.env",
        BootEntry(
            kernel=kernel,
            initrd=initrd,
            init="/sbin/init",
            params=[*BOOT_PARAMS, *release.extra_params],
        ),
    )
    (extra / "organixmd.toml").write_text(_daemon_config(release))
    (extra / "behaviour").write_text(release.behaviour + "\n")
    (extra / "version").write_text(f"{release.version} {release.serial}\n")
    commands = (
        f"cd /organixm\nwrite {extra}/boot.env boot.env\n"
        f"cd /etc/organixm\nwrite {extra}/organixmd.toml organixmd.toml\n"
        f"cd /etc/e2e\nwrite {extra}/behaviour behaviour\nwrite {extra}/version version\n"
    )
    script = extra / "debugfs.cmd"
    script.write_text(commands)
    result = run(["debugfs", "-w", "-f", str(script), str(out)])
    if "rror" in result.stderr.replace("debugfs ", ""):
        raise AssertionError(f"debugfs into {out}: {result.stderr}")
    return out


def publish(image: Path, release: Release, directory: Path) -> Path:
    """``organixctl publish`` to a directory (the stick's contents); returns the meta."""
    directory.mkdir(parents=True, exist_ok=True)
    organixctl = Path(sys.executable).parent / "organixctl"
    run(
        [
            str(organixctl),
            "publish",
            str(image),
            "--to",
            str(directory / RELEASE_NAME),
            "--version",
            release.version,
            "--serial",
            str(release.serial),
            "--allow-unsigned",
        ]
    )
    return directory / f"{RELEASE_NAME}.meta"


def make_stick(publish_dir: Path, out: Path) -> Path:
    """The USB stick: an ext4 disk holding what publish wrote at its top."""
    size = int(run(["du", "-sb", str(publish_dir)]).stdout.split()[0]) * 11 // 10 + 32 * 2**20
    out.unlink(missing_ok=True)
    with open(out, "wb") as handle:
        handle.truncate(size // 2**20 * 2**20)
    run(["mkfs.ext4", "-q", "-F", "-L", STICK_LABEL, "-d", str(publish_dir), str(out)])
    return out


def provision(disk: Path, meta: Path, firmware: str) -> str:
    organixctl = Path(sys.executable).parent / "organixctl"
    return run(
        [
            str(organixctl),
            "provision",
            "--disk",
            str(disk),
            "--release",
            str(meta),
            "--firmware",
            firmware,
            "--yes",
            "--rw-size",
            "256M",
        ]
    ).stdout


# ---------------------------------------------------------------------------- disk reading


def _partitions(disk: Path) -> dict[str, tuple[int, int]]:
    """GPT partition name -> (byte offset, byte size), from sgdisk."""
    out = run(["sgdisk", "-p", str(disk)]).stdout
    sector = 512
    parts: dict[str, tuple[int, int]] = {}
    for line in out.splitlines():
        match = re.match(r"\s*\d+\s+(\d+)\s+(\d+)\s+\S+\s+\S+\s+\S+\s+(\S+)$", line)
        if match:
            start, end, name = int(match[1]), int(match[2]), match[3]
            parts[name] = (start * sector, (end - start + 1) * sector)
    return parts


class Mounted:
    """A partition of the disk image loop-mounted read-only at a temporary directory."""

    def __init__(self, disk: Path, name: str, *, writable: bool = False) -> None:
        offset, size = _partitions(disk)[name]
        self.loop = run(
            ["losetup", "--find", "--show", "--offset", str(offset), "--sizelimit", str(size)]
            + ([] if writable else ["--read-only"])
            + [str(disk)]
        ).stdout.strip()
        self.path = Path(tempfile.mkdtemp(prefix=f"e2e-{name}-"))
        try:
            run(["mount", "-o", "rw" if writable else "ro,noload", self.loop, str(self.path)])
        except BaseException:
            run(["losetup", "-d", self.loop])
            raise

    def close(self) -> None:
        run(["umount", str(self.path)])
        run(["losetup", "-d", self.loop])
        self.path.rmdir()

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_boot_state(disk: Path) -> BootState:
    with Mounted(disk, "organixm-boot") as boot:
        return BootControl(boot / "grub" / "grubenv", boot / "grub" / "grubenv.bak").read()


def read_journal(disk: Path) -> list[dict[str, Any]]:
    """Every entry of the guest's persistent journal (on the rw partition)."""
    with Mounted(disk, "organixm-rw") as rw:
        out = run(["journalctl", "-D", str(rw / "log" / "journal"), "-o", "json", "--no-pager"])
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def read_state(disk: Path) -> dict[str, Any]:
    with Mounted(disk, "organixm-rw") as rw:
        data: dict[str, Any] = json.loads((rw / "lib" / "organixm" / "state.json").read_text())
    return data


# ---------------------------------------------------------------------------- QEMU


OVMF = Path("/usr/share/ovmf/OVMF.fd")
_REPORT = re.compile(r"E2E-REPORT ([A-Za-z0-9+/=]+)")


@dataclass
class Boot:
    """One boot: what the serial console showed and how it ended."""

    serial: str
    seconds: float
    #: "reboot", "poweroff", "killed" (by the harness) or "exit <code>".
    end: str
    reports: list[dict[str, Any]] = field(default_factory=list)

    @property
    def report(self) -> dict[str, Any]:
        if len(self.reports) != 1:
            raise AssertionError(
                f"expected one report, got {len(self.reports)}:\n{self.serial[-4000:]}"
            )
        return self.reports[0]

    def grub_line(self) -> str:
        match = re.search(r"organixm: booting slot \w \([\w-]+\)", self.serial)
        return match.group(0) if match else ""


def boot(
    disk: Path,
    stick: Path,
    log: Path,
    *,
    firmware: str = "bios",
    timeout: float = 240.0,
    kill_when: re.Pattern[str] | None = None,
) -> Boot:
    """Boot the guest once in QEMU (TCG) until it reboots or powers off (or is killed)."""
    argv = [
        "qemu-system-x86_64",
        "-machine",
        "q35,accel=tcg",
        "-smp",
        "2",
        "-m",
        "1024",
        "-display",
        "none",
        "-nodefaults",
        "-no-reboot",
        "-nic",
        "none",
        "-serial",
        f"file:{log}",
        "-drive",
        f"file={disk},format=raw,if=virtio",
        "-drive",
        f"file={stick},format=raw,if=virtio,readonly=on",
    ]
    if firmware == "uefi":
        argv[1:1] = ["-bios", str(OVMF)]
    started = time.monotonic()
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    end = ""
    try:
        while process.poll() is None:
            if time.monotonic() - started > timeout:
                raise AssertionError(
                    f"guest did not finish within {timeout} s:\n"
                    f"{log.read_text(errors='replace')[-4000:]}"
                )
            if kill_when is not None and kill_when.search(log.read_text(errors="replace")):
                process.kill()
                end = "killed"
                break
            time.sleep(0.2)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        assert process.stderr is not None
        stderr = process.stderr.read().decode(errors="replace")
        process.stderr.close()
    serial = log.read_text(errors="replace")
    if not end:
        if process.returncode != 0:
            end = f"exit {process.returncode}"
            raise AssertionError(f"qemu exited with {process.returncode}: {stderr}\n{serial}")
        end = "reboot" if "reboot: Restarting system" in serial else "poweroff"
    reports = [
        json.loads(zlib.decompress(base64.b64decode(match.group(1))))
        for match in _REPORT.finditer(serial)
    ]
    return Boot(serial, time.monotonic() - started, end, reports)
