"""The project's boot sector, and bootable images built around it.

512 bytes of real-mode x86 (the source is below, assembled once with GNU as
and ld; the bytes are what ships). At boot it prints a banner on COM1, reads
`count` sectors from LBA 1 with INT 13h AH=42h (so through the BIOS disk
driver: IDE sector by sector, virtio in large reads), prints the 32-bit sum
of their bytes as 8 hex digits and powers the machine off through ACPI
(port 0x604). The builder patches `count` and `nbytes` and returns the sum
the guest must print: a boot proves the whole data path, end to end.

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
        mov %cs:nbytes, %cx       # bytes to sum (sectors * 512, at most 65024)
        xor %bx, %bx              # the sum: dx:bx, 32 bits
        xor %dx, %dx
    sum:
        lodsb
        add %al, %bl
        adc $0, %bh
        adc $0, %dx
        loop sum
        pop %ds
        mov $result, %si
        call print
        mov %dx, %ax
        call hex16
        mov %bx, %ax
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
        jz 1f
        call putc
        jmp print
    1:  ret
    putc:                         # al to COM1 (0x3f8), waiting for the transmitter
        push %dx
        push %ax
        mov $0x3fd, %dx
    2:  in %dx, %al
        test $0x20, %al
        jz 2b
        pop %ax
        mov $0x3f8, %dx
        out %al, %dx
        pop %dx
        ret
    hex16:                        # ax as 4 hex digits
        mov $4, %cx
    3:  rol $4, %ax
        push %ax
        and $0x0f, %al
        add $'0', %al
        cmp $'9', %al
        jbe 4f
        add $7, %al
    4:  call putc
        pop %ax
        loop 3b
        ret
    banner:  .asciz "diskstamp boot: reading sectors\r\n"
    result:  .asciz "checksum "
    newline: .asciz "\r\n"
    error:   .asciz "diskstamp boot: disk read error\r\n"
    drive:   .byte 0
        .balign 4
    dap:     .byte 16, 0          # DAP: size, reserved
    count:   .word 1              # sectors to read (patched by the builder)
             .word 0, 0x1000      # buffer offset, segment
             .quad 1              # first LBA
    nbytes:  .word 512            # count * 512 (patched by the builder)
        .org 510
        .byte 0x55, 0xaa
"""

from __future__ import annotations

import os
import struct

from .boot import make_boot_sector

BOOT_SECTOR = bytes.fromhex(
    "fa31c08ed88ec08ed0bc007cfb8816ee7cbe9d7ce85200bef07cb4428a16ee7ccd13723d1eb800108ed831f62e8b0e00"
    "7d31db31d2ac00c380d70083d200e2f51fbebf7ce8220089d0e8390089d8e83400bec97ce81200ba0406b80020eff4eb"
    "f6becc7ce80200ebeeac84c07405e80300ebf6c35250bafd03eca82074fb58baf803ee5ac3b90400c1c00450240f0430"
    "3c3976020407e8dbff58e2ecc36469736b7374616d7020626f6f743a2072656164696e6720736563746f72730d0a0063"
    "6865636b73756d20000d0a006469736b7374616d7020626f6f743a206469736b2072656164206572726f720d0a000090"
    "100001000000001001000000000000000002000000000000000000000000000000000000000000000000000000000000"
    "000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
    "000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
    "000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
    "000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
    "00000000000000000000000000000000000000000000000000000000000055aa"
)
assert len(BOOT_SECTOR) == 512 and BOOT_SECTOR[510:] == b"\x55\xaa"
COUNT_AT, NBYTES_AT = 242, 256
MAX_SECTORS = 127  # 65,024 bytes: one real-mode segment at 0x1000:0000
BANNER = "diskstamp boot: reading sectors"


def boot_sector(sectors: int, partition: tuple[int, int] | None = (2048, 100000)) -> bytes:
    """The boot sector set to read `sectors` sectors; with a partition entry
    (first LBA, sectors) so partition-aware tools see a disk too."""
    if not 1 <= sectors <= MAX_SECTORS:
        raise ValueError(f"the boot sector reads 1 to {MAX_SECTORS} sectors, not {sectors}")
    raw = bytearray(BOOT_SECTOR)
    struct.pack_into("<H", raw, COUNT_AT, sectors)
    struct.pack_into("<H", raw, NBYTES_AT, sectors * 512)
    if partition is not None:
        raw[446:462] = make_boot_sector(*partition)[446:462]
    return bytes(raw)


def expected_checksum(payload: bytes) -> str:
    return f"{sum(payload) & 0xFFFFFFFF:08X}"


def sectors_to_read(sector0: bytes) -> int:
    """How many sectors a disk starting with our boot sector asks the guest to read."""
    return struct.unpack_from("<H", sector0, COUNT_AT)[0]


def is_ours(sector0: bytes) -> bool:
    return sector0[:COUNT_AT] == BOOT_SECTOR[:COUNT_AT]


def build(path: str, size: int, sectors: int = 100) -> str:
    """A fixed VHD of `size` bytes that boots: our sector, then `sectors` of
    random payload. Returns the checksum the guest will print."""
    import vhd

    payload = os.urandom(sectors * 512)
    with vhd.create(path, size, type="fixed") as img:
        img.write(0, boot_sector(sectors))
        img.write(512, payload)
    return expected_checksum(payload)
