"""Minimal ELF32/ELF64 program-header reader: just what loading PT_LOAD segments needs, every field checked."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from kvmcore.loader.errors import BadElf, NotAnElf

PT_LOAD = 1
EM_386 = 3
EM_X86_64 = 62


@dataclass(frozen=True)
class Segment:
    paddr: int
    vaddr: int
    offset: int
    filesz: int
    memsz: int


@dataclass(frozen=True)
class ElfImage:
    bits: int
    entry: int
    segments: tuple[Segment, ...]

    def entry_physical(self) -> int:
        """The entry point translated from virtual to physical through the segment that contains it."""
        for s in self.segments:
            if s.vaddr <= self.entry < s.vaddr + s.memsz:
                return self.entry - s.vaddr + s.paddr
        return self.entry


def parse_elf(image: bytes) -> ElfImage:
    if image[:4] != b"\x7fELF":
        raise NotAnElf("not an ELF file (bad magic)")
    if len(image) < 52:
        raise BadElf("truncated ELF header")
    ei_class, ei_data = image[4], image[5]
    if ei_data != 1:
        raise BadElf("only little-endian ELF is supported")
    if ei_class == 1:
        (_t, machine, _v, entry, phoff, _sh, _f, _eh, phentsize, phnum) = struct.unpack_from(
            "<HHIIIIIHHH", image, 16)
        want_ent, ph_fmt, bits = 32, "<IIIIIIII", 32
    elif ei_class == 2:
        if len(image) < 64:
            raise BadElf("truncated ELF64 header")
        (_t, machine, _v, entry, phoff, _sh, _f, _eh, phentsize, phnum) = struct.unpack_from(
            "<HHIQQQIHHH", image, 16)
        want_ent, ph_fmt, bits = 56, "<IIQQQQQQ", 64
    else:
        raise BadElf(f"unknown ELF class {ei_class}")
    if machine not in (EM_386, EM_X86_64):
        raise BadElf(f"ELF machine {machine} is not x86")
    if phentsize != want_ent or phnum == 0 or phnum > 128:
        raise BadElf(f"bad program header table (entsize {phentsize}, count {phnum})")
    if phoff + phnum * phentsize > len(image):
        raise BadElf("program header table lies past the end of the file")
    segs = []
    for i in range(phnum):
        fields = struct.unpack_from(ph_fmt, image, phoff + i * phentsize)
        if bits == 32:
            p_type, off, vaddr, paddr, filesz, memsz, _flags, _align = fields
        else:
            p_type, _flags, off, vaddr, paddr, filesz, memsz, _align = fields
        if p_type != PT_LOAD or memsz == 0:
            continue
        if filesz > memsz:
            raise BadElf(f"segment {i}: file size exceeds memory size")
        if off + filesz > len(image):
            raise BadElf(f"segment {i}: data lies past the end of the file")
        segs.append(Segment(paddr, vaddr, off, filesz, memsz))
    if not segs:
        raise BadElf("no loadable segments")
    return ElfImage(bits, entry, tuple(segs))
