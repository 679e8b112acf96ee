"""Loader failures: all are host/config errors (a bad image file), reported as one clear line."""

from __future__ import annotations


class LoaderError(Exception):
    """The guest image cannot be loaded."""


class NotAnElf(LoaderError):
    """The file does not start with the ELF magic."""


class BadElf(LoaderError):
    """The ELF headers are malformed or describe segments outside guest RAM."""


class NoMultibootHeader(LoaderError):
    """No valid multiboot v1 header in the first 8 KiB of the image."""


class BadBzImage(LoaderError):
    """The image is not a Linux bzImage this loader supports (boot protocol >= 2.06, 64-bit entry)."""


class ImageTooLarge(LoaderError):
    """The kernel, initrd or command line does not fit where the boot protocol puts it."""
