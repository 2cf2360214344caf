"""How the host boots: the pure A/B boot state machine, the GRUB environment block
and the boot port that reads and writes it.

Owns: ``machine`` (states, transitions, boot prediction, grub.cfg rendering, the
image's boot entry), ``grubenv`` (the two-copy GRUB environment file), ``port`` (the
boot port the host layer drives).

May import: ``organixmd.base``, ``organixmd.release``.
"""
