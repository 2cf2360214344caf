"""What a release is and where it comes from: the ``.meta`` descriptor, minisign
signatures, the trust check, and the sources (S3, HTTP(S), files) it is fetched from.

Owns: ``meta`` (strict models of the descriptor), ``minisign`` (Ed25519 in minisign's
formats), ``trust`` (fetch, verify, parse for the operator tools), ``sources``
(bounded reads behind one interface), ``s3client`` (S3 addressing, credentials,
request signing and error mapping; the publisher's aiobotocore client).

May import: ``organixmd.base``.
"""
