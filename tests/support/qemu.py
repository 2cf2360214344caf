"""Boot a disk image in real GRUB (QEMU with SeaBIOS or OVMF, or grub-emu) and read its verdict.

The slots carry a tiny real kernel (:mod:`tests.support.tinykernel`) whose init prints
the command line GRUB gave it and powers off, so QEMU exits::

    organixm: booting slot b (trial)
    ORGANIXM-BOOTED cmdline=BOOT_IMAGE=(hd0,gpt5)/boot/vmlinuz organixm.slot=b ... ORGANIXM-END

The first line is GRUB's, once per entry that tried a slot. grub-emu cannot start a
kernel: there the last "booting slot" line is the decision. When no slot can boot,
GRUB says so and waits before restarting; the harness presses Esc to skip the wait
and QEMU (``-no-reboot``) exits.

OVMF mirrors its console onto the serial port, so under UEFI a GRUB line may appear
twice: lines are de-duplicated when parsed. Any "Press any key to continue" pause is
answered with a carriage return, and counted.
"""

from __future__ import annotations

import os
import re
import select
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.support.tinykernel import BOOTED, END

OVMF = Path("/usr/share/ovmf/OVMF.fd")
FIRMWARES = ("bios", "uefi")
PAUSE = b"Press any key to continue"
NO_SLOT = "organixm: no slot could be booted"
#: GRUB's wait before restarting when no slot boots; Esc skips it.
RESTART_WAIT = b"organixm: restarting in"
ESCAPE = b"\x1b"
MENU_SIGNS = (b"GNU GRUB  version", b"Use the ^ and v keys", b"highlighted entry will be")
_ATTEMPT = re.compile(r"organixm: booting slot ([ab]) \(([a-z-]+)\)")
_BOOTED = re.compile(re.escape(BOOTED) + r" cmdline=([^\r\n]*?) " + re.escape(END))


class BootFailed(AssertionError):
    """GRUB did not reach a verdict (hung, showed a menu, or printed conflicting lines)."""


@dataclass(frozen=True, slots=True)
class BootResult:
    #: The kernel command line the booted kernel saw (``/proc/cmdline``), if one booted.
    cmdline: str | None
    #: ``(slot, reason)`` of each "organixm: booting slot" line GRUB printed, in order.
    attempts: list[tuple[str, str]]
    #: GRUB found no slot it could boot (the last-resort entry ran).
    no_slot: bool
    seconds: float
    pauses: int
    output: str

    def _param(self, name: str) -> str:
        assert self.cmdline is not None
        # The first occurrence is GRUB's own word (docs/boot.md).
        for word in self.cmdline.split():
            if word.startswith(f"{name}="):
                return word.partition("=")[2]
        raise BootFailed(f"no {name}= on the command line {self.cmdline!r}")

    @property
    def slot(self) -> str:
        """The slot that booted: from the kernel, else GRUB's last attempt, else ``none``."""
        if self.cmdline is not None:
            return self._param("organixm.slot")
        return self.attempts[-1][0] if self.attempts and not self.no_slot else "none"

    @property
    def reason(self) -> str:
        if self.cmdline is not None:
            return self._param("organixm.reason")
        return self.attempts[-1][1] if self.attempts and not self.no_slot else "no-bootable-slot"

    @property
    def boot_image(self) -> str:
        """GRUB's ``BOOT_IMAGE=`` word: the device and path of the kernel it loaded."""
        return self._param("BOOT_IMAGE")

    @property
    def args(self) -> str:
        """The command line without GRUB's ``BOOT_IMAGE=`` word."""
        assert self.cmdline is not None
        return " ".join(w for w in self.cmdline.split() if not w.startswith("BOOT_IMAGE="))


def parse_attempts(output: str) -> list[tuple[str, str]]:
    """GRUB's "booting slot" lines in order, each mirrored copy folded into one."""
    attempts: list[tuple[str, str]] = []
    for match in _ATTEMPT.finditer(output):
        attempt = (match.group(1), match.group(2))
        if not attempts or attempts[-1] != attempt:
            attempts.append(attempt)
    return attempts


def parse_boot(output: str, *, seconds: float, pauses: int, kernel: bool) -> BootResult:
    """The verdict in one boot's output; ``kernel`` says the harness can start a kernel."""
    cmdlines = set(_BOOTED.findall(output))
    if len(cmdlines) > 1:
        raise BootFailed(f"more than one kernel command line {cmdlines}:\n{output[-3000:]}")
    cmdline = cmdlines.pop() if cmdlines else None
    attempts = parse_attempts(output)
    no_slot = NO_SLOT in output
    result = BootResult(cmdline, attempts, no_slot, seconds, pauses, output)
    if no_slot and cmdline is not None:
        raise BootFailed(f"a kernel booted and GRUB said no slot could:\n{output[-3000:]}")
    if kernel and not no_slot and cmdline is None:
        raise BootFailed(f"no kernel reported its command line:\n{output[-3000:]}")
    if not no_slot and not attempts:
        raise BootFailed(f"GRUB printed no 'booting slot' line:\n{output[-3000:]}")
    if cmdline is not None and attempts[-1] != (result.slot, result.reason):
        raise BootFailed(
            f"GRUB said it booted {attempts[-1]}, the kernel saw {cmdline!r}:\n{output[-3000:]}"
        )
    return result


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


def run_until_exit(argv: list[str], *, timeout: float, kernel: bool) -> BootResult:
    """Run a GRUB harness to its exit, answering pauses, and parse what booted.

    Without a ``kernel`` (grub-emu) the run ends at GRUB's first decision line: the
    decision was saved before it was printed, and nothing after it can boot there.
    """
    started = time.monotonic()
    process = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert process.stdin is not None
    assert process.stdout is not None
    output = bytearray()
    pauses = 0
    skipped_wait = False
    stopped = False
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
            if not kernel and (
                _ATTEMPT.search(output.decode(errors="replace")) or RESTART_WAIT in output
            ):
                stopped = True
                break
            if output.count(PAUSE) > pauses:
                pauses = output.count(PAUSE)
                process.stdin.write(b"\r")
                process.stdin.flush()
            if not skipped_wait and RESTART_WAIT in output:
                skipped_wait = True
                process.stdin.write(ESCAPE)
                process.stdin.flush()
        if not stopped:
            process.wait(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdin.close()
        process.stdout.close()
    seconds = time.monotonic() - started
    text = output.decode(errors="replace")
    if process.returncode != 0 and not stopped:
        raise BootFailed(f"{argv[0]} exited with {process.returncode}:\n{text[-2000:]}")
    if any(sign in output for sign in MENU_SIGNS):
        raise BootFailed(f"GRUB showed an interactive menu:\n{text[-2000:]}")
    return parse_boot(text, seconds=seconds, pauses=pauses, kernel=kernel)


def boot_qemu(disk: Path, firmware: str, *, timeout: float = 90.0) -> BootResult:
    """One boot of ``disk`` in QEMU (software emulation) with ``bios`` or ``uefi`` firmware."""
    return run_until_exit(qemu_argv(disk, firmware), timeout=timeout, kernel=True)


def boot_emu(
    disk: Path, scratch: Path, boot_partition: int, *, timeout: float = 30.0
) -> BootResult:
    """One boot of ``disk`` in grub-emu (GRUB as a Linux process; no firmware, no VM).

    grub-emu loads no Linux kernel: the entry's ``linux`` fails and GRUB falls back,
    so the run ends at the first "booting slot" line, the decision.
    """
    return run_until_exit(
        emu_argv(disk, scratch / "device.map", boot_partition), timeout=timeout, kernel=False
    )
