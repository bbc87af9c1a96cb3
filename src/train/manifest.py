"""Durable writes and checksummed manifests for checkpoint directories.

A checkpoint directory's ``manifest.json`` lists every file with its size and sha256 and
carries a sha256 of its own body, so a truncated, bit-flipped or missing file (or manifest)
is detected before anything is loaded.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .serialize import dumps_json, unpack

__all__ = ["CheckpointError", "read_file", "read_manifest", "read_record", "write_file", "write_manifest"]

MANIFEST = "manifest.json"
_FORMAT, _VERSION = "blockyard.checkpoint", 1


class CheckpointError(RuntimeError):
    """A checkpoint directory is incomplete, truncated or fails its checksums."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_file(path: Path, data: bytes) -> dict[str, Any]:
    """Create ``path`` (never overwrite), write, flush and fsync; return its manifest entry."""
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": len(data), "sha256": sha256(data)}


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
    """Read, verify and decode a record written with :func:`blockyard.train.serialize.pack`."""
    data = read_file(directory, body, name)
    try:
        return unpack(data)
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{name} cannot be decoded: {err}") from None
