"""The names of a release's objects next to each other at the source.

A release named ``NAME`` (a URL, S3 key or path without suffix) is published as
``NAME.meta`` (the descriptor) and ``NAME.meta.minisig`` (its signature); the image
object is named inside the meta, relative to it, and its delta index sits beside it
(``<image object>.delta``, ``.delta.minisig``), naming the frames object
(``images/<sha256>.frames.zst``; docs/format.md, "Delta updates").
"""

from __future__ import annotations

META_SUFFIX = ".meta"
#: A detached minisign signature sits next to what it signs, under this suffix.
MINISIG_SUFFIX = ".minisig"
SIGNATURE_SUFFIX = META_SUFFIX + MINISIG_SUFFIX
#: Where the publisher puts images (content-addressed), relative to the meta.
IMAGES_DIR = "images"


def meta_name(name: str) -> str:
    return name + META_SUFFIX


def signature_name(name: str) -> str:
    return name + SIGNATURE_SUFFIX


def image_object_name(compressed_sha256: str) -> str:
    """The content-addressed name the publisher gives an image object."""
    return f"{IMAGES_DIR}/{compressed_sha256}.img.zst"


DELTA_SUFFIX = ".delta"


def delta_index_name(image_object: str) -> str:
    """The delta index's object name, next to the image object."""
    return image_object + DELTA_SUFFIX


def delta_signature_name(image_object: str) -> str:
    """The delta index's signature, next to the index."""
    return delta_index_name(image_object) + MINISIG_SUFFIX


def frames_object_name(sha256: str) -> str:
    """The content-addressed name the publisher gives a frames object."""
    return f"{IMAGES_DIR}/{sha256}.frames.zst"
