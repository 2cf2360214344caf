"""Making a host: partitioning a disk or an image file, installing GRUB and writing
the first release.

Owns: ``disklayout`` (partition table, file systems, GRUB core and grub.cfg),
``provision`` (the whole first install).

May import: ``organixmd.base``, ``organixmd.release``, ``organixmd.boot``,
``organixmd.install``. Nothing of the daemon's host or service layers, and nothing of
the rest of ``organixctl``.
"""
