"""The names of a release's objects next to each other at the source.

A release named ``NAME`` (a URL, S3 key or path without suffix) is published as
``NAME.meta`` (the descriptor) and ``NAME.meta.minisig`` (its signature); the image
object is named inside the meta, relative to it.
"""

from __future__ import annotations

META_SUFFIX = ".meta"
SIGNATURE_SUFFIX = META_SUFFIX + ".minisig"


def meta_name(name: str) -> str:
    return name + META_SUFFIX


def signature_name(name: str) -> str:
    return name + SIGNATURE_SUFFIX
