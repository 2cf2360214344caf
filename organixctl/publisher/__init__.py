"""Making a release: the image as independent zstd frames with a seek table, and
publishing the image, its signature and its meta to a directory or S3.

Owns: ``image`` (chunking, compression, the seek table), ``publish`` (the upload
order and its checks).

May import: ``organixmd.base``, ``organixmd.release``, ``organixmd.boot``. Nothing
of the daemon's host or service layers, and nothing of the rest of ``organixctl``.
"""
