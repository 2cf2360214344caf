"""A tiny real Linux for the boot tests: Debian's cloud kernel and a busybox initramfs.

GRUB in the tests boots this kernel for real. Its ``/init`` mounts ``/proc``, writes
one line to the serial port and powers the machine off, so QEMU exits::

    ORGANIXM-BOOTED cmdline=BOOT_IMAGE=(hd0,gpt5)/boot/vmlinuz organixm.slot=b ... ORGANIXM-END

The kernel comes from the package ``linux-image-cloud-amd64`` depends on and busybox
from ``busybox-static``; both are fetched with ``apt-get download`` and unpacked
with ``dpkg-deb``, never installed. The kernel and the initramfs built from them are
cached under :data:`CACHE` (``$ORGANIXM_TEST_CACHE``, default
``/var/cache/organixm-tests``) in a directory named by both package versions and
the init script, so a new Debian kernel or a changed script builds a new pair and
every worktree and fresh clone on the machine shares one download.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import shutil
import stat
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from organixmd.release.meta import BootEntry
from tests.support.images import make_ext4_image, populate_tree

CACHE = Path(os.environ.get("ORGANIXM_TEST_CACHE", "/var/cache/organixm-tests"))
KERNEL_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
BOOTED = "ORGANIXM-BOOTED"
END = "ORGANIXM-END"

#: The boot entry of a slot that carries the tiny kernel (see :func:`install_kernel`).
TINY_BOOT = BootEntry(
    kernel="/boot/vmlinuz",
    initrd="/boot/initrd.img",
    init="/sbin/init",
    # no_timer_check: under software emulation on a loaded host the kernel's IO-APIC
    # timer check can miss its ticks and panic ("IO-APIC + timer doesn't work").
    params=["console=ttyS0", "quiet", "no_timer_check"],
)

# printk is silenced first so no kernel message lands inside the marker line; without
# /proc the line still comes (with an empty command line) and says so.
INIT_SCRIPT = f"""#!/bin/sh
/bin/busybox mount -t proc proc /proc || echo "{BOOTED} error=no-proc" > /dev/ttyS0
echo 1 > /proc/sys/kernel/printk
read -r cmdline < /proc/cmdline
echo "{BOOTED} cmdline=$cmdline {END}" > /dev/ttyS0
/bin/busybox poweroff -f
"""


@dataclass(frozen=True, slots=True)
class TinyKernel:
    kernel: Path
    initrd: Path
    #: The cache key: kernel package and version, busybox version, init script digest.
    version: str


def _run(argv: list[str], *, cwd: Path | None = None) -> str:
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}; "
            "the boot tests need Debian's package lists (apt-get update) and the mirror"
        )
    return result.stdout


def _candidate(package: str) -> dict[str, str]:
    """The fields of ``package``'s candidate version in the local package lists."""
    fields: dict[str, str] = {}
    for line in _run(["apt-cache", "show", "--no-all-versions", package]).splitlines():
        name, sep, value = line.partition(": ")
        if sep and not line.startswith(" "):
            fields[name] = value
    if "Version" not in fields:
        raise RuntimeError(f"apt-cache knows no version of {package}; run apt-get update")
    return fields


def kernel_package() -> tuple[str, str]:
    """The versioned kernel package the cloud meta-package depends on, and its version."""
    depends = _candidate(KERNEL_PACKAGE).get("Depends", "")
    match = re.search(r"(linux-image-[0-9][^ ,]*-cloud-amd64) \(= ([^)]+)\)", depends)
    if match is None:
        raise RuntimeError(f"{KERNEL_PACKAGE} depends on no versioned kernel: {depends!r}")
    return match.group(1), match.group(2)


def _cpio_entry(name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> bytes:
    """One ``newc`` cpio record (what the kernel unpacks an initramfs from)."""
    encoded = name.encode() + b"\0"
    fields = [0, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0]
    header = b"070701" + b"".join(f"{value:08x}".encode() for value in fields)
    record = header + encoded
    record += b"\0" * (-len(record) % 4)
    return record + data + b"\0" * (-len(data) % 4)


def build_initramfs(busybox: bytes) -> bytes:
    """A gzip'd initramfs holding busybox, ``/init`` and the two device nodes it needs."""
    directory = stat.S_IFDIR | 0o755
    archive = b"".join(
        [
            _cpio_entry("bin", directory),
            _cpio_entry("dev", directory),
            _cpio_entry("proc", directory),
            _cpio_entry("bin/busybox", stat.S_IFREG | 0o755, busybox),
            _cpio_entry("bin/sh", stat.S_IFLNK | 0o777, b"busybox"),
            _cpio_entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
            _cpio_entry("dev/ttyS0", stat.S_IFCHR | 0o660, rdev=(4, 64)),
            _cpio_entry("init", stat.S_IFREG | 0o755, INIT_SCRIPT.encode()),
            _cpio_entry("TRAILER!!!", 0),
        ]
    )
    return gzip.compress(archive, compresslevel=9, mtime=0)


def _member(deb: Path, pattern: str) -> bytes:
    """The one file of ``deb``'s data whose path matches ``pattern`` (streamed, not unpacked)."""
    tar = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    assert tar.stdout is not None
    found: bytes | None = None
    try:
        with tarfile.open(fileobj=tar.stdout, mode="r|") as archive:
            for member in archive:
                if member.isfile() and re.fullmatch(pattern, member.name):
                    extracted = archive.extractfile(member)
                    assert extracted is not None
                    found = extracted.read()
                    break
    finally:
        # The rest of the archive (the kernel's modules) is not needed.
        tar.kill()
        tar.wait()
        tar.stdout.close()
    if found is None:
        raise RuntimeError(f"{deb.name} holds no file matching {pattern}")
    return found


def tiny_kernel() -> TinyKernel:
    """The cached kernel and initramfs for the current Debian packages, built on first use."""
    kernel_name, kernel_version = kernel_package()
    busybox_version = _candidate(BUSYBOX_PACKAGE)["Version"]
    script = hashlib.sha256(INIT_SCRIPT.encode()).hexdigest()[:12]
    version = f"{kernel_name}_{kernel_version}+busybox_{busybox_version}+init_{script}"
    target = CACHE / re.sub(r"[^A-Za-z0-9._+-]", "_", version)
    result = TinyKernel(target / "vmlinuz", target / "initrd.img", version)
    if result.kernel.is_file() and result.initrd.is_file():
        return result
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE, prefix=".build-") as scratch:
        work = Path(scratch)
        # _apt must be able to write the download directory, or apt warns.
        work.chmod(0o755)
        _run(
            [
                "apt-get",
                "download",
                f"{kernel_name}={kernel_version}",
                f"{BUSYBOX_PACKAGE}={busybox_version}",
            ],
            cwd=work,
        )
        (kernel_deb,) = work.glob(f"{kernel_name}_*.deb")
        (busybox_deb,) = work.glob(f"{BUSYBOX_PACKAGE}_*.deb")
        built = work / "built"
        built.mkdir()
        (built / "vmlinuz").write_bytes(_member(kernel_deb, r"\./boot/vmlinuz-.*"))
        (built / "initrd.img").write_bytes(build_initramfs(_member(busybox_deb, r"\./bin/busybox")))
        (built / "VERSION").write_text(version + "\n")
        try:
            built.rename(target)
        except OSError:
            # Another test run built the same pair meanwhile; theirs is as good.
            if not result.kernel.is_file():
                raise
    return result


def install_kernel(tree: Path, kernel: TinyKernel, entry: BootEntry = TINY_BOOT) -> None:
    """Copy the kernel and initramfs into a slot image tree at the paths ``entry`` names."""
    for source, path in ((kernel.kernel, entry.kernel), (kernel.initrd, entry.initrd)):
        destination = tree / path.lstrip("/")
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, destination)


def make_bootable_image(
    path: Path,
    size: int,
    kernel: TinyKernel,
    *,
    payload_bytes: int,
    seed: int = 1,
    entry: BootEntry = TINY_BOOT,
) -> Path:
    """An ext4 slot image with generated files, the tiny kernel and a boot entry naming it."""
    tree = path.with_suffix(".tree")
    tree.mkdir(parents=True, exist_ok=True)
    populate_tree(tree, payload_bytes, seed)
    install_kernel(tree, kernel, entry)
    return make_ext4_image(path, size, tree=tree, boot=entry)
