"""Boot a disk image in real GRUB (QEMU with SeaBIOS or OVMF, or grub-emu) and read its verdict.

The boot menu entry of organixm's grub.cfg prints one marker line when the slot has
no kernel (as in these tests) and halts, so QEMU exits::

    ORGANIXM-BOOT slot=b state=trial tries_left=xx reason=trial try=1 env=primary

OVMF mirrors its console onto the serial port, so under UEFI a line may appear
twice, once possibly cut short: markers are de-duplicated when parsed. Any
"Press any key to continue" pause is answered with a carriage return, and counted.
"""

from __future__ import annotations

import os
import re
import select
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

OVMF = Path("/usr/share/ovmf/OVMF.fd")
FIRMWARES = ("bios", "uefi")
PAUSE = b"Press any key to continue"
MENU_SIGNS = (b"GNU GRUB  version", b"Use the ^ and v keys", b"highlighted entry will be")
_MARKER = re.compile(r"ORGANIXM-BOOT((?: [a-z_]+=(?:(?!ORGANIXM-)\S)*)+)")
_CMDLINE = re.compile(r"ORGANIXM-CMDLINE ((?:(?!ORGANIXM-)[^\r\n])*)")


class BootFailed(AssertionError):
    """GRUB did not reach a verdict (hung, showed a menu, or printed conflicting markers)."""


@dataclass(frozen=True, slots=True)
class BootResult:
    marker: dict[str, str]
    #: The kernel path and command line the entry would boot, as GRUB printed them.
    cmdline: str | None
    seconds: float
    pauses: int
    output: str

    @property
    def slot(self) -> str:
        return self.marker["slot"]

    @property
    def reason(self) -> str:
        return self.marker["reason"]


def parse_markers(output: str) -> dict[str, str]:
    """The one decision GRUB printed; mirrored or truncated copies are folded into it."""
    found: list[dict[str, str]] = []
    for match in _MARKER.finditer(output):
        fields = dict(word.split("=", 1) for word in match.group(1).split())
        found.append(fields)
    if not found:
        raise BootFailed(f"no ORGANIXM-BOOT marker in the output:\n{output[-2000:]}")
    best = max(found, key=lambda fields: (len(fields), sum(map(len, fields.values()))))
    for fields in found:
        for key, value in fields.items():
            # A copy cut at 80 columns holds a prefix of the last value it shows.
            if key not in best or not best[key].startswith(value):
                raise BootFailed(f"conflicting markers {fields} and {best}:\n{output[-2000:]}")
    return best


def parse_cmdline(output: str) -> str | None:
    """The longest (untruncated) ORGANIXM-CMDLINE line GRUB printed, if any."""
    lines = [match.group(1).strip() for match in _CMDLINE.finditer(output)]
    return max(lines, key=len) if lines else None


def qemu_argv(disk: Path, firmware: str) -> list[str]:
    argv = [
        "qemu-system-x86_64",
        "-machine",
        "q35,accel=tcg",
        "-m",
        "256",
        "-display",
        "none",
        "-no-reboot",
        "-nodefaults",
        "-serial",
        "stdio",
        "-drive",
        f"file={disk},format=raw,if=virtio",
    ]
    if firmware == "uefi":
        argv[1:1] = ["-bios", str(OVMF)]
    elif firmware != "bios":
        raise ValueError(f"firmware must be one of {FIRMWARES}, not {firmware!r}")
    return argv


def emu_argv(disk: Path, device_map: Path, boot_partition: int) -> list[str]:
    device_map.write_text(f"(hd0) {disk}\n")
    return ["grub-emu", "-m", str(device_map), "-r", f"hd0,gpt{boot_partition}", "-d", "/grub"]


def run_until_exit(argv: list[str], *, timeout: float) -> BootResult:
    """Run a GRUB harness to its exit, answering pauses, and parse the marker."""
    started = time.monotonic()
    process = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert process.stdin is not None
    assert process.stdout is not None
    output = bytearray()
    pauses = 0
    try:
        descriptor = process.stdout.fileno()
        while True:
            remaining = started + timeout - time.monotonic()
            if remaining <= 0:
                raise BootFailed(
                    f"{argv[0]} did not exit within {timeout} s:\n"
                    f"{output[-2000:].decode(errors='replace')}"
                )
            ready, _, _ = select.select([descriptor], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(descriptor, 65536)
            if not chunk:
                break
            output += chunk
            if output.count(PAUSE) > pauses:
                pauses = output.count(PAUSE)
                process.stdin.write(b"\r")
                process.stdin.flush()
        process.wait(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdin.close()
        process.stdout.close()
    seconds = time.monotonic() - started
    text = output.decode(errors="replace")
    if process.returncode != 0:
        raise BootFailed(f"{argv[0]} exited with {process.returncode}:\n{text[-2000:]}")
    if any(sign in output for sign in MENU_SIGNS):
        raise BootFailed(f"GRUB showed an interactive menu:\n{text[-2000:]}")
    return BootResult(parse_markers(text), parse_cmdline(text), seconds, pauses, text)


def boot_qemu(disk: Path, firmware: str, *, timeout: float = 90.0) -> BootResult:
    """One boot of ``disk`` in QEMU (software emulation) with ``bios`` or ``uefi`` firmware."""
    return run_until_exit(qemu_argv(disk, firmware), timeout=timeout)


def boot_emu(
    disk: Path, scratch: Path, boot_partition: int, *, timeout: float = 30.0
) -> BootResult:
    """One boot of ``disk`` in grub-emu (GRUB as a Linux process; no firmware, no VM)."""
    return run_until_exit(emu_argv(disk, scratch / "device.map", boot_partition), timeout=timeout)
