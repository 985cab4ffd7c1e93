"""An image folder packed as a tar archive, streamed into memory within :class:`ArchiveLimits`.

A crafted archive (a member declaring terabytes, a gzip bomb, millions of empty members, a path out of the
folder) is refused in one line before it fills the memory; nothing is ever extracted to disk.
"""

from __future__ import annotations

import bz2
import dataclasses
import gzip
import lzma
import os
import tarfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from potion.core.errors import DataError
from potion.data.sources.bundle import SPLITS

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


@dataclass(frozen=True)
class Item:
    """One image of a folder or an archive."""

    split: str
    cls: str
    rel: str  # "train/<class>/<file>", relative to the data root
    source: Path | bytes  # a file on disk, or the bytes of an archive member


Scan = tuple[list[Item], dict[str, set[str]]]  # the images, and the class folders seen per split


def no_classes() -> dict[str, set[str]]:
    return {s: set() for s in SPLITS}


def is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


@dataclass(frozen=True)
class ArchiveLimits:
    """What reading a tar archive may cost (the dataset config's ``archive_max_*`` keys).

    Members are streamed (decompressed in chunks, never extracted to disk); only image members are kept,
    as compressed bytes, so the whole archive's expanded size bounds the memory they take.
    """

    max_member_mb: float = 256.0  # one member (image or not) expanded, in MiB
    max_total_gb: float = 16.0  # the whole archive expanded (tar headers and skipped members included), in GiB
    max_members: int = 5_000_000

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> ArchiveLimits:
        """From ``archive_<field>`` (checked by the schema); missing or null: the default."""
        given = {f.name: (cfg or {}).get(f"archive_{f.name}") for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in given.items() if v is not None})

    @property
    def member_bytes(self) -> int:
        return int(self.max_member_mb * (1 << 20))

    @property
    def total_bytes(self) -> int:
        return int(self.max_total_gb * (1 << 30))


class _ArchiveTooLarge(Exception):
    """The archive expands beyond its limits (the message says which and how to raise it)."""


class _BudgetedStream:
    """The decompressed bytes of an archive, read through a budget.

    The whole stream may not exceed ``total_bytes``; between two members the tar reader may not read more
    than the member it just skipped plus ``member_bytes`` (which bounds what an oversized tar header,
    e.g. a pax record, can make it hold in memory).
    """

    def __init__(self, raw: Any, limits: ArchiveLimits, path: Path) -> None:
        self.raw, self.limits, self.path = raw, limits, path
        self.count = 0
        self.allowed = limits.member_bytes + (1 << 20)

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size if size is not None and size >= 0 else 1 << 20)
        self.count += len(data)
        if self.count > self.limits.total_bytes:
            raise _ArchiveTooLarge(f"archive {self.path} expands to more than {self.limits.max_total_gb:g} GiB "
                                   f"(dataset.archive_max_total_gb={self.limits.max_total_gb:g})")
        if self.count > self.allowed:
            raise _ArchiveTooLarge(f"archive {self.path} holds a tar header larger than "
                                   f"{self.limits.max_member_mb:g} MiB (dataset.archive_max_member_mb)")
        return data

    def member(self, size: int) -> None:
        """A member was handed over: its data (read or skipped) and the next header may be read."""
        self.allowed = self.count + size + self.limits.member_bytes + (1 << 20)


def _open_decompressed(fh: Any) -> Any:
    """A reader of the tar bytes: gzip, bzip2 and xz are decompressed in chunks as they are read."""
    magic = fh.read(6)
    fh.seek(0)
    if magic.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=fh, mode="rb")
    if magic.startswith(b"BZh"):
        return bz2.BZ2File(fh, mode="rb")
    if magic.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(fh, mode="rb")
    return fh


def scan_archive(path: Path, limits: ArchiveLimits | None = None) -> Scan:
    """Image members of a tar archive, streamed into memory within ``limits`` (nothing is extracted to disk)."""
    limits = limits or ArchiveLimits()
    files: dict[tuple[str, ...], bytes] = {}
    dirs: list[tuple[str, ...]] = []
    try:
        with open(path, "rb") as raw, _open_decompressed(raw) as fh:
            stream = _BudgetedStream(fh, limits, path)
            with tarfile.open(fileobj=stream, mode="r|") as tar:  # type: ignore[call-overload]
                for n, member in enumerate(tar, start=1):
                    _check_member(member, n, limits, path)
                    stream.member(member.size)
                    _keep_member(tar, member, files, dirs)
    except _ArchiveTooLarge as exc:
        raise DataError(f"{exc}; refused to read it (raise the limit in the dataset config if the archive is "
                        "trusted)") from None
    except (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError) as exc:
        raise DataError(f"cannot read archive {path}: corrupt or truncated ({type(exc).__name__}: {exc})") from exc
    return _archive_items(files, dirs)


def _check_member(member: tarfile.TarInfo, n: int, limits: ArchiveLimits, path: Path) -> None:
    if n > limits.max_members:
        raise _ArchiveTooLarge(f"archive {path} holds more than {limits.max_members} members "
                               f"(dataset.archive_max_members={limits.max_members})")
    if member.size > limits.member_bytes:
        raise _ArchiveTooLarge(f"member {member.name[:200]!r} of archive {path} expands to "
                               f"{member.size / (1 << 20):,.0f} MiB, more than dataset.archive_max_member_mb="
                               f"{limits.max_member_mb:g}")


def _keep_member(tar: tarfile.TarFile, member: tarfile.TarInfo, files: dict[tuple[str, ...], bytes],
                 dirs: list[tuple[str, ...]]) -> None:
    """Remember a safe folder name, or read a safe image member's bytes (others are skipped unread)."""
    parts = _safe_parts(member.name)
    if parts is None:
        return
    if member.isdir():
        dirs.append(parts)
    elif member.isfile() and is_image_name(parts[-1]):
        fh = tar.extractfile(member)
        if fh is not None:
            files[parts] = fh.read(member.size)


def _safe_parts(name: str) -> tuple[str, ...] | None:
    """Path components of an archive member, or None for absolute, parent-relative or hidden names."""
    if name.startswith(("/", "\\")):
        return None
    parts = tuple(p for p in PurePosixPath(name).parts if p not in ("", "."))
    if not parts or any(p == ".." or p.startswith(".") for p in parts):
        return None
    return parts


def _archive_prefix(paths: list[tuple[str, ...]]) -> int:
    """How many leading components to drop: 0, or 1 when one top folder wraps train/ and test/."""
    if any(p[0] in SPLITS for p in paths):
        return 0
    tops = {p[0] for p in paths if len(p) > 1}
    if len(tops) == 1 and any(len(p) > 2 and p[1] in SPLITS for p in paths):
        return 1
    return 0


def _archive_items(files: dict[tuple[str, ...], bytes], dirs: list[tuple[str, ...]]) -> Scan:
    drop = _archive_prefix(list(files))
    items: list[Item] = []
    class_dirs = no_classes()
    for full in dirs:
        parts = full[drop:]
        if len(parts) == 2 and parts[0] in SPLITS:
            class_dirs[parts[0]].add(parts[1])
    for full, data in files.items():
        parts = full[drop:]
        if len(parts) >= 3 and parts[0] in SPLITS:
            class_dirs[parts[0]].add(parts[1])
            items.append(Item(parts[0], parts[1], "/".join(parts), data))
    return items, class_dirs
