"""Writing a release onto a slot: the install pipeline, block I/O and the slots.

Owns: ``pipeline`` (network, decompress, hash, O_DIRECT write; checkpoints; read-back),
``blockio`` (aligned buffers, slot writers, device hashing), ``slots`` (which slot
booted, slot devices, capacity and the mounted check).

May import: ``organixmd.base``, ``organixmd.release``, ``organixmd.boot``.
"""
