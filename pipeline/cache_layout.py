"""The feature cache's layout on its folder (described in pipeline.cache): its names, chunks and codecs, and
opening its group and arrays so that a damaged or missing metadata file is an error naming that file."""

from __future__ import annotations

import json

import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from headstart.export.errors import CacheError

from .storage import Folder

FORMAT = 2
OK, BAD, VOID = 1, 2, 3  # features computed, undecodable, nothing (its file changed while being read)
CHUNK_ROWS = 256
DTYPES = ("float16", "float32")  # storage types of the features
INDEX_ROWS = CHUNK_ROWS * 16  # rows per chunk of `hash` and `status`
OURS = frozenset({"zarr.json", "hash", "status", "features", "datasets"})  # what a cache's folder holds


class DamagedCacheError(CacheError):
    """A metadata file of the cache (a zarr.json) that is missing, empty or not what Zarr wrote.

    `node` is the array or group it describes ('' for the cache's group), `what` what is wrong with it.
    """

    node = ""
    what = ""


def codecs() -> tuple:
    """The compressors of every cache array: zstd, then a crc32c checksum of each chunk."""
    return ZstdCodec(), Crc32cCodec()


def chunk_files(name: str, chunk_rows: int, start: int, stop: int, ndim: int) -> list[str]:
    """The files of array `name` that hold rows [start, stop) (zarr v3's default chunk keys: c/<row chunk>/0),
    relative to the cache."""
    if stop <= start:
        return []
    tail = "/0" * (ndim - 1)  # one chunk across the columns of a 2-D array
    return [f"{name}/c/{i}{tail}" for i in range(start // chunk_rows, (stop - 1) // chunk_rows + 1)]


def missing(folder: Folder, files: list[str], seen: set[str] | None = None) -> list[str]:
    """Which of `files` (chunks of one array) are absent. `seen` collects the chunks found present, for the next
    call to skip: committed chunks do not go away."""
    seen = set() if seen is None else seen
    todo = [f for f in files if f not in seen]
    if todo:
        seen.update(folder.present(todo, todo[0].rsplit("/c/", 1)[0] + "/c"))
    return [f for f in files if f not in seen]


def damaged(folder: Folder, node: str, e: BaseException | None = None) -> DamagedCacheError:
    """The error for the metadata file of `node` ('' for the group), naming the file and what to do."""
    where = f"{folder.text.rstrip('/')}/{node + '/' if node else ''}zarr.json"
    what = damage(e)
    if node:
        advice = (f"run `headstart verify --cache {folder.text}` to list every damaged part, then extract again "
                  "with --replace (or into a new cache)")
    else:
        advice = "the cache cannot be read: extract again with --replace (or into a new cache)"
    error = DamagedCacheError(f"{where} {what}; {advice}")
    error.node, error.what = node, what
    return error


def damage(e: BaseException | None) -> str:
    """What is wrong with a metadata file that failed to open with `e` (None: it is absent)."""
    if e is None:
        return "is missing"
    if isinstance(e, json.JSONDecodeError) and not e.doc.strip():
        return "is empty (a crash before it reached the disk?)"
    return f"is damaged ({type(e).__name__}: {str(e)[:120]})"


def open_root(folder: Folder, mode: str = "r") -> zarr.Group:
    """The cache's group; DamagedCacheError naming zarr.json when that file is not a Zarr group's metadata.

    Parsed here first: zarr opened on a damaged file fails with a message that names no file.
    """
    try:
        meta = json.loads(folder.read_text("zarr.json"))
    except FileNotFoundError:
        raise damaged(folder, "") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise damaged(folder, "", e) from None
    if not isinstance(meta, dict) or meta.get("node_type") != "group" or \
            not isinstance(meta.get("attributes", {}), dict):
        raise damaged(folder, "", ValueError("not the metadata of a Zarr group"))
    try:
        return zarr.open_group(folder.zarr_path, mode=mode)
    except (ValueError, TypeError, KeyError) as e:  # zarr's own check of the same file
        raise damaged(folder, "", e) from None


def node(group: zarr.Group, folder: Folder, name: str) -> zarr.Array | zarr.Group:
    """Array or group `name` inside `group`; DamagedCacheError naming its zarr.json when missing or damaged."""
    path = f"{group.path}/{name}" if group.path else name
    try:
        return group[name]
    except KeyError:
        there = folder.is_file(f"{path}/zarr.json")
        raise damaged(folder, path, ValueError("not a Zarr node's metadata") if there else None) from None
    except (ValueError, TypeError, UnicodeDecodeError) as e:  # JSONDecodeError, zarr's MetadataValidationError
        raise damaged(folder, path, e) from None


def optional_node(group: zarr.Group, folder: Folder, name: str) -> zarr.Array | zarr.Group | None:
    """`node`, or None where `group` holds no `name` at all."""
    path = f"{group.path}/{name}" if group.path else name
    return node(group, folder, name) if folder.is_file(f"{path}/zarr.json") else None


def stored_attrs(folder: Folder) -> dict:
    """The group's attributes as stored now, read afresh (not zarr's view when opened); {} when unreadable."""
    try:
        return json.loads(folder.read_text("zarr.json"))["attributes"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def attrs(group: zarr.Group) -> dict:
    """A group's attributes, as a plain dict."""
    return dict(group.attrs)
