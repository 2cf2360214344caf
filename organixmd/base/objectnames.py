"""The names of a release's objects next to each other at the source.

A release named ``NAME`` (a URL, S3 key or path without suffix) is published as
``NAME.meta`` (the descriptor) and ``NAME.meta.minisig`` (its signature); the image
object is named inside the meta, relative to it, and its delta index sits beside it
(``<image object>.delta``, ``.delta.minisig``), naming the frames object
(``images/<sha256>.frames.zst``; docs/format.md, "Delta updates").
"""

from __future__ import annotations

META_SUFFIX = ".meta"
SIGNATURE_SUFFIX = META_SUFFIX + ".minisig"


def meta_name(name: str) -> str:
    return name + META_SUFFIX


def signature_name(name: str) -> str:
    return name + SIGNATURE_SUFFIX


DELTA_SUFFIX = ".delta"


def delta_index_name(image_object: str) -> str:
    """The delta index's object name, next to the image object."""
    return image_object + DELTA_SUFFIX


def frames_object_name(sha256: str) -> str:
    """The content-addressed name the publisher gives a frames object."""
    return f"images/{sha256}.frames.zst"
