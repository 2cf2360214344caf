"""organixctl status latency: the installed entry point against a real daemon's socket.

Prints the median of N runs of ``organixctl status`` and, measured in the same run, of
the bare interpreter start (``python3 -S -c pass`` with the same interpreter) and of a
stdlib-only client doing the same request (``http.client`` over the Unix socket), and
their ratios. The client imports only the standard library and organixctl (the test
suite checks that); what is left is interpreter start and the answer.

Run: ``.venv/bin/python bench/cli.py`` (``--runs N``, default 30).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.support.daemon import DaemonProcess, make_images, prepare_host  # noqa: E402
from tests.support.releases import build_release  # noqa: E402

RAW_CLIENT = """
import http.client, socket, sys
class C(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX); self.sock.connect(sys.argv[1])
c = C("localhost"); c.request("GET", "/v1/status"); c.getresponse().read()
"""


def median_seconds(command: list[str], runs: int, env: dict[str, str]) -> float:
    subprocess.run(command, stdout=subprocess.DEVNULL, env=env, check=True)  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(command, stdout=subprocess.DEVNULL, env=env, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="organixm-bench-cli-") as scratch:
        root = Path(scratch)
        (image,) = make_images(root / "images", 1)
        release = build_release(image, root / "pub")
        host = prepare_host(root / "host", release.url, installed=image)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env["PYTHONPYCACHEPREFIX"] = str(root / "pycache")
        try:
            with DaemonProcess(host).start():
                ctl = [str(Path(sys.executable).with_name("organixctl")), "status"]
                status = median_seconds([*ctl, "--socket", str(host.socket)], args.runs, env)
                bare = median_seconds([sys.executable, "-S", "-c", "pass"], args.runs, env)
                raw = median_seconds(
                    [sys.executable, "-S", "-c", RAW_CLIENT, str(host.socket)], args.runs, env
                )
        finally:
            host.cleanup()
    print(f"organixctl status          median {status * 1000:6.1f} ms of {args.runs}")
    print(f"python3 -S -c pass         median {bare * 1000:6.1f} ms (reference)")
    print(f"stdlib client, same answer median {raw * 1000:6.1f} ms (reference)")
    print(f"ratio status / bare start   {status / bare:5.2f}")
    print(f"ratio status / stdlib client {status / raw:5.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
