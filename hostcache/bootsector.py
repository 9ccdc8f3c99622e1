"""The project's boot sector, and bootable images built around it.

512 bytes of real-mode x86 (the source is below, assembled once with GNU as
and ld: `as --32 -o boot.o boot.S && ld -m elf_i386 -Ttext 0x7c00 --oformat
binary -o boot.bin boot.o`; the bytes are what ships). At boot it prints a
banner on COM1, reads `count` sectors from LBA 1 with INT 13h AH=42h (so
through the BIOS disk driver: IDE sector by sector, virtio in large reads),
prints the CRC-32 of their bytes (IEEE, as zlib.crc32) as 8 hex digits and
powers the machine off through ACPI (port 0x604). The builder patches `count`
and `nbytes` and records the CRC-32 of the payload it wrote in `expect`, in the
image itself: a real boot compares what the guest printed with that record,
made when the image was built, so a byte of the payload changed anywhere on the
way (before or after `stamp image create`, swapped bytes included) fails the
boot check; the host compares the rest of sector 0 (which the guest does not
digest) with what the builder wrote (first_change).

Source (boot.S):

        .code16
        .text
        .globl _start
    _start:
        cli
        xor %ax, %ax
        mov %ax, %ds
        mov %ax, %es
        mov %ax, %ss
        mov $0x7c00, %sp
        sti
        mov %dl, drive            # the BIOS boot drive
        mov $banner, %si
        call print
        mov $dap, %si             # INT 13h AH=42h: extended read, LBA from the DAP
        mov $0x42, %ah
        mov drive, %dl
        int $0x13
        jc fail
        push %ds
        mov $0x1000, %ax          # the sectors were read to 0x1000:0000
        mov %ax, %ds
        xor %si, %si
        mov %cs:nbytes, %cx       # bytes to digest (sectors * 512, at most 65024)
        mov $0xffffffff, %edx     # CRC-32 (IEEE 802.3, reflected, as zlib.crc32) in edx
    crc:
        lodsb
        xor %al, %dl
        mov $8, %bl
    bit:
        shr $1, %edx
        jnc 1f
        xor $0xedb88320, %edx
    1:  dec %bl
        jnz bit
        loop crc
        pop %ds
        not %edx
        mov $result, %si
        call print
        mov %edx, %eax
        shr $16, %eax
        call hex16
        mov %dx, %ax
        call hex16
        mov $newline, %si
        call print
    poweroff:                     # ACPI: PM1a_CNT at 0x604 on QEMU's PIIX4, SLP_EN | S5
        mov $0x604, %dx
        mov $0x2000, %ax
        out %ax, %dx
        hlt
        jmp poweroff
    fail:
        mov $error, %si
        call print
        jmp poweroff
    print:                        # the NUL-terminated string at ds:si, to COM1
        lodsb
        test %al, %al
        jz 2f
        call putc
        jmp print
    2:  ret
    putc:                         # al to COM1 (0x3f8), waiting for the transmitter
        push %dx
        push %ax
        mov $0x3fd, %dx
    3:  in %dx, %al
        test $0x20, %al
        jz 3b
        pop %ax
        mov $0x3f8, %dx
        out %al, %dx
        pop %dx
        ret
    hex16:                        # ax as 4 hex digits
        mov $4, %cx
    4:  rol $4, %ax
        push %ax
        and $0x0f, %al
        add $'0', %al
        cmp $'9', %al
        jbe 5f
        add $7, %al
    5:  call putc
        pop %ax
        loop 4b
        ret
    banner:  .asciz "diskstamp boot: reading sectors\r\n"
    result:  .asciz "crc32 "
    newline: .asciz "\r\n"
    error:   .asciz "diskstamp boot: disk read error\r\n"
    drive:   .byte 0
        .balign 4
    dap:     .byte 16, 0          # DAP: size, reserved
    count:   .word 1              # sectors to read (patched by the builder)
             .word 0, 0x1000      # buffer offset, segment
             .quad 1              # first LBA
    nbytes:  .word 512            # count * 512 (patched by the builder)
    expect:  .long 0              # the CRC-32 recorded by the builder (the guest does not read it)
        .org 510
        .byte 0x55, 0xaa
"""

from __future__ import annotations

import os
import struct
import zlib

from .boot import make_boot_sector
from .errors import HostError

MIB = 1 << 20

BOOT_SECTOR = bytes.fromhex(
    "fa31c08ed88ec08ed0bc007cfb8816017dbeb37ce86800be047db4428a16017dcd1372531eb800108ed831f62e8b0e14"
    "7d66baffffffffac30c2b30866d1ea73076681f22083b8edfecb75f0e2e91f66f7d2bed57ce827006689d066c1e810e8"
    "390089d0e83400bedc7ce81200ba0406b80020eff4ebf6bedf7ce80200ebeeac84c07405e80300ebf6c35250bafd03ec"
    "a82074fb58baf803ee5ac3b90400c1c00450240f04303c3976020407e8dbff58e2ecc36469736b7374616d7020626f6f"
    "743a2072656164696e6720736563746f72730d0a00637263333220000d0a006469736b7374616d7020626f6f743a2064"
    "69736b2072656164206572726f720d0a0000669010000100000000100100000000000000000200000000000000000000"
    "000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
    "000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
    "000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
    "000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
    "00000000000000000000000000000000000000000000000000000000000055aa"
)
assert len(BOOT_SECTOR) == 512 and BOOT_SECTOR[510:] == b"\x55\xaa"
COUNT_AT, LBA_AT, NBYTES_AT, EXPECT_AT = 262, 268, 276, 278  # fields of the DAP and the record
MAX_SECTORS = 127  # 65,024 bytes: one real-mode segment at 0x1000:0000
BANNER = "diskstamp boot: reading sectors"


def boot_sector(sectors: int, partition: tuple[int, int] | None = (2048, 100000), digest: str = "00000000") -> bytes:
    """The boot sector set to read `sectors` sectors, recording `digest` (the
    payload's CRC-32); with a partition entry (first LBA, sectors) so
    partition-aware tools see a disk too."""
    if not 1 <= sectors <= MAX_SECTORS:
        raise ValueError(f"the boot sector reads 1 to {MAX_SECTORS} sectors, not {sectors}")
    raw = bytearray(BOOT_SECTOR)
    struct.pack_into("<H", raw, COUNT_AT, sectors)
    struct.pack_into("<H", raw, NBYTES_AT, sectors * 512)
    struct.pack_into("<I", raw, EXPECT_AT, int(digest, 16))
    if partition is not None:
        raw[446:462] = make_boot_sector(*partition)[446:462]
    return bytes(raw)


def crc32_hex(payload: bytes) -> str:
    """What the guest prints for `payload`: its CRC-32, 8 upper-case hex digits."""
    return f"{zlib.crc32(payload):08X}"


def recorded_digest(sector0: bytes) -> str:
    """The CRC-32 the builder recorded in a disk starting with our boot sector."""
    return f"{struct.unpack_from('<I', sector0, EXPECT_AT)[0]:08X}"


def is_ours(sector0: bytes) -> bool:
    """Our boot sector, or ours with a few bytes of its code changed (damage,
    which first_change then names): a byte flipped in the banner must not
    make the disk pass for a foreign one, which is booted unchecked."""
    same = sum(a == b for a, b in zip(sector0[:COUNT_AT], BOOT_SECTOR[:COUNT_AT], strict=False))  # sector0 may be short
    return same >= COUNT_AT - 16


def first_change(sector0: bytes) -> int | None:
    """Where a disk starting with our boot sector differs from the sector
    `build` wrote (None: nowhere). The guest's CRC-32 covers the payload; the
    DAP and the record are vouched for by it too (a change reads or expects
    other bytes); the rest of sector 0 (padding, partition table, signature)
    is not read by the guest's digest, so it is compared here, with what the
    builder wrote."""
    built = bytearray(boot_sector(1))
    built[COUNT_AT:EXPECT_AT + 4] = sector0[COUNT_AT:EXPECT_AT + 4]
    return next((i for i in range(512) if sector0[i] != built[i]), None)


def build(path: str, size: int, sectors: int = 100) -> str:
    """A fixed VHD of `size` bytes that boots: our sector, recording the
    payload's CRC-32, then `sectors` of random payload. Returns that CRC-32
    (what the guest must print)."""
    import vhd

    if size < MIB or size % MIB:
        raise HostError(f"a bootable image of {size:,} bytes cannot be uploaded: give a multiple of 1 MiB "
                        "(64M, 10G)")
    payload = os.urandom(sectors * 512)
    digest = crc32_hex(payload)
    with vhd.create(path, size, type="fixed") as img:
        try:
            img.write(512, payload)
            img.write(0, boot_sector(sectors, digest=digest))
            img.flush()
        except BaseException:
            os.unlink(path)  # made here, and not finished: nothing left behind
            raise
    return digest
