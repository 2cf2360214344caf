"""``make demo``: a real publish → update → flip on this machine, then ``organixctl status``.

Everything is real except the hardware: a local S3 server (moto) on 127.0.0.1,
ext4 root images built with ``mkfs.ext4 -d``, file-backed A/B slots, a GRUB
environment block next to them. The commands printed with ``$`` are the ones an
operator and an admin would type; the demo runs them.

Work files go to ``demo-run/`` in the checkout (removed at the next run).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from organixmd.boot.machine import BootControl
from tests.support.images import make_ext4_image
from tests.support.s3 import start_moto

MiB = 1024 * 1024
ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "demo-run"
BIN = Path(sys.executable).parent


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m" if sys.stdout.isatty() else f"\n== {text}", flush=True)


def run(*args: str | Path, env: dict[str, str] | None = None, check: bool = True) -> int:
    words = [str(a) for a in args]
    shown = [Path(w).name if w.startswith(str(BIN)) else w for w in words]
    print("$ " + shlex.join(shown).replace(str(RUN) + "/", ""), flush=True)
    result = subprocess.run(words, env=env, check=False)
    if check and result.returncode != 0:
        raise SystemExit(f"demo: {shown[0]} exited with {result.returncode}")
    return result.returncode


def publish(image: Path, version: str, serial: int, endpoint: str, env: dict[str, str]) -> None:
    run(
        BIN / "organixctl",
        "publish",
        image,
        "--to",
        "s3://fleet/releases/kiosk",
        "--endpoint",
        endpoint,
        "--version",
        version,
        "--serial",
        str(serial),
        "--secret-key",
        RUN / "release.key",
        env=env,
    )


def wait_ready(daemon: subprocess.Popen[bytes], socket_path: Path, env: dict[str, str]) -> None:
    """Wait until the daemon answers and its boot-time check has finished (READY)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            break
        if socket_path.exists():
            answer = subprocess.run(
                [BIN / "organixctl", "status", "--json"], env=env, capture_output=True, check=False
            )
            if answer.stdout and json.loads(answer.stdout)["daemon"]["ready"]:
                return
        time.sleep(0.2)
    print((RUN / "organixmd.log").read_text())
    raise SystemExit("demo: organixmd did not become ready")


def main() -> int:
    if RUN.exists():
        shutil.rmtree(RUN)
    RUN.mkdir()
    say("Start a local S3 server (moto) on 127.0.0.1")
    moto = start_moto(RUN / "moto.log")
    env = {**os.environ, **moto.credentials_env()}
    daemon: subprocess.Popen[bytes] | None = None
    try:
        import boto3

        s3 = boto3.client(
            "s3",
            endpoint_url=moto.endpoint,
            region_name="us-east-1",
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        )
        s3.create_bucket(Bucket="fleet")
        print(f"S3 endpoint {moto.endpoint}, bucket 'fleet'")

        say("Build two root filesystem images with mkfs.ext4 -d (releases 1.0 and 2.0)")
        first = make_ext4_image(RUN / "root-1.0.img", 64 * MiB, payload_bytes=40 * MiB, seed=1)
        second = make_ext4_image(RUN / "root-2.0.img", 64 * MiB, payload_bytes=40 * MiB, seed=2)
        print(f"{first.name}, {second.name}: 64 MiB ext4 each")

        say("Operator: make a signing key and publish release 1.0")
        run(
            BIN / "organixctl",
            "keygen",
            "--secret-key",
            RUN / "release.key",
            "--public-key",
            RUN / "release.pub",
            "--no-password",
        )
        publish(first, "1.0", 1, moto.endpoint, env)

        say("Host: slot a runs release 1.0 (committed); slot b is empty")
        host = RUN / "host"
        (host / "boot").mkdir(parents=True)
        shutil.copyfile(first, host / "slot-a.img")
        with open(host / "slot-a.img", "r+b") as handle:
            handle.truncate(96 * MiB)
        with open(host / "slot-b.img", "wb") as handle:
            handle.truncate(96 * MiB)
        (host / "cmdline").write_text("BOOT_IMAGE=/boot/bzImage organixm.slot=a quiet\n")
        BootControl(host / "boot/grubenv", host / "boot/grubenv.bak").initialize("a")
        (host / "credentials").write_text(
            f"AWS_ACCESS_KEY_ID={env['AWS_ACCESS_KEY_ID']}\n"
            f"AWS_SECRET_ACCESS_KEY={env['AWS_SECRET_ACCESS_KEY']}\n"
        )
        public_key = (RUN / "release.pub").read_text().splitlines()[1]
        config = host / "organixmd.toml"
        config.write_text(
            f"""[source]
url = "s3://fleet/releases/kiosk"
s3_endpoint = "{moto.endpoint}"
credentials = "file"
credentials_file = "{host / "credentials"}"
public_keys = ["{public_key}"]

[slots]
a = "{host / "slot-a.img"}"
b = "{host / "slot-b.img"}"
cmdline = "{host / "cmdline"}"

[boot]
grubenv = "{host / "boot/grubenv"}"
trial_boots = 3
reboot = "never"

[daemon]
state_dir = "{host / "state"}"
socket = "{host / "control.sock"}"
admin_group = "root"
host_id_file = "{host / "machine-id"}"
poll_interval = 3600
"""
        )
        print(config.read_text())

        say("Host: start organixmd; its boot-time check finds slot a already runs 1.0")
        print(f"$ organixmd --config {config.relative_to(RUN)} &", flush=True)
        socket_path = host / "control.sock"
        daemon = subprocess.Popen(
            [BIN / "organixmd", "--config", config],
            stdout=open(RUN / "organixmd.log", "wb"),  # noqa: SIM115 - lives as long as the daemon
            stderr=subprocess.STDOUT,
        )
        ctl_env = {**os.environ, "ORGANIXM_SOCKET": str(socket_path)}
        wait_ready(daemon, socket_path, ctl_env)
        run(BIN / "organixctl", "status", env=ctl_env, check=False)

        say("Operator: publish release 2.0 and check it as a host would")
        publish(second, "2.0", 2, moto.endpoint, env)
        run(
            BIN / "organixctl",
            "verify",
            "s3://fleet/releases/kiosk.meta",
            "--endpoint",
            moto.endpoint,
            "--pubkey",
            RUN / "release.pub",
            env=env,
        )

        say("The published release descriptor (kiosk.meta; chunk table shortened here)")
        meta = json.loads(s3.get_object(Bucket="fleet", Key="releases/kiosk.meta")["Body"].read())
        chunks = meta["image"]["chunks"]
        meta["image"]["chunks"] = [*chunks[:2], f"... {len(chunks) - 2} more chunks"]
        print(json.dumps(meta, indent=1))

        say("Admin: update now (the daemon would also find it at its next poll)")
        code = run(BIN / "organixctl", "update", "--wait", env=ctl_env, check=False)
        print(f"(exit code {code}: 1 means an update is staged and waits for a reboot)")

        say("Admin: what is this host doing, and why?")
        run(BIN / "organixctl", "status", env=ctl_env, check=False)
        run(BIN / "organixctl", "status", "--json", env=ctl_env, check=False)

        say("GRUB: which slot boots next")
        state = BootControl(host / "boot/grubenv", host / "boot/grubenv.bak").read()
        run("grub-editenv", host / "boot/grubenv", "list")
        nxt = state.next_slot
        tries = state.slot(nxt).tries_left if nxt else 0
        print(f"next boot: slot {nxt} ({state.slot(nxt).state if nxt else '-'}, {tries} tries)")
        print("\nDaemon log (JSON lines):")
        print((RUN / "organixmd.log").read_text().strip())
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=30)
        moto.stop()
    say(f"Done. Files are in {RUN}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
