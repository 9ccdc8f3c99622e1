"""Finding the parent of a differencing image.

Candidates are tried in a fixed order: the caller's resolver, the W2ru
(relative) locator, the W2ku (absolute) locator, then the Unicode parent
name in the child's folder. A candidate counts only if it exists, lies in a
folder the caller allows (by default the folder tree of the image opened
first: a hostile image must not make us read /etc/shadow as its parent), and
carries the UUID (and, unless told otherwise, the timestamp) the child
recorded. Loops are refused by file identity and by UUID. Each locator is
read and tried on its own: one that is unreadable (an offset past the file,
bad UTF-16) or names no file (empty, ".", the child's own folder) is noted
and skipped, never hiding the ones after it.
"""

from __future__ import annotations

import ntpath
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .dynamic_header import W2KU, W2RU, DynamicHeader, platform_name
from .errors import FormatError, ParentOutsideError
from .fileio import RawFile

# A resolver gets the child's path (None for an in-memory image) and header;
# it returns a path to try, an opened block device to use as the parent, or
# None to let the locators decide.
Resolver = Callable[[str | None, DynamicHeader], object]


@dataclass(frozen=True)
class Candidate:
    how: str
    path: str


def read_locator(file: RawFile, header: DynamicHeader, index: int) -> str:
    """The path locator `index` holds; FormatError if its bytes lie outside
    the file (checked before any read: a hostile offset may be >= 2**63)."""
    loc = header.locators[index]
    at = 576 + 24 * index
    if loc.data_offset + loc.data_length > file.size():
        raise FormatError("parent locator", "data offset", at + 16,
                          f"{loc.data_offset}+{loc.data_length} points past the end of the file")
    raw = file.pread(loc.data_length, loc.data_offset)
    if len(raw) != loc.data_length:
        raise FormatError("parent locator", "data offset", at + 16, "points past the end of the file")
    try:
        text = raw.decode("utf-16-le")
    except UnicodeDecodeError:
        raise FormatError("parent locator", "data", loc.data_offset, "not UTF-16LE") from None
    return text.split("\0", 1)[0]


def to_local(path: str, base_dir: str) -> str:
    """A locator path as a local path: backslashes become slashes; relative
    paths are taken from the child's folder."""
    if ntpath.splitdrive(path)[0]:
        return ""  # "C:\..." names a Windows drive: nothing to find here
    local = path.replace("\\", "/")
    found = os.path.normpath(os.path.join(base_dir, local))
    if found == os.path.normpath(base_dir) or local.endswith("/"):
        return ""  # "", "." or a folder: names no file
    return found


def candidates(child_path: str, file: RawFile, header: DynamicHeader) -> tuple[list[Candidate], list[str]]:
    """Paths to try, in order, and notes on locators that could not be read."""
    base = os.path.dirname(os.path.abspath(child_path))
    found: list[Candidate] = []
    notes: list[str] = []
    for want in (W2RU, W2KU):
        for i, loc in enumerate(header.locators):
            if loc.platform != want:
                continue
            how = f"{platform_name(want)} locator"
            try:
                text = read_locator(file, header, i)
            except FormatError as e:
                notes.append(f"{how}: {e}")
                continue
            local = to_local(text, base)
            if local:
                found.append(Candidate(how, local))
            else:
                notes.append(f"{how}: {text!r} names no file")
    if header.parent_name:
        name = ntpath.basename(header.parent_name.replace("\\", "/").split("/")[-1])
        if name not in ("", ".", ".."):
            found.append(Candidate("parent name", os.path.join(base, name)))
    return found, notes


def check_allowed(path: str, allow_dirs: Sequence[str]) -> None:
    real = os.path.realpath(path)
    for root in allow_dirs:
        root_real = os.path.realpath(root)
        if real == root_real or real.startswith(root_real.rstrip(os.sep) + os.sep):
            return
    raise ParentOutsideError(
        f"parent {path} is outside the folders allowed for parents "
        f"({', '.join(allow_dirs)}); allow its folder with --allow-dir (allow_dirs=)")
