"""The running daemon: composition, the poll loop, the control socket, events,
metrics and systemd notification.

Owns: ``compose`` (builds the parts), ``daemon`` (poll loop, signals, shutdown),
``api`` (the control socket and its event hub), ``metrics`` (Prometheus text),
``notify`` (sd_notify and the watchdog).

May import: every lower layer of ``organixmd`` (``base``, ``release``, ``boot``,
``install``, ``host``). Only ``organixmd.cli`` imports this package.
"""
