"""What this host does about releases: one check from fetch to flip, boot assessment
after a boot, the reboot policy, the state file and the host lock.

Owns: ``engine`` (one check, one verdict), ``bootmanager`` (boot assessment and the
reboot policy), ``state`` (the state file), ``hostlock`` (one updater per host).

May import: ``organixmd.base``, ``organixmd.release``, ``organixmd.boot``,
``organixmd.install``.
"""
