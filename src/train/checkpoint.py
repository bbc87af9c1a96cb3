"""Crash-safe, pickle-free training checkpoints with retention and exact resume.

Each checkpoint is a directory ``step_XXXXXXXX/``, named by its position in training (an
optimizer step or an epoch, see :meth:`CheckpointManager.save`), holding one safetensors file per
stateful entry (a module's file keeps its ``state_dict`` keys, so ``model.safetensors`` loads
anywhere; any other object is a JSON tree in the file's metadata plus its tensors), the plain
values in ``_values.safetensors``, every rank's RNG states in ``_rng.safetensors`` and a
``manifest.json`` with the position (under ``"step"``), the metric and each file's size and
sha256. It is written into a hidden temporary directory, every file and the directory are
fsynced, and only then is it renamed into place (``os.replace``) and the parent directory
fsynced: after a crash at any moment a ``step_`` name holds a complete checkpoint or does not
exist.
"""
from __future__ import annotations

import logging
import math
import os
import re
import shutil
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from ..data._safetensors import fsync_dir
from .manifest import MANIFEST, CheckpointError, read_file, read_manifest, read_record, write_file, write_manifest
from .rng import capture_rng_state, restore_rng_state
from .serialize import pack, pack_parts, unpack
from .sharded_checkpoint import load_sharded, save_sharded
from .stateful import capture_object, object_kind, restore_object

__all__ = ["CheckpointError", "CheckpointManager", "CorruptCheckpointWarning"]

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d{8,})$")
_LEFTOVER = (".tmp-step_", ".trash-step_")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_RESERVED = frozenset({"step", "metric", "path"})  # keys of the dict the loaders return


class CorruptCheckpointWarning(UserWarning):
    """``load_latest``/``load_best`` skipped a damaged checkpoint; the message names it."""


class _Info(NamedTuple):
    step: int
    path: Path
    body: dict | None  # None when manifest.json is missing or damaged
    error: str


def _ours(path: Path) -> bool:
    """A ``step_*`` directory this manager wrote: it holds a manifest or the values file (every save writes both)."""
    return path.is_dir() and ((path / MANIFEST).is_file() or (path / "_values.safetensors").is_file())


def _dist_active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class CheckpointManager:
    """Save, rotate and resume training checkpoints without pickle.

    ``state`` maps entry names to stateful objects (modules, optionally wrapped by DDP or
    ``torch.compile``; optimizers, LR schedulers, GradScaler, EMA, early stopping, anything
    with ``state_dict``/``load_state_dict``; explicit ``torch.Generator`` and numpy generators)
    or to plain values (ints, floats, strings, lists, dicts, tuples, tensors, numpy arrays),
    e.g. ``{"model": model, "optimizer": opt, "ema": ema, "epoch": epoch, "data": position}``.
    The global RNGs (python, numpy, torch CPU, every CUDA device) are saved too.

    Each checkpoint sits at a *position* in training, an int that increases over the run: the
    optimizer step or the epoch, whichever the loop saves at (one unit per manager). The
    position names the checkpoint's folder (``step_XXXXXXXX``) and comes back as ``"step"``
    from the loaders; ``every``, :meth:`steps` and retention count in the same unit.

    Retention after each save keeps the ``keep_last`` newest checkpoints, every position
    divisible by ``every`` and the best by ``metric``; a checkpoint is deleted only after the new
    one has been read back and verified, and only directories named ``step_<digits>`` are ever
    deleted. Checkpoints at a position above the one being saved (left over from an abandoned
    timeline) are left alone until this run overwrites them.

    Distributed: only the main process (rank 0) writes; other ranks return ``None`` from
    :meth:`save`. Under ``torch.distributed`` with several ranks :meth:`save` is a collective
    (every rank's RNG state is gathered to rank 0, and all ranks return once the checkpoint is
    on disk): call it on every rank, never under ``if is_main``. :meth:`load_latest` is also
    called on every rank; each rank restores the objects and its own RNG state.

    Sharded (``sharded=True``): every rank writes its own shards, nothing is gathered to rank 0,
    through ``torch.distributed.checkpoint``'s safetensors storage (see
    :mod:`blockyard.train.sharded_checkpoint`). For models sharded by
    :func:`~blockyard.train.shard_model` (FSDP2); such a checkpoint resumes at another world size
    and loads into a plain model (one process) for evaluation. Same directory protocol,
    manifest, retention and fallback; a shared filesystem across nodes.

    Args:
        directory: folder of the checkpoints; created on first save. Other files in it are
            never touched.
        every: also keep every checkpoint whose position is a multiple of ``every``.
        keep_last: number of newest checkpoints kept, at least 1.
        rng: save and restore the global RNG states.
        is_main: whether this process writes; default rank 0 (or True without torch.distributed).
        sharded: save sharded checkpoints (every rank writes its shards; needs torch >= 2.8).
            Loading reads either layout, whatever this flag says.

    Example::

        ckpt = CheckpointManager(out / "checkpoints", every=1000, keep_last=2)
        state = {"model": model, "optimizer": opt, "ema": ema, "scaler": scaler}
        resumed = ckpt.load_latest(state)  # None on a fresh start
        start = resumed["step"] if resumed else 0  # the position the checkpoint was saved at
        ...
        ckpt.save(step, {**state, "epoch": epoch}, metric=val_loss)  # by optimizer step
        ckpt.save(epoch, {**state, "opt_step": step}, metric=val_loss)  # or, in another run, by epoch
    """

    def __init__(self, directory: str | os.PathLike, every: int | None = None, keep_last: int = 1, *,
                 rng: bool = True, is_main: bool | None = None, sharded: bool = False) -> None:
        if every is not None and (not isinstance(every, int) or every < 1):
            raise ValueError(f"every: expected None or a positive int, got {every!r}")
        if not isinstance(keep_last, int) or keep_last < 1:
            raise ValueError(f"keep_last: expected an int >= 1, got {keep_last!r}")
        self.directory = Path(directory)
        self.every, self.keep_last, self.rng, self._is_main = every, keep_last, rng, is_main
        self.sharded = bool(sharded)

    @property
    def is_main(self) -> bool:
        if self._is_main is not None:
            return self._is_main
        return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0

    def steps(self) -> list[int]:
        """Positions (steps or epochs, as saved) of the checkpoints whose manifest is readable, oldest first."""
        return [i.step for i in self._scan() if i.body is not None]

    def step_dirs(self) -> list[Path]:
        """Every ``step_<digits>`` directory with a ``manifest.json``, intact or not, oldest first."""
        return [i.path for i in self._scan()]

    def intact_steps(self) -> list[int]:
        """Positions of the checkpoints whose manifest and every file pass their checksums, oldest first."""
        out = []
        for info in self._scan():
            try:
                self.verify(info.path)
            except CheckpointError:
                continue
            out.append(info.step)
        return out

    # ------------------------------------------------------------------------------- save
    def save(self, position: int, state: Mapping[str, Any], metric: float | None = None,
             mode: str = "min") -> Path | None:
        """Write the checkpoint at ``position`` and apply retention; returns its path (None off rank 0).

        Saving at a position that already exists replaces that checkpoint.

        Args:
            position: the checkpoint's position in training: an optimizer step or an epoch,
                increasing over the run (keep one unit per manager). It names the folder
                ``step_XXXXXXXX`` (zero-padded to 8 digits), is stored as ``"step"`` in the
                manifest and is returned as the ``"step"`` key by :meth:`load_latest` and
                :meth:`load_best`, so existing checkpoints keep loading.
            state: entry name -> stateful object or plain value (see the class docstring).
            metric: a float or 0-dim tensor ranking the checkpoint for :meth:`load_best` and
                retention of the best; non-finite values are stored as None.
            mode: ``"min"`` (lower metric is better) or ``"max"``.
        """
        if isinstance(position, bool) or not isinstance(position, int) or position < 0:
            raise ValueError(f"position: expected an int >= 0 (the checkpoint's optimizer step or epoch), "
                             f"got {position!r}")
        if mode not in ("min", "max"):
            raise ValueError(f"mode: expected 'min' or 'max', got {mode!r}")
        for name, obj in state.items():
            plain_reserved = name in _RESERVED and object_kind(obj) is None
            if not isinstance(name, str) or not _NAME.match(name) or plain_reserved:
                raise ValueError(f"state: invalid entry name {name!r} (letters, digits, '_.-', not starting "
                                 f"with '_' or '.'; a plain value may not be named {sorted(_RESERVED)})")
        if metric is not None:
            metric = float(metric)
            metric = metric if math.isfinite(metric) else None
        if self.sharded:
            return save_sharded(self, position, state, metric, mode)
        rng_states = self._gather_rng() if self.rng else None
        if not self.is_main:
            if _dist_active():
                dist.barrier()  # return only once the checkpoint is visible to every rank
            return None
        tmp = self._prepare_tmp(position)
        final = self.directory / f"step_{position:08d}"
        try:
            files: dict[str, dict] = {}

            def emit(name: str, data: tuple[bytes, memoryview]) -> None:
                files[name] = write_file(tmp / name, data)

            entries, plain = {}, {}
            for name, obj in state.items():
                kind = object_kind(obj)
                if kind is None:
                    plain[name] = obj
                    continue
                kind, payload, header = capture_object(obj)
                emit(f"{name}.safetensors", pack_parts(payload, kind=kind, **header))
                entries[name] = kind
            emit("_values.safetensors", pack_parts(plain))
            if rng_states is not None:
                emit("_rng.safetensors", pack_parts(rng_states))
            write_manifest(tmp, {"step": position, "metric": metric, "mode": mode, "entries": entries,
                                 "values": list(plain), "rng_ranks": len(rng_states or []),
                                 "torch": torch.__version__, "files": files})
            fsync_dir(tmp)
            self._publish(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._retain(position, mode, final)
        if _dist_active():
            dist.barrier()
        return final

    def _prepare_tmp(self, position: int) -> Path:
        """Create the hidden temporary directory the checkpoint at ``position`` is written into."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._remove_leftovers()
        final = self.directory / f"step_{position:08d}"
        if final.exists() and not _ours(final):
            raise CheckpointError(f"{final} exists and is not a checkpoint; it is left alone: "
                                  "move it away or save into another directory")
        tmp = self.directory / f"{_LEFTOVER[0]}{position:08d}-{uuid.uuid4().hex[:12]}"
        tmp.mkdir()
        return tmp

    def _gather_rng(self) -> list[dict] | None:
        local = capture_rng_state()
        if not _dist_active():
            return [local]
        world = dist.get_world_size()
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        blob = torch.frombuffer(bytearray(pack(local)), dtype=torch.uint8).to(device or "cpu")
        size = torch.tensor([blob.numel()], device=blob.device)
        sizes = [torch.zeros_like(size) for _ in range(world)]
        dist.all_gather(sizes, size)
        n = max(int(s) for s in sizes)
        padded = torch.zeros(n, dtype=torch.uint8, device=blob.device)
        padded[: blob.numel()] = blob
        blobs = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(blobs, padded)
        if not self.is_main:
            return None
        return [unpack(b[: int(s)].cpu().numpy().tobytes())[0] for b, s in zip(blobs, sizes)]

    def _publish(self, tmp: Path, final: Path) -> None:
        if final.exists():  # re-saving a step (e.g. after resuming from an older checkpoint)
            trash = self.directory / f"{_LEFTOVER[1]}{final.name}-{uuid.uuid4().hex[:12]}"
            os.replace(final, trash)
            os.replace(tmp, final)
            fsync_dir(self.directory)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(self.directory)

    def _retain(self, step: int, mode: str, final: Path, problem: str | None = None) -> None:
        """Verify ``final`` (unless the caller did: ``problem``, '' when intact), then delete what retention drops."""
        if problem is None:
            try:
                self.verify(final)
                problem = ""
            except CheckpointError as err:
                problem = str(err)
        if problem:
            warnings.warn(f"checkpoint {final} failed verification right after saving ({problem}); "
                          "no older checkpoint is deleted", CorruptCheckpointWarning, stacklevel=3)
            return
        infos = [i for i in self._scan() if i.step <= step]
        intact = [i for i in infos if i.body is not None]
        keep = {step} | {i.step for i in intact[-self.keep_last:]}
        if self.every:
            keep |= {i.step for i in intact if i.step % self.every == 0}
        scored = [i for i in intact if i.body["metric"] is not None]
        if scored:
            sign = 1.0 if mode == "min" else -1.0
            keep.add(min(scored, key=lambda i: (sign * i.body["metric"], i.step)).step)
        for info in infos:
            if info.step not in keep:
                shutil.rmtree(info.path, ignore_errors=True)
        fsync_dir(self.directory)

    # ------------------------------------------------------------------------------- load
    def verify(self, path: str | os.PathLike) -> dict:
        """Check a checkpoint's manifest and every file's size and sha256; return the manifest body.

        Raises:
            CheckpointError: naming the missing, truncated or corrupted file.
        """
        path = Path(path)
        body = read_manifest(path)
        for name in body["files"]:
            read_file(path, body, name)
        return body

    def load(self, path: str | os.PathLike, state: Mapping[str, Any]) -> dict[str, Any]:
        """Restore ``state`` in place from the checkpoint at ``path`` (see :meth:`load_latest`).

        Every file is verified before any object is touched. A sharded checkpoint loads at any world
        size; into DTensor-sharded objects that is a collective (call it on every rank), into plain
        objects each process reads on its own.

        Raises:
            CheckpointError: the checkpoint is incomplete or corrupted.
            ValueError: ``state`` holds a stateful object the checkpoint has no entry for.
        """
        path = Path(path)
        body = read_manifest(path)
        if body.get("layout") == "sharded":
            return load_sharded(self, path, body, state)
        wanted = {n: o for n, o in state.items() if object_kind(o) is not None}
        missing = sorted(set(wanted) - set(body["entries"]))
        if missing:
            raise ValueError(f"state: checkpoint {path} has no entries {missing}; it holds {sorted(body['entries'])}")
        # Every file is read and checked once (the ones nothing here needs too), all before any
        # object is touched; the needed ones are decoded from the bytes just verified.
        needed = {f"{n}.safetensors" for n in wanted} | {"_values.safetensors"}
        if self.rng:
            needed.add("_rng.safetensors")
        records = {}
        for name in body["files"]:
            if name in needed:
                records[name] = read_record(path, body, name)
            else:
                read_file(path, body, name)
        for name in sorted(needed - records.keys() - {"_rng.safetensors"}):
            raise CheckpointError(f"{name} is not listed in {MANIFEST}")
        decoded = {n: records[f"{n}.safetensors"] for n in wanted}
        values, _ = records["_values.safetensors"]
        rng_states = records["_rng.safetensors"][0] if "_rng.safetensors" in records else None
        for name, obj in wanted.items():
            restore_object(obj, *decoded[name])
        if rng_states is not None:  # last, so nothing above can consume the restored streams
            rank = dist.get_rank() if _dist_active() else 0
            if rank < len(rng_states):
                restore_rng_state(rng_states[rank])
            else:
                logger.warning("checkpoint %s holds RNG states for %d ranks; rank %d keeps its own",
                               path, len(rng_states), rank)
        return {"step": body["step"], "metric": body["metric"], "path": str(path), **values}

    def load_latest(self, state: Mapping[str, Any]) -> dict[str, Any] | None:
        """Restore ``state`` in place from the newest intact checkpoint (highest position).

        Returns a dict with ``step`` (the position given to :meth:`save`: an optimizer step or an
        epoch, whichever the run saved at), ``metric``, ``path`` and the saved plain values, or
        None when there is nothing to resume. A corrupted or incomplete checkpoint is skipped with a
        :class:`CorruptCheckpointWarning` naming it; leftover temporary directories of an
        interrupted save are ignored and (on the main process) removed. Module weights load
        strictly, accepting ``module.`` and ``_orig_mod.`` key prefixes in either direction.
        """
        return self._load_first(sorted(self._scan(), key=lambda i: -i.step), state, rank_by_metric=False)

    def load_best(self, state: Mapping[str, Any]) -> dict[str, Any] | None:
        """Like :meth:`load_latest`, for the intact checkpoint with the best metric (None if none has one)."""
        return self._load_first(self._scan(), state, rank_by_metric=True)

    def _load_first(self, infos: list[_Info], state: Mapping[str, Any], rank_by_metric: bool) -> dict | None:
        if self.is_main:
            self._remove_leftovers()
        for info in infos:
            if info.body is None:
                self._warn(info.path, info.error)
        infos = [i for i in infos if i.body is not None]
        if rank_by_metric:
            scored = [i for i in infos if i.body["metric"] is not None]
            mode = max(scored, key=lambda i: i.step).body["mode"] if scored else "min"
            sign = 1.0 if mode == "min" else -1.0
            infos = sorted(scored, key=lambda i: (sign * i.body["metric"], i.step))
        for info in infos:
            try:
                return self.load(info.path, state)
            except CheckpointError as err:
                self._warn(info.path, str(err))
        return None

    @staticmethod
    def _warn(path: Path, reason: str) -> None:
        warnings.warn(f"checkpoint {path} is corrupted or incomplete ({reason}); skipping it",
                      CorruptCheckpointWarning, stacklevel=4)

    def _scan(self) -> list[_Info]:
        if not self.directory.is_dir():
            return []
        out = []
        for path in self.directory.iterdir():
            m = _STEP_DIR.match(path.name)
            if not m or not _ours(path):
                continue  # not a checkpoint of ours: never listed, loaded, replaced or deleted
            try:
                body, error = read_manifest(path), ""
                if body["step"] != int(m.group(1)):
                    body, error = None, f"manifest.json says step {body['step']}"
            except CheckpointError as err:
                body, error = None, str(err)
            out.append(_Info(int(m.group(1)), path, body, error))
        return sorted(out, key=lambda i: i.step)

    def _remove_leftovers(self) -> None:
        if not self.directory.is_dir():
            return
        for path in self.directory.iterdir():
            if path.name.startswith(_LEFTOVER) and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
