"""Durable writes and checksummed manifests for checkpoint directories.

A checkpoint directory's ``manifest.json`` lists every file with its size and sha256 and
carries a sha256 of its own body, so a truncated, bit-flipped or missing file (or manifest)
is detected before anything is loaded.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .serialize import dumps_json, unpack, unpack_file

__all__ = ["CheckpointError", "decode_record", "read_file", "read_manifest", "read_record", "write_file",
           "write_manifest"]

MANIFEST = "manifest.json"
_FORMAT, _VERSION = "blockyard.checkpoint", 1


class CheckpointError(RuntimeError):
    """A checkpoint directory is incomplete, truncated or fails its checksums."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_file(path: Path, data: bytes | Sequence[bytes | memoryview]) -> dict[str, Any]:
    """Create ``path`` (never overwrite), write, flush and fsync; return its manifest entry.

    ``data`` is the content, or its parts in order (written and hashed one after the other, so a
    large payload is never joined into one more copy).
    """
    parts = [data] if isinstance(data, (bytes, bytearray, memoryview)) else list(data)
    digest, size = hashlib.sha256(), 0
    with open(path, "xb") as f:
        for part in parts:
            f.write(part)
            digest.update(part)
            size += memoryview(part).nbytes
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": size, "sha256": digest.hexdigest()}


def write_manifest(directory: Path, body: dict[str, Any]) -> None:
    """Write ``manifest.json`` (format tag, ``body`` and the body's own sha256) into ``directory``."""
    body = {"format": _FORMAT, "version": _VERSION, **body}
    write_file(directory / MANIFEST, dumps_json({"body": body, "sha256": sha256(dumps_json(body))}))


def read_manifest(directory: Path) -> dict[str, Any]:
    """Return the manifest body of ``directory``.

    Raises:
        CheckpointError: the manifest is missing, unreadable, fails its checksum or has an
            unknown format.
    """
    try:
        raw = json.loads((directory / MANIFEST).read_bytes())
        body = raw["body"]
        ok = raw["sha256"] == sha256(dumps_json(body))
    except FileNotFoundError:
        raise CheckpointError(f"{MANIFEST} is missing") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{MANIFEST} is unreadable: {err}") from None
    if not ok:
        raise CheckpointError(f"{MANIFEST} fails its checksum")
    if body.get("format") != _FORMAT or body.get("version") != _VERSION:
        raise CheckpointError(f"{MANIFEST} has an unknown format {body.get('format')!r} v{body.get('version')!r}")
    return body


def read_file(directory: Path, body: dict[str, Any], name: str) -> bytes:
    """Read ``name`` and check it against the manifest ``body``.

    Raises:
        CheckpointError: naming the file when it is unlisted, unreadable, truncated or altered.
    """
    meta = body["files"].get(name)
    if meta is None:
        raise CheckpointError(f"{name} is not listed in {MANIFEST}")
    try:
        data = (directory / name).read_bytes()
    except OSError as err:
        raise CheckpointError(f"{name} cannot be read: {err}") from None
    if len(data) != meta["bytes"]:
        raise CheckpointError(f"{name} has {len(data)} bytes, expected {meta['bytes']} (truncated?)")
    if sha256(data) != meta["sha256"]:
        raise CheckpointError(f"{name} fails its sha256 checksum")
    return data


def read_record(directory: Path, body: dict[str, Any], name: str) -> tuple[Any, dict[str, Any]]:
    """Read, verify and decode a record written with :func:`blockyard.train.serialize.pack`.

    Each tensor is read straight into a fresh tensor while the file is hashed (one pass, no
    intermediate copy of the file); nothing is returned unless size and sha256 match.

    Raises:
        CheckpointError: naming the file when it is unlisted, unreadable, truncated, altered or
            cannot be decoded.
    """
    meta = body["files"].get(name)
    if meta is None:
        raise CheckpointError(f"{name} is not listed in {MANIFEST}")
    digest = hashlib.sha256()
    try:
        with open(directory / name, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size != meta["bytes"]:
                raise CheckpointError(f"{name} has {size} bytes, expected {meta['bytes']} (truncated?)")
            try:
                record, error = unpack_file(f, size, digest.update), None
            except (ValueError, KeyError, TypeError) as err:
                record, error = None, err
    except OSError as err:
        raise CheckpointError(f"{name} cannot be read: {err}") from None
    if digest.hexdigest() != meta["sha256"]:
        raise CheckpointError(f"{name} fails its sha256 checksum")
    if error is not None:
        raise CheckpointError(f"{name} cannot be decoded: {error}") from None
    if record is None:  # a layout the streaming reader leaves to unpack
        return decode_record(name, read_file(directory, body, name))
    return record


def decode_record(name: str, data: bytes) -> tuple[Any, dict[str, Any]]:
    """Decode the verified content of record ``name`` (see :func:`read_record`)."""
    try:
        return unpack(data)
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{name} cannot be decoded: {err}") from None
