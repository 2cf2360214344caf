"""organixmd: the A/B update daemon of organixm and the library it is built from."""

__version__ = "0.1.0"
