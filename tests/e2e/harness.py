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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from organixmd.boot.machine import BootControl, BootState, write_boot_env
from organixmd.release.meta import BootEntry

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
WHEEL_DEPS = (
    "aiohttp",
    "aiobotocore",
    "pydantic",
    "structlog",
    "zstandard",
    "cryptography",
    "xxhash",
)
TOOLS = ("mmdebstrap", "qemu-system-x86_64", "mkfs.ext4", "debugfs", "journalctl", "sgdisk")
STICK_LABEL = "e2e-stick"
RELEASE_NAME = "e2e"
#: Kernel, initrd and root in the slot; the initrd finds the root by organixm.slot=.
# no_timer_check: under TCG on a loaded host the IO-APIC timer check can panic the kernel.
BOOT_PARAMS = ("console=ttyS0,115200", "ro", "panic=5", "no_timer_check")


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
        # Not needed at run time, and every byte of the image is downloaded, written and
        # read back at each install: pip and setuptools, zstandard's unused cffi backend.
        'cd "$1"/opt/organixm/lib/python3*/site-packages && rm -rf pip pip-* setuptools '
        "setuptools-* pkg_resources _distutils_hack distutils-precedence.pth zstandard/_cffi*",
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
        "apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer getty@tty1.service "
        # No login prompt on the serial console: nobody logs in, and it costs boot time.
        "serial-getty@ttyS0.service",
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
            [
                PACKAGES,
                _wheel_digest(wheel),
                sorted(p.name for p in wheels.glob("*.whl")),
                # The steps themselves (the wheel directory changes at every run).
                _customize(Path("/wheels")),
            ]
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
    #: The kernel parameters in the image's boot entry.
    params: tuple[str, ...] = BOOT_PARAMS


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


def build_base_image(tree: Path, out: Path) -> Path:
    """The guest tree as one ext4 slot image, without any release's own files."""
    # Allocated bytes plus room for the journal and inode tables: every byte of the
    # image is downloaded, written, hashed and read back at each install in the guest.
    size = int(run(["du", "-s", "-B1", str(tree)]).stdout.split()[0])
    size = (size * 105 // 100 + 40 * 2**20) // 2**20 * 2**20
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
    return out


def build_release_image(tree: Path, base: Path, release: Release, out: Path) -> Path:
    """A copy of the base image plus the release's own files (written with debugfs)."""
    run(["cp", "--sparse=always", str(base), str(out)])
    kernel, initrd = kernel_paths(tree)
    extra = out.with_suffix(".files")
    extra.mkdir(exist_ok=True)
    write_boot_env(
        extra / "boot.env",
        BootEntry(
            kernel=kernel,
            initrd=initrd,
            init="/sbin/init",
            params=list(release.params),
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
            # The guests install whole images: under emulation, keying a 500 MiB slot
            # for a delta costs more than the stick's whole image (tests/test_delta.py
            # covers delta installs).
            "--no-delta",
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
    """A partition of the disk image loop-mounted at a temporary directory.

    By default read-only without replaying the ext4 journal: what GRUB sees, which
    reads no journal either. With ``replay`` a copy of the partition is mounted, so
    its journal is replayed as the guest's next mount would (after a power cut the
    newest metadata, a renamed state file say, may be in the journal only); the
    disk image itself is never changed.
    """

    def __init__(self, disk: Path, name: str, *, replay: bool = False) -> None:
        offset, size = _partitions(disk)[name]
        self.copy: Path | None = None
        source, options = disk, ["--offset", str(offset), "--sizelimit", str(size), "--read-only"]
        if replay:
            fd, copy = tempfile.mkstemp(prefix=f"e2e-{name}-", suffix=".img")
            os.close(fd)
            self.copy = source = Path(copy)
            run(
                [
                    "dd",
                    f"if={disk}",
                    f"of={copy}",
                    "bs=4M",
                    f"skip={offset}",
                    f"count={size}",
                    "iflag=skip_bytes,count_bytes",
                    "conv=sparse",
                    "status=none",
                ]
            )
            options = []
        self.loop = run(["losetup", "--find", "--show", *options, str(source)]).stdout.strip()
        self.path = Path(tempfile.mkdtemp(prefix=f"e2e-{name}-"))
        try:
            run(["mount", "-o", "rw" if replay else "ro,noload", self.loop, str(self.path)])
        except BaseException:
            run(["losetup", "-d", self.loop])
            if self.copy is not None:
                self.copy.unlink()
            raise

    def close(self) -> None:
        run(["umount", str(self.path)])
        run(["losetup", "-d", self.loop])
        self.path.rmdir()
        if self.copy is not None:
            self.copy.unlink()

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc: object) -> None:
        self.close()


def slot_partition(disk: Path, slot: str) -> tuple[int, int]:
    """(byte offset, byte size) of slot ``a`` or ``b`` in the disk image."""
    return _partitions(disk)[f"organixm-{slot}"]


def image_probe(image: Path, *, fraction: float = 0.5, size: int = 4096) -> tuple[int, bytes]:
    """A non-zero block of ``image`` at about ``fraction`` of it: (offset, bytes).

    Seeing these bytes at the same offset in a slot that was empty before tells the
    harness that the guest's install has written at least that far.
    """
    total = image.stat().st_size
    with open(image, "rb") as handle:
        offset = int(total * fraction) // size * size
        while offset + size <= total:
            handle.seek(offset)
            block = handle.read(size)
            if block.strip(b"\0"):
                return offset, block
            offset += 2**20
    raise AssertionError(f"{image} has no data after {fraction:.0%} of it to watch for")


class SlotFilled:
    """A kill condition for :func:`boot`: the slot holds the probe block of an image."""

    def __init__(self, disk: Path, slot: str, probe: tuple[int, bytes]) -> None:
        self.disk = disk
        self.offset = slot_partition(disk, slot)[0] + probe[0]
        self.expected = probe[1]

    def __call__(self, serial: str) -> bool:
        with open(self.disk, "rb") as handle:
            handle.seek(self.offset)
            return handle.read(len(self.expected)) == self.expected


def damage_superblock_checksum(disk: Path, slot: str) -> None:
    """Flip the ext4 superblock checksum of a slot (GRUB does not check it; Linux does).

    GRUB still reads the slot's boot entry, kernel and initrd; the kernel refuses to
    mount the file system ("invalid superblock checksum"), so the initrd cannot.
    """
    offset = slot_partition(disk, slot)[0] + 1024
    with open(disk, "r+b") as handle:
        handle.seek(offset)
        superblock = bytearray(handle.read(1024))
        if superblock[0x38:0x3A] != b"\x53\xef":
            raise AssertionError(f"slot {slot} of {disk} holds no ext4 superblock")
        if not int.from_bytes(superblock[0x64:0x68], "little") & 0x400:
            raise AssertionError(f"slot {slot} of {disk} has no metadata_csum to damage")
        superblock[0x3FC:0x400] = bytes(b ^ 0xFF for b in superblock[0x3FC:0x400])
        handle.seek(offset)
        handle.write(superblock)
        handle.flush()
        os.fsync(handle.fileno())


def read_boot_state(disk: Path) -> BootState:
    with Mounted(disk, "organixm-boot") as boot:
        return BootControl(boot / "grub" / "grubenv", boot / "grub" / "grubenv.bak").read()


def read_journal(disk: Path) -> list[dict[str, Any]]:
    """Every entry of the guest's persistent journal (on the rw partition)."""
    with Mounted(disk, "organixm-rw", replay=True) as rw:
        out = run(["journalctl", "-D", str(rw / "log" / "journal"), "-o", "json", "--no-pager"])
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def read_state(disk: Path) -> dict[str, Any]:
    with Mounted(disk, "organixm-rw", replay=True) as rw:
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
    kill_when: Callable[[str], bool] | None = None,
) -> Boot:
    """Boot the guest once in QEMU (TCG) until it reboots or powers off.

    ``kill_when`` is called with the serial output so far, five times a second; once
    it returns true QEMU is killed (a power cut) and the boot ends as "killed".
    """
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
    log.write_text("")  # QEMU truncates it too; kill_when reads it from the start
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
            if kill_when is not None and kill_when(log.read_text(errors="replace")):
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


# ---------------------------------------------------------------------------- scenarios

#: 1.0 is provisioned; it stages what it installs with two tries.
R1 = Release("1.0", 1)
#: 2.0 passes; it stages what it installs with one try, so a failing trial costs one boot.
R2 = Release("2.0", 2, trial_boots=1)
#: 3.0's success unit fails (mark-bad).
R3 = Release("3.0", 3, behaviour="fail")
#: 4.0 has no panic= of its own: the initramfs hook's panic=10 is what reboots it.
R4 = Release("4.0", 4, params=("console=ttyS0,115200", "ro"))
#: 5.0's success unit never returns: no mark-bad, no commit.
R5 = Release("5.0", 5, behaviour="hang")


@dataclass(frozen=True, slots=True)
class Published:
    release: Release
    #: What ``organixctl publish`` wrote: the .meta (provision reads it).
    meta: Path
    #: A USB-stick disk holding only this release.
    stick: Path
    #: A block of the image and its offset (:func:`image_probe`).
    probe: tuple[int, bytes]


class Releases:
    """Each release built, published and put on a stick once, when first asked for."""

    def __init__(self, work: Path, tree: Path) -> None:
        self.work = work
        self.tree = tree
        self._base: Path | None = None
        self._done: dict[Release, Published] = {}
        work.mkdir(parents=True, exist_ok=True)

    def __getitem__(self, release: Release) -> Published:
        if release in self._done:
            return self._done[release]
        started = time.monotonic()
        if self._base is None:
            self._base = build_base_image(self.tree, self.work / "base.img")
        name = f"r{release.serial}"
        image = build_release_image(self.tree, self._base, release, self.work / f"{name}.img")
        probe = image_probe(image)
        directory = self.work / name
        meta = publish(image, release, directory)
        image.unlink()
        shutil.rmtree(image.with_suffix(".files"))
        stick = make_stick(directory, self.work / f"{name}-stick.img")
        published = Published(release, meta, stick, probe)
        self._done[release] = published
        print(
            f"release {release.version} built and published in {time.monotonic() - started:.0f} s"
        )
        return published


class Machine:
    """One disk provisioned with ``organixctl provision``, booted again and again."""

    def __init__(self, name: str, work: Path, firmware: str, first: Published) -> None:
        self.name = name
        self.work = work
        self.firmware = firmware
        self.disk = work / f"{name}.img"
        self.boots = 0
        #: Scenarios that passed on this disk, in order (a later one builds on them).
        self.passed: list[str] = []
        provision(self.disk, first.meta, firmware)

    def require(self, scenario: str) -> None:
        if scenario not in self.passed:
            raise AssertionError(
                f"this scenario continues on the {self.name} disk after '{scenario}', "
                f"which did not pass (passed: {self.passed or 'none'})"
            )

    def boot(self, stick: Published, **kwargs: Any) -> Boot:
        self.boots += 1
        log = self.work / f"{self.name}-boot{self.boots}.log"
        result = boot(self.disk, stick.stick, log, firmware=self.firmware, **kwargs)
        print(
            f"{self.name} boot {self.boots}: {result.end} after {result.seconds:.0f} s; "
            f"{result.grub_line()}"
        )
        return result

    def boot_state(self) -> BootState:
        return read_boot_state(self.disk)

    def state(self) -> dict[str, Any]:
        return read_state(self.disk)

    def journal(self) -> list[dict[str, Any]]:
        return read_journal(self.disk)


def events(journal: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
    """The daemon's journal entries for one event (its EVENT field)."""
    return [
        entry
        for entry in journal
        if entry.get("SYSLOG_IDENTIFIER") == "organixmd" and entry.get("EVENT") == event
    ]


def failed_versions(state: dict[str, Any]) -> dict[str, str]:
    """Version -> reason of every release the daemon remembers as failed."""
    return {item["release"]["version"]: item["reason"] for item in state["failed"]}


def said(serial: str, event: str) -> list[str]:
    """The daemon's journal lines for ``event`` as the serial console showed them."""
    return re.findall(rf"organixmd\[\d+\]: {re.escape(event)}\b.*", serial)
