"""File and folder names made from taxon names: readable, unique, and the same on every OS.

A name of letters, digits and single spaces ("Amphiprion clarkii") becomes itself with spaces as `_`
("Amphiprion_clarkii"), as it always has: such slugs never hold `-`, so they cannot meet the others. Every other
name (a `/`, `_`, `.` or control character, "..", a reserved Windows name, a name not in Unicode NFC, one too long
for a file name) gets a short hash of its exact text appended ("a_b-3f9c2e1a0b"), so that `a/b` and `a_b`, or
`Genus sp. 1` and `Genus sp 1`, never share a folder. `metadata.csv` always keeps the exact name.
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Sequence

MAX_BYTES = 200  # of the 255 a file name may hold: the rest is left for suffixes ("-00001.png", "_grid.png")
HASH_CHARS = 10
WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:HASH_CHARS]


def _truncate(text: str, limit: int) -> str:
    """At most `limit` UTF-8 bytes, cut at a character boundary."""
    return text.encode("utf-8")[:limit].decode("utf-8", errors="ignore")


def is_plain(name: str) -> bool:
    """Letters and digits in words separated by single spaces, in NFC: the names whose slug is themselves."""
    words = name.split(" ")
    return (
        all(word and all(c.isalnum() for c in word) for word in words)
        and unicodedata.normalize("NFC", name) == name
        and name.upper() not in WINDOWS_RESERVED
    )


def name_slug(name: str) -> str:
    """The file-name form of one taxon name (see the module's doc): never empty, never `.` or `..`, at most
    MAX_BYTES bytes, and two different names never share one."""
    readable = "".join(c if c.isalnum() else "_" for c in unicodedata.normalize("NFC", name)).strip("_") or "taxon"
    if is_plain(name) and len(readable.encode("utf-8")) <= MAX_BYTES:
        return readable
    return f"{_truncate(readable, MAX_BYTES - HASH_CHARS - 1)}-{_digest(name)}"


def lineage_folder(names: Sequence[str]) -> str:
    """One folder name for a lineage (a taxon's path from the top rank): its names' slugs joined by `__`, so that
    homonyms of different parents stay apart; a path too long for a file name is cut and hashed whole."""
    joined = "__".join(name_slug(name) for name in names)
    if len(joined.encode("utf-8")) <= MAX_BYTES:
        return joined
    return f"{_truncate(joined, MAX_BYTES - HASH_CHARS - 1)}-{_digest(chr(0).join(names))}"


def unwritable(name: str) -> str | None:
    """Why a name cannot be a file name as it is (None: it can): the reason `data inspect` lists. Training reads
    such names as they are; only the folders made from them are renamed (`name_slug`)."""
    if any(unicodedata.category(c) in ("Cc", "Cf") for c in name):
        return "control characters"
    if "/" in name or "\\" in name:
        return "a path separator"
    if name in ("", ".", ".."):
        return "empty, '.' or '..'"
    if len(name.encode("utf-8")) > 255:
        return "over 255 bytes"
    if name.upper() in WINDOWS_RESERVED:
        return "a reserved Windows name"
    return None
