"""Sharded checkpoints: every rank writes its own shards, through torch.distributed.checkpoint.

The path :class:`~blockyard.train.CheckpointManager` takes with ``sharded=True`` (saving) and for
any checkpoint whose manifest says ``"layout": "sharded"`` (loading). The directory protocol is
the manager's own: a hidden temporary directory, fsynced, renamed into place, the parent fsynced;
a ``manifest.json`` with every file's size and sha256; the same retention and the same
fallback past a damaged checkpoint. What differs is the content::

    step_00000040/
        shards/shard-0000R-model-00001-of-00001.safetensors  # rank R-1's tensors (DCP, safetensors)
        _rng-rank0000R.safetensors       # each rank's global RNG states, written by that rank
        _values.safetensors              # rank 0: plain values + every entry's JSON tree
        manifest.json                    # rank 0, last, after every rank reported its files' digests

Tensors go through ``torch.distributed.checkpoint`` (DCP) with its safetensors storage
(``HuggingFaceStorageWriter(save_distributed=True)`` / ``HuggingFaceStorageReader``): each rank
writes the shards it holds (a ``DTensor``'s local chunk, its offsets in the file's metadata; a
replicated tensor once, by one rank), nothing is gathered to rank 0, and the checkpoint loads at
any world size, also into a plain model: DCP reads the chunks that overlap each target tensor.
All that is not a tensor (optimizer hyper-parameters, schedules, counters, plain values) is a
JSON tree. No file is a pickle and nothing is unpickled from a file (DCP's planning step does
exchange its plans between the ranks of a job with torch.distributed's object collectives, in
memory).

Optimizers are stored by parameter name (``get_optimizer_state_dict`` of the module entry that
holds their parameters), so a checkpoint written by FSDP2 at one world size resumes at another,
or under DDP, or in a single process. Entries other than DTensor shards must be equal on every
rank (true of models, optimizers, schedules, EMA and counters in data-parallel training); the
global RNG states are per rank: rank ``r`` restores rank ``r``'s, a rank the checkpoint has none
for keeps its own (with a warning).
"""
from __future__ import annotations

import inspect
import json
import logging
import shutil
import warnings
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.distributed as dist

from ..data._safetensors import fsync_dir
from .distributed import unwrap
from .manifest import CheckpointError, read_file, read_manifest, read_record, sha256, write_file, write_manifest
from .rng import capture_rng_state, restore_rng_state
from .serialize import decode_state, dumps_json, encode_state, pack, unpack
from .stateful import capture_object, object_kind, restore_object

__all__ = ["MIN_TORCH", "SHARDS", "export_weights", "load_sharded", "save_sharded"]

logger = logging.getLogger(__name__)

MIN_TORCH = "2.8"  #: first torch with DCP's safetensors storage (HuggingFaceStorageWriter(save_distributed=True))
SHARDS = "shards"  #: the checkpoint's subdirectory of DCP shard files
_SINGLE = "torch.distributed is (disabled|unavailable)"  # DCP's warning when used without a process group


def _storage() -> tuple[type, type]:
    """DCP's safetensors writer and reader classes, or an ImportError naming the torch needed."""
    try:
        from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
    except ImportError:
        HuggingFaceStorageWriter = None
    if HuggingFaceStorageWriter is None or "save_distributed" not in inspect.signature(
            HuggingFaceStorageWriter.__init__).parameters:
        raise ImportError(f"sharded checkpoints need torch.distributed.checkpoint's HuggingFaceStorageWriter/Reader "
                          f"with save_distributed (torch >= {MIN_TORCH}), got torch {torch.__version__}")

    class Writer(HuggingFaceStorageWriter):
        """Remembers the files this rank wrote, to checksum them."""

        written: tuple[str, ...] = ()

        def write_data(self, plan, planner):
            future = super().write_data(plan, planner)
            self.written = tuple(sorted({r.storage_data.relative_path for r in future.wait()}))
            return future

    return Writer, HuggingFaceStorageReader


def _collective() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _exchange(obj: Any) -> list[Any]:
    """Every rank's JSON-able ``obj``, on every rank (a collective; JSON bytes, no pickle)."""
    if not _collective():
        return [obj]
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    blob = torch.frombuffer(bytearray(dumps_json(obj)), dtype=torch.uint8).to(device or "cpu")
    size = torch.tensor([blob.numel()], device=blob.device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    padded = torch.zeros(max(int(s) for s in sizes), dtype=torch.uint8, device=blob.device)
    padded[: blob.numel()] = blob
    blobs = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(blobs, padded)
    return [json.loads(b[: int(s)].cpu().numpy().tobytes()) for b, s in zip(blobs, sizes)]


def _owner(opt: Any, modules: dict[str, Any]) -> str | None:
    """The module entry holding every parameter of optimizer ``opt`` (None if none does)."""
    if not isinstance(opt, torch.optim.Optimizer):
        return None
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    for name, module in modules.items():
        if ids <= {id(p) for p in module.parameters()}:
            return name
    return None


def _capture(name: str, obj: Any, modules: dict[str, Any], saving: bool) -> tuple[str, Any, dict]:
    """``(kind, payload, header)`` of an entry; an optimizer by its module's parameter names.

    Loading, an optimizer without state gets it initialised (the tensors to load into).
    """
    owner = _owner(obj, modules)
    if owner is not None and saving and not obj.state:
        # get_optimizer_state_dict would initialise the state with a zero-lr step, which changes
        # the next real step (Adam's bias correction counts it): the empty state, by name, instead.
        names = {id(p): n for n, p in unwrap(modules[owner]).named_parameters()}
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[id(p)] for p in g["params"]]}
                  for g in obj.param_groups]
        return "optimizer", {"state": {}, "param_groups": groups}, {"module": owner}
    if owner is not None:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return "optimizer", get_optimizer_state_dict(unwrap(modules[owner]), obj), {"module": owner}
    if isinstance(obj, torch.optim.Optimizer) and any(
            hasattr(p, "to_local") for g in obj.param_groups for p in g["params"]):
        raise ValueError(f"state: optimizer {name!r} updates sharded parameters but no module entry in the state "
                         "holds them; checkpoint it together with its model")
    return capture_object(obj)


def _entries(state: dict[str, Any], saving: bool) -> dict[str, tuple[str, Any, dict]]:
    wanted = {n: o for n, o in state.items() if object_kind(o) is not None}
    modules = {n: o for n, o in wanted.items() if object_kind(o) == "module"}
    return {n: _capture(n, o, modules, saving) for n, o in wanted.items()}


def _agreed(problem: str, what: str) -> None:
    """Raise on every rank when any rank met a problem (a collective)."""
    problems = [p for p in _exchange(problem) if p]
    if problems:
        raise CheckpointError(f"{what} failed ({'; '.join(problems)})")


def _write_own_files(tmp: Path, tensors: dict[str, torch.Tensor], rank: int, rng: bool) -> dict[str, dict]:
    """This rank's part: its DCP shards and its RNG file; their manifest entries."""
    writer_cls, _ = _storage()
    import torch.distributed.checkpoint as dcp

    writer = writer_cls(str(tmp / SHARDS), save_distributed=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_SINGLE)
        dcp.save(tensors, storage_writer=writer, no_dist=not _collective())  # fsyncs every file it writes
    files = {}
    for f in writer.written:
        data = (tmp / SHARDS / f).read_bytes()
        files[f"{SHARDS}/{f}"] = {"bytes": len(data), "sha256": sha256(data)}
    if rng:
        name = f"_rng-rank{rank:05d}.safetensors"
        files[name] = write_file(tmp / name, pack(capture_rng_state()))
    return files


def save_sharded(manager: Any, position: int, state: dict[str, Any], metric: float | None, mode: str) -> Path | None:
    """:meth:`CheckpointManager.save` with ``sharded=True`` (arguments already checked). A collective."""
    _storage()  # a torch without DCP's safetensors storage fails here, before anything is written
    rank = dist.get_rank() if _collective() else 0
    captured = _entries(state, saving=True)
    records, tensors = {}, {}
    for name, (kind, payload, header) in captured.items():
        tree, flat = encode_state(payload, keep_tensors=True)
        records[name] = {"kind": kind, "tree": tree, "header": header}
        tensors.update({f"{name}/{key}": t for key, t in flat.items()})
    plain = {n: o for n, o in state.items() if n not in captured}
    values = pack(plain, entries=records)  # on every rank: a value that needs pickle fails everywhere

    tmp, problem = None, ""
    if manager.is_main:
        try:
            tmp = manager._prepare_tmp(position)
        except (CheckpointError, OSError) as err:
            problem = str(err)
    _agreed(problem, "creating the checkpoint directory")
    tmp = manager.directory / _exchange(tmp.name if tmp is not None else "")[0]
    final = manager.directory / f"step_{position:08d}"
    try:
        files, problem = {}, ""
        try:
            files = _write_own_files(tmp, tensors, rank, manager.rng)
        except OSError as err:  # DCP's own failures raise on every rank already
            problem = f"rank {rank}: {err}"
        reports = _exchange({"files": files, "problem": problem})
        failed = [r["problem"] for r in reports if r["problem"]]
        if failed:
            raise CheckpointError(f"writing the sharded checkpoint failed ({'; '.join(failed)})")
        problem = ""
        if manager.is_main:
            try:
                every = {k: v for r in reports for k, v in r["files"].items()}
                every["_values.safetensors"] = write_file(tmp / "_values.safetensors", values)
                write_manifest(tmp, {"step": position, "metric": metric, "mode": mode,
                                     "entries": {n: r["kind"] for n, r in records.items()}, "values": list(plain),
                                     "layout": "sharded", "world_size": len(reports),
                                     "rng_ranks": len(reports) if manager.rng else 0,
                                     "torch": torch.__version__, "files": every})
                if (tmp / SHARDS).is_dir():
                    fsync_dir(tmp / SHARDS)
                fsync_dir(tmp)
                manager._publish(tmp, final)
            except OSError as err:
                problem = f"rank 0: {err}"
        _agreed(problem, "publishing the sharded checkpoint")
    except BaseException:
        if manager.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        body = read_manifest(final)
    except CheckpointError:
        body = None
    problem = _verify(final, body)  # every file read back once, shared out over the ranks
    if manager.is_main:
        manager._retain(position, mode, final, problem=problem)
    _exchange("")  # every rank returns once retention is done
    return final if manager.is_main else None


def _verify(path: Path, body: dict | None, collective: bool | None = None) -> str:
    """Check every file's size and sha256, shared out over the ranks; the first problem ('' if none), agreed."""
    collective = _collective() if collective is None else collective
    rank, world = (dist.get_rank(), dist.get_world_size()) if collective else (0, 1)
    problem = ""
    if body is None:
        problem = "manifest.json is missing or damaged"
    else:
        for name in sorted(body["files"])[rank::world]:
            try:
                read_file(path, body, name)
            except CheckpointError as err:
                problem = str(err)
                break
    if collective:
        problem = next((p for p in _exchange(problem) if p), "")
    return problem


def _refs(tree: Any) -> list[str]:
    """The tensor names a saved JSON tree refers to (its ``__tensor__``/``__ndarray__`` leaves)."""
    if isinstance(tree, list):
        return [r for v in tree for r in _refs(v)]
    if not isinstance(tree, dict):
        return []
    if len(tree) == 1 and next(iter(tree)) in ("__tensor__", "__ndarray__"):
        return [next(iter(tree.values()))]
    return [r for v in tree.values() for r in _refs(v)]


def _targets(metadata: dict, name: str, tree: Any, live: Any) -> dict[str, torch.Tensor]:
    """The tensors DCP loads entry ``name`` into: the live ones (keeping their sharding) where the
    shapes agree, new ones where the live object has none (or another shape), keyed like the shards."""
    _, current = encode_state(live, keep_tensors=True)
    out = {}
    for key in _refs(tree):
        md = metadata.get(f"{name}/{key}")
        if md is None:
            raise CheckpointError(f"{SHARDS}/ holds no tensor {name}/{key}")
        t = current.get(key)
        ok = t is not None and tuple(t.shape) == tuple(md.size)
        out[f"{name}/{key}"] = t if ok else torch.empty(md.size, dtype=md.properties.dtype)
    return out


def _load_tensors(path: Path, records: dict[str, dict], live: dict[str, Any], collective: bool
                  ) -> dict[str, Any]:
    """Read every entry's tensors through DCP; each entry's payload, decoded."""
    _, reader_cls = _storage()
    import torch.distributed.checkpoint as dcp

    metadata = reader_cls(str(path / SHARDS)).read_metadata().state_dict_metadata
    targets = {n: _targets(metadata, n, r["tree"], live.get(n, {})) for n, r in records.items()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_SINGLE)
        dcp.load({k: t for ts in targets.values() for k, t in ts.items()},
                 storage_reader=reader_cls(str(path / SHARDS)), no_dist=not collective)
    return {n: decode_state(records[n]["tree"], {k[len(n) + 1:]: t for k, t in targets[n].items()})
            for n in records}


def _has_shards(obj: Any) -> bool:
    """Whether ``obj`` holds DTensor shards (then loading it is a collective)."""
    if isinstance(obj, torch.optim.Optimizer):
        return any(hasattr(p, "to_local") for g in obj.param_groups for p in g["params"])
    if object_kind(obj) == "module":
        return any(hasattr(t, "to_local") for t in [*obj.parameters(), *obj.buffers()])
    return any(hasattr(t, "to_local") for t in encode_state(capture_object(obj)[1], keep_tensors=True)[1].values())


def load_sharded(manager: Any, path: Path, body: dict, state: dict[str, Any]) -> dict[str, Any]:
    """:meth:`CheckpointManager.load` of a sharded checkpoint.

    A collective when ``state`` holds DTensor shards (every rank calls it); into plain objects each
    process reads on its own (e.g. the main process loading a plain model for evaluation).
    """
    wanted = {n: o for n, o in state.items() if object_kind(o) is not None}
    missing = sorted(set(wanted) - set(body["entries"]))
    if missing:
        raise ValueError(f"state: checkpoint {path} has no entries {missing}; it holds {sorted(body['entries'])}")
    collective = _collective() and any(_has_shards(o) for o in wanted.values())
    problem = _verify(path, body, collective)  # before any object is touched
    if problem:
        raise CheckpointError(problem)
    captured = _entries(wanted, saving=False)
    values, header = read_record(path, body, "_values.safetensors")
    records = {n: header["entries"][n] for n in wanted}
    for name, record in records.items():
        if record["kind"] == "optimizer" and captured[name][0] != "optimizer":
            raise ValueError(f"state: optimizer {name!r} was saved by the parameter names of module entry "
                             f"{record['header']['module']!r}; pass the module that holds its parameters too")
    payloads = _load_tensors(path, records, {n: c[1] for n, c in captured.items()}, collective)
    for name, obj in wanted.items():
        if records[name]["kind"] == "optimizer":
            from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

            set_optimizer_state_dict(unwrap(wanted[captured[name][2]["module"]]), obj, payloads[name])
        else:
            restore_object(obj, payloads[name], records[name]["header"])
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    rng_file = f"_rng-rank{rank:05d}.safetensors"
    if manager.rng and rng_file in body["files"]:  # last, so nothing above can consume the restored streams
        restore_rng_state(unpack(read_file(path, body, rng_file))[0])
    elif manager.rng and body.get("rng_ranks"):
        logger.warning("checkpoint %s holds RNG states for %d ranks; rank %d keeps its own",
                       path, body["rng_ranks"], rank)
    return {"step": body["step"], "metric": body["metric"], "path": str(path), **values}


def export_weights(checkpoint: str | Path, file: str | Path, entry: str = "model") -> Path:
    """Write one entry's full weights from a checkpoint into a single safetensors file; returns its path.

    For evaluation or export: the file opens with ``safetensors.torch.load_file`` and loads into a
    plain model with ``load_state_dict``, whatever world size (and sharding) wrote the checkpoint,
    sharded or not. Runs in one process, no process group needed; every file is verified first.

    Args:
        checkpoint: a ``step_XXXXXXXX`` directory written by :class:`~blockyard.train.CheckpointManager`.
        file: the safetensors file to write.
        entry: a module entry (``"model"``), or an entry holding weights under ``"module"`` (an
            :class:`~blockyard.train.EMA`: its averaged weights are exported).

    Raises:
        CheckpointError: a file is missing or damaged.
        ValueError: no such entry, or it holds no weights.
    """
    checkpoint = Path(checkpoint)
    body = read_manifest(checkpoint)
    if entry not in body["entries"]:
        raise ValueError(f"entry: expected one of {sorted(body['entries'])}, got {entry!r}")
    problem = _verify(checkpoint, body, collective=False)
    if problem:
        raise CheckpointError(f"{checkpoint}: {problem}")
    kind = body["entries"][entry]
    if body.get("layout") == "sharded":
        record = read_record(checkpoint, body, "_values.safetensors")[1]["entries"][entry]
        payload = _load_tensors(checkpoint, {entry: record}, {}, collective=False)[entry]
    else:
        payload, _ = read_record(checkpoint, body, f"{entry}.safetensors")
    weights = payload if kind == "module" else payload.get("module") if isinstance(payload, dict) else None
    if not isinstance(weights, dict) or not weights or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise ValueError(f"entry: expected a module entry or one holding weights under 'module', got {entry!r} "
                         f"(a {kind} entry)")
    file = Path(file)
    safetensors.torch.save_file({k: v.contiguous() for k, v in weights.items()}, str(file), metadata={"format": "pt"})
    return file
