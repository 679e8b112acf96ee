"""Guest image loaders: multiboot v1 ELF (our test guests, QEMU -kernel compatible) and the Linux x86 boot protocol."""

from kvmcore.loader.errors import LoaderError

__all__ = ["LoaderError"]
