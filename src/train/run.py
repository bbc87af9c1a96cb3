"""A run folder that belongs to one run: locked while it runs, never silently reused or lost.

The contract every example keeps (and any script built on :class:`RunDir` gets for free):

- **One process at a time.** The main process holds an exclusive ``flock`` on ``OUT/.lock`` for
  the run's lifetime; a second run on the same folder fails at once, naming the folder and the
  holder's pid.
- **A used folder is refused.** A folder that holds an earlier run (its ``run.json``, or a
  ``metrics.jsonl``/``summary.json``/``checkpoints`` of an older blockyard) is refused unless the
  run continues it (``resume="auto"`` or a checkpoint path) or ``overwrite=True`` moves it aside
  into ``OUT/previous/<started-at>/`` (moved, never deleted).
- **A resume is checked before anything is written.** The saved configuration is compared
  with the requested one and the differing keys are named; a checkpoint folder with
  checkpoints of which none is intact is named instead of silently training from scratch.
- **Only its own files.** ``run.json`` records the top-level names the run wrote through
  :meth:`RunDir.file`, :meth:`RunDir.checkpoints` and :meth:`RunDir.write_json`; those, and only
  those, move aside on ``overwrite``. Files a user put in the folder are never moved, renamed or
  deleted (with one exception: an older blockyard's folder has no ``run.json``, so overwriting
  one moves everything except the ``keep`` entries).

Example::

    run = RunDir(args.out, config=run_config(args), resume=args.resume, overwrite=args.overwrite)
    ckpt = run.checkpoints()
    resumed = run.resume_from(ckpt, state)          # None on a fresh start
    log = run.metrics_log("metrics.jsonl", resumed)
    ...
    run.write_json("summary.json", summary)
    run.finish()
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..data.atomic import write_json_atomic
from ..data.lock import LockHeld, hold_lock, release_lock
from .checkpoint import CheckpointManager
from .distributed import any_rank
from .manifest import CheckpointError
from .metrics_log import MetricsLog

__all__ = ["RUN_FILE", "RunDir", "RunFolderError"]

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
_LOCK = ".lock"
_ASIDE = "previous"
_LEGACY_MARKERS = ("metrics.jsonl", "summary.json", "checkpoints")


class RunFolderError(RuntimeError):
    """The run folder cannot be used as asked; the message says why and what to pass instead."""


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H-%M-%SZ")


def _diff(saved: Mapping[str, Any], requested: Mapping[str, Any]) -> list[str]:
    keys = sorted(set(saved) | set(requested))
    missing = object()
    out = []
    for k in keys:
        a, b = saved.get(k, missing), requested.get(k, missing)
        if a != b:
            show = lambda v: "(absent)" if v is missing else json.dumps(v)  # noqa: E731
            out.append(f"{k}: saved {show(a)}, requested {show(b)}")
    return out


def _normalise(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config as JSON would give it back (tuples -> lists), so saved and requested compare."""
    try:
        return json.loads(json.dumps(dict(config)))
    except TypeError as err:
        raise TypeError(f"config: expected JSON-serialisable values, got {err}") from None


class RunDir:
    """The output folder of one run (see the module docstring for the contract).

    Construct it on every rank after :func:`~blockyard.train.setup_distributed`: the main process
    checks and locks the folder, the others learn its verdict through one collective, so every
    rank raises :class:`RunFolderError` together or none does.

    Args:
        path: the run folder (``--out``); created if missing.
        config: everything that defines the run (architecture, data, optimisation, seed), JSON
            values; saved in ``run.json`` and compared on resume. Leave out what may change
            between a run and its resume (output paths, worker counts).
        resume: ``None`` (a new run), ``"auto"`` (continue from each stage's newest intact
            checkpoint; a folder with no earlier run starts fresh, so a requeued job can always
            pass it) or the path of one checkpoint (that stage resumes from it, the others as
            with ``"auto"``); it must belong to the last stage that has checkpoints, and that
            stage's newer checkpoints move aside into ``path/previous/<now>-abandoned/``.
        overwrite: move an earlier run aside into ``path/previous/<started-at>/`` and start anew.
        keep: top-level entries that are not part of a run (a dataset cache built under the
            folder): never moved aside, never make a folder "used".
        is_main: whether this process owns the folder; default rank 0.

    Raises:
        RunFolderError: another process holds the folder; it holds an earlier run and neither
            ``resume`` nor ``overwrite`` is given; the saved configuration differs from
            ``config`` (the message names the keys); every checkpoint of a stage is damaged;
            ``resume`` names a checkpoint that does not exist.
    """

    def __init__(self, path: str | os.PathLike, config: Mapping[str, Any], *, resume: str | None = None,
                 overwrite: bool = False, keep: Sequence[str] = ("data",), is_main: bool | None = None) -> None:
        if not isinstance(config, Mapping):
            raise TypeError(f"config: expected a mapping of JSON values, got {type(config).__name__}")
        if resume is not None and not isinstance(resume, (str, os.PathLike)):
            raise TypeError(f"resume: expected None, 'auto' or a checkpoint path, got {resume!r}")
        if resume is not None and overwrite:
            raise RunFolderError("--resume and --overwrite: expected at most one of them (continue the earlier run, "
                                 "or move it aside and start anew), got both")
        from .distributed import is_distributed

        if is_main is None:
            import torch.distributed as dist

            is_main = not is_distributed() or dist.get_rank() == 0
        self.path = Path(path)
        self.config = _normalise(config)
        self.resume = None if resume is None else str(resume)
        self.overwrite = bool(overwrite)
        self.keep = frozenset(keep) | {_LOCK, _ASIDE}
        self.is_main = is_main
        self.resumed = False  # True when an earlier run is continued
        self.moved_to: Path | None = None  # where overwrite moved the earlier run
        self._lock_fh = None
        self._record: dict[str, Any] = {}
        error: RunFolderError | None = None
        if is_main:
            try:
                self._open()
            except RunFolderError as err:
                error = err
                self._unlock()
        if any_rank(error is not None):
            if error is not None:
                raise error
            raise RunFolderError(f"{self.path}: the main process refused the run folder (its message says why)")
        self.resumed = any_rank(self.resumed)

    # ------------------------------------------------------------------------------ opening
    def _open(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock()
        earlier = self._earlier_run()
        if earlier is None:
            if self.resume not in (None, "auto"):
                raise RunFolderError(f"--resume {self.resume}: {self.path} holds no earlier run to resume")
            self._start()
            return
        if self.resume is None and not self.overwrite:
            started = earlier.get("started", "unknown time")
            raise RunFolderError(
                f"{self.path} holds an earlier run (started {started}, status {earlier.get('status', 'unknown')}); "
                f"pass --resume auto to continue it, or --overwrite to move it aside into "
                f"{self.path / _ASIDE}/ and start a new run. Nothing was written.")
        if self.overwrite:
            self._move_aside(earlier)
            self._start()
            return
        if "config" not in earlier:
            raise RunFolderError(f"{self.path} holds a run of an older blockyard (no {RUN_FILE}); its configuration "
                                 "cannot be checked, so it cannot be resumed safely: pass --overwrite to move it "
                                 "aside and start anew")
        diff = _diff(earlier["config"], self.config)
        if diff:
            raise RunFolderError(f"--resume: the requested run differs from the one saved in {self.path / RUN_FILE} "
                                 f"({'; '.join(diff)}). Nothing was written; rerun with the saved values, or "
                                 "--overwrite to move the earlier run aside.")
        self._check_resumable(earlier)
        if self.resume != "auto":
            self._abandon_newer(Path(self.resume))
        self._record = {**earlier, "status": "running", "pid": os.getpid(),
                        "resumed": [*earlier.get("resumed", []), _now()]}
        self.resumed = True
        self._save_record()

    def _start(self) -> None:
        self._record = {"config": self.config, "status": "running", "started": _now(), "pid": os.getpid(),
                        "host": socket.gethostname(), "files": [], "checkpoints": []}
        self._save_record()

    def _earlier_run(self) -> dict[str, Any] | None:
        run_file = self.path / RUN_FILE
        if run_file.exists():
            try:
                record = json.loads(run_file.read_text())
            except (OSError, ValueError) as err:
                raise RunFolderError(f"{run_file}: unreadable ({err}); move it away by hand") from None
            if not isinstance(record, dict):
                raise RunFolderError(f"{run_file}: expected a JSON object, got {type(record).__name__}")
            return record
        legacy = [p for p in self.path.iterdir() if p.name not in self.keep and (
            p.name in _LEGACY_MARKERS or (p.is_dir() and any((p / m).exists() for m in _LEGACY_MARKERS)))]
        return {"legacy": True} if legacy else None

    def _check_resumable(self, earlier: Mapping[str, Any]) -> None:
        if self.resume not in (None, "auto"):
            target = Path(self.resume)
            try:
                CheckpointManager(target.parent, rng=False).verify(target)
            except CheckpointError as err:
                raise RunFolderError(f"--resume {self.resume}: not an intact checkpoint ({err})") from None
            started = [rel for rel in earlier.get("checkpoints", []) if CheckpointManager(self.path / rel).step_dirs()]
            if not started or (self.path / started[-1]).resolve() != target.parent.resolve():
                raise RunFolderError(f"--resume {self.resume}: expected a checkpoint of the run's last started stage "
                                     f"({self.path / started[-1] if started else 'none'}): the later stages were "
                                     "trained from this stage's newer state. Nothing was written.")
        for rel in earlier.get("checkpoints", []):
            manager = CheckpointManager(self.path / rel, rng=False)
            present = manager.step_dirs()
            if present and not manager.intact_steps():
                names = ", ".join(str(p) for p in present)
                raise RunFolderError(f"--resume auto: every checkpoint in {self.path / rel} is damaged ({names}); "
                                     "nothing intact is left to resume. Nothing was written; pass --overwrite "
                                     "to move this run aside and start over.")

    def _move_aside(self, earlier: Mapping[str, Any]) -> None:
        if earlier.get("legacy"):
            names = [p.name for p in self.path.iterdir() if p.name not in self.keep]
        else:
            names = [RUN_FILE, *earlier.get("files", []), *earlier.get("checkpoints", [])]
        names = sorted({Path(n).parts[0] for n in names if (self.path / Path(n).parts[0]).exists()})
        target = self._aside(str(earlier.get("started", _now())))
        for name in names:
            os.replace(self.path / name, target / name)
        self.moved_to = target
        logger.info("moved the earlier run in %s aside into %s", self.path, target)

    def _aside(self, stamp: str) -> Path:
        """A new, empty ``previous/<stamp>[.n]`` folder."""
        target, suffix = self.path / _ASIDE / stamp, 1
        while target.exists():
            target, suffix = self.path / _ASIDE / f"{stamp}.{suffix}", suffix + 1
        target.mkdir(parents=True)
        return target

    def _abandon_newer(self, target: Path) -> None:
        """Resuming from an older checkpoint: move the newer ones of its stage aside (a later
        ``--resume auto`` must not pick up the abandoned timeline)."""
        manager = CheckpointManager(target.parent, rng=False)
        step = int(target.name.split("_")[-1])
        newer = [p for p in manager.step_dirs() if int(p.name.split("_")[-1]) > step]
        if not newer:
            return
        aside = self._aside(f"{_now()}-abandoned") / target.parent.resolve().relative_to(self.path.resolve())
        aside.mkdir(parents=True)
        for p in newer:
            os.replace(p, aside / p.name)
        self.moved_to = aside
        logger.info("resuming from %s: moved %d newer checkpoints aside into %s", target, len(newer), aside)

    # ------------------------------------------------------------------------------ locking
    def _lock(self) -> None:
        try:
            self._lock_fh = hold_lock(self.path / _LOCK, f"{os.getpid()} on {socket.gethostname()}")
        except LockHeld as held:
            raise RunFolderError(f"{self.path} is in use by another run (pid {held.holder}); wait for it to end or "
                                 "choose another --out. Nothing was written.") from None

    def _unlock(self) -> None:
        if self._lock_fh is not None:
            release_lock(self._lock_fh)
            self._lock_fh = None

    # ------------------------------------------------------------------------------ writing
    def _save_record(self) -> None:
        if self.is_main:
            write_json_atomic(self.path / RUN_FILE, self._record)

    def _register(self, kind: str, name: str) -> None:
        if not self.is_main:
            return
        top = Path(name).parts[0] if kind == "files" else name
        if top in (RUN_FILE, _LOCK, _ASIDE):
            raise ValueError(f"name: {name!r} is reserved by RunDir")
        if top not in self._record[kind]:
            self._record[kind].append(top)
            self._save_record()

    def file(self, name: str | os.PathLike) -> Path:
        """``path / name``, recorded as written by this run (its top-level entry moves aside on overwrite).

        Parent folders are created.
        """
        self._register("files", str(name))
        target = self.path / name
        if self.is_main:
            target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def write_json(self, name: str | os.PathLike, obj: Any) -> Path:
        """Write ``obj`` as JSON to ``path / name`` atomically (main process only); return the path."""
        target = self.file(name)
        if self.is_main:
            write_json_atomic(target, obj)
        return target

    def checkpoints(self, subdir: str = "checkpoints", **kwargs: Any) -> CheckpointManager:
        """A :class:`CheckpointManager` on ``path / subdir`` (keywords go to it), recorded for resume checks."""
        self._register("checkpoints", str(Path(subdir)))
        kwargs.setdefault("is_main", self.is_main)
        return CheckpointManager(self.path / subdir, **kwargs)

    def resume_from(self, manager: CheckpointManager, state: Mapping[str, Any]) -> dict[str, Any] | None:
        """Restore ``state`` for a continued run; None on a new run or a stage with no checkpoint yet.

        With ``resume`` a checkpoint path inside ``manager``'s folder, that checkpoint is loaded;
        otherwise the newest intact one. Call it on every rank.

        Raises:
            RunFolderError: the folder holds checkpoints but none is intact.
        """
        if not self.resumed:
            return None
        if self.resume not in (None, "auto") and Path(self.resume).resolve().parent == manager.directory.resolve():
            return manager.load(self.resume, state)
        loaded = manager.load_latest(state)
        if loaded is None and manager.step_dirs():
            raise RunFolderError(f"every checkpoint in {manager.directory} is damaged; nothing intact to resume")
        return loaded

    def metrics_log(self, name: str | os.PathLike = "metrics.jsonl", resumed: Mapping[str, Any] | None = None,
                    key: str = "step") -> MetricsLog:
        """A :class:`MetricsLog` on ``path / name``, truncated after ``resumed[key]`` when resuming."""
        return MetricsLog(self.file(name), resume_step=None if resumed is None else int(resumed[key]),
                          is_main=self.is_main)

    def finish(self) -> None:
        """Mark the run finished in ``run.json`` and release the folder."""
        if self.is_main and self._record:
            self._record["status"] = "finished"
            self._record["finished"] = _now()
            self._save_record()
        self.close()

    def close(self) -> None:
        """Release the folder's lock (the run stays "running" in ``run.json``: it can be resumed)."""
        self._unlock()

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r}, resumed={self.resumed})"
