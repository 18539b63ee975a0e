"""A run folder: resolved config, metrics.jsonl, results.json, checkpoint and plots.

Everything is written to a temporary file and renamed, so an interrupted run never leaves a
half-written checkpoint or results file behind.

Checkpoints are data, never code: `checkpoint.safetensors` holds every tensor in the safetensors
format and the rest of the checkpoint (numbers, strings, lists, dicts, tuples) as JSON in its
metadata, so reading one unpickles nothing. Old `checkpoint.pt` files are read with
`torch.load(weights_only=True)` (tensors and plain containers only); one that needs more is refused.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import time
import zipfile
from pathlib import Path
from typing import Any

import torch

CHECKPOINT = "checkpoint.safetensors"
BEST = "best"  # the best validation checkpoints of a run (meta_train's keep_best), for an ensemble at meta-test
LEGACY_CHECKPOINT = "checkpoint.pt"  # torch.save format of metagrad <= 0.1.0, read with weights_only=True
CHECKPOINT_KEYS = ("iteration", "algorithm", "identity", "optimizer", "generator", "window", "spec", "seed",
                   "meta_batch", "outer_lr", "seconds", "paths")
_META_KEY = "metagrad_checkpoint"
_FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint file that is damaged, not a metagrad checkpoint, or would need code to load."""

# Config keys a resumed run may change: how long and where it runs, not what it computes.
# `evaluation`: an experiment's record of how it evaluates a model (metagrad eval's defaults).
RESUMABLE_CHANGES = ("resume", "iterations", "out", "device", "time_budget", "budget_minutes", "evaluation")


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    """Write text via a temporary file and rename."""
    _atomic_write_bytes(Path(path), text.encode())


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write JSON via a temporary file and rename."""
    _atomic_write_bytes(path, (json.dumps(obj, indent=2, default=_jsonable) + "\n").encode())


def normalise(value: Any) -> Any:
    """`value` as it reads back from JSON (tuples become lists): what config comparisons compare."""
    return json.loads(json.dumps(value, default=_jsonable))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, (Path, torch.dtype, torch.device)):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# -- checkpoints: safetensors for the tensors, JSON for everything else ------------------------------
def _encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """`obj` as JSON values; tensors go into `tensors` and are replaced by {"$tensor": key}."""
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        # A copy of its own: safetensors refuses tensors that share storage (tied weights, views).
        tensors[key] = obj.detach().to("cpu", copy=True).contiguous()
        return {"$tensor": key}
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {"$tuple": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in obj):
            return {k: _encode(v, tensors) for k, v in obj.items()}
        # Keys that JSON objects cannot hold (ints of optimizer states, tuples of path timings).
        return {"$dict": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, (torch.dtype, torch.device, Path)):
        return str(obj)
    raise TypeError(f"a checkpoint holds tensors and plain values only, not {type(obj).__name__}")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of `_encode`: plain JSON values and tensors, nothing else."""
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if set(obj) == {"$tensor"}:
        return tensors[obj["$tensor"]]
    if set(obj) == {"$tuple"}:
        return tuple(_decode(v, tensors) for v in obj["$tuple"])
    if set(obj) == {"$dict"}:
        return {_hashable(_decode(k, tensors)): _decode(v, tensors) for k, v in obj["$dict"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def _hashable(key: Any) -> Any:
    if isinstance(key, list):
        return tuple(_hashable(k) for k in key)
    return key


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write `state` (tensors, numbers, strings, lists, tuples, dicts) to `path` in the safetensors format,
    atomically (a temporary file, then rename). Read it back with `read_checkpoint`."""
    from safetensors.torch import save

    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    meta = json.dumps({"format": _FORMAT, "state": _encode(state, tensors)})
    _atomic_write_bytes(path, save(tensors, metadata={_META_KEY: meta}))
    return path


def _damaged(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {path} is damaged or not a metagrad checkpoint ({why}); re-run the "
                           "training to make a new one (--overwrite), or point at another checkpoint")


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict saved at `path`, loaded without unpickling anything.

    `checkpoint.safetensors` (this version) or an old `checkpoint.pt` (torch.load with weights_only=True).
    A damaged file, or one that is no metagrad checkpoint, raises CheckpointError (a ValueError) saying so.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    with open(path, "rb") as fh:
        head = fh.read(8)
    if len(head) < 8:
        raise _damaged(path, "empty" if not head else f"only {len(head)} bytes")
    if head[:4] == b"PK\x03\x04":  # a zip: torch.save's format
        state = _read_legacy(path)
    else:
        state = _read_safetensors(path)
    if not isinstance(state, dict) or not {"algorithm", "identity"} <= set(state):
        raise _damaged(path, "it holds no algorithm state")
    return state


def _read_safetensors(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as e:  # safetensors' own error type differs between versions; all mean "not readable"
        raise _damaged(path, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'}") from None
    if _META_KEY not in meta:
        raise _damaged(path, "a safetensors file without metagrad's checkpoint metadata")
    try:
        doc = json.loads(meta[_META_KEY])
        if doc.get("format") != _FORMAT:
            raise CheckpointError(f"checkpoint {path} has format {doc.get('format')!r}, this version of "
                                  f"metagrad reads format {_FORMAT}; use the metagrad version that wrote it")
        return _decode(doc["state"], tensors)
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise _damaged(path, f"bad metadata: {type(e).__name__}") from None


def _read_legacy(path: Path) -> dict[str, Any]:
    try:
        # A file object, not the name: torch.load hands names ending in .safetensors to another loader.
        with open(path, "rb") as fh:
            return torch.load(fh, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only refused an object: loading it would run code of the file's choosing. Never.
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        raise CheckpointError(
            f"checkpoint {path} holds objects other than tensors and plain values"
            + (f" (it names {found.group(1)})" if found else "")
            + ", which could run code when loaded; metagrad never loads those. Use a checkpoint metagrad wrote, "
            "or re-run the training"
        ) from None
    except (EOFError, RuntimeError, OSError, zipfile.BadZipFile, ValueError) as e:
        raise _damaged(path, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'truncated'}") from None


def has_checkpoints(folder: str | Path) -> bool:
    """Whether the run folder, or a run folder inside it (an experiment's models), holds a checkpoint."""
    folder = Path(folder)
    return folder.is_dir() and any(
        p.is_file() for name in (CHECKPOINT, LEGACY_CHECKPOINT) for p in folder.rglob(name))


def find_checkpoint(folder: str | Path) -> Path | None:
    """The checkpoint in a run folder: `checkpoint.safetensors`, else an old `checkpoint.pt`, else None."""
    for name in (CHECKPOINT, LEGACY_CHECKPOINT):
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    return None


class Run:
    """The folder of one run: `runs/<name>/{config.json, metrics.jsonl, results.json, checkpoint.safetensors,
    *.png}`."""

    def __init__(self, directory: str | Path, config: dict[str, Any] | None = None, resume: bool = False,
                 overwrite: bool = False) -> None:
        self.dir = Path(directory)
        self.resume = resume
        if overwrite and not resume and self.dir.exists():
            shutil.rmtree(self.dir)
        if self.dir.exists() and not resume and any(self.dir.iterdir()):
            if any((self.dir / f).exists() for f in (CHECKPOINT, LEGACY_CHECKPOINT, "results.json")):
                raise FileExistsError(
                    f"run folder {self.dir} already holds a run; pass --resume to continue it, --overwrite to "
                    "replace it, or choose another --out"
                )
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config = dict(config or {})
        if resume and (self.dir / "config.json").exists():
            saved = json.loads((self.dir / "config.json").read_text())
            # Compared as JSON values: config.json holds a tuple-valued key as a list.
            changed = {k: (saved.get(k), v) for k, v in self.config.items()
                       if k in saved and normalise(saved[k]) != normalise(v) and k not in RESUMABLE_CHANGES}
            if changed:
                raise ValueError(f"--resume with a different config than the saved one: {changed}")
            self.config = {**saved, **self.config}
        atomic_write_json(self.dir / "config.json", self.config)
        self._t0 = time.time()

    def child(self, name: str, config: dict[str, Any] | None = None) -> Run:
        """A run folder inside this one (one per model an experiment trains), resumed with it."""
        return Run(self.dir / name, config, resume=self.resume)

    @property
    def checkpoint_path(self) -> Path:
        """Where the checkpoint is written."""
        return self.dir / CHECKPOINT

    def existing_checkpoint(self) -> Path | None:
        """The checkpoint file there is: this version's, else an old `checkpoint.pt`, else None."""
        return find_checkpoint(self.dir)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Append one line `{"step": step, "time": seconds, ...metrics}` to metrics.jsonl."""
        line = json.dumps({"step": int(step), "time": round(time.time() - self._t0, 3), **metrics},
                          default=_jsonable)
        with open(self.dir / "metrics.jsonl", "a") as fh:
            fh.write(line + "\n")

    def metrics(self) -> list[dict[str, Any]]:
        """All lines of metrics.jsonl."""
        path = self.dir / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def truncate_metrics(self, after_step: int) -> None:
        """Drop metric lines past `after_step` and the last, shorter window's line (a resumed run re-logs
        them from its checkpoint, which holds that window's sums)."""
        kept = [m for m in self.metrics() if m["step"] <= after_step and "partial_window" not in m]
        _atomic_write_bytes(self.dir / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in kept).encode())

    def save_results(self, results: dict[str, Any]) -> Path:
        """Write results.json atomically."""
        path = self.dir / "results.json"
        atomic_write_json(path, results)
        return path

    def save_checkpoint(self, state: dict[str, Any]) -> Path:
        """Write checkpoint.safetensors atomically (a temporary file, then rename)."""
        path = save_checkpoint(self.checkpoint_path, state)
        legacy = self.dir / LEGACY_CHECKPOINT
        if legacy.is_file():  # a resumed old run: the new file supersedes it
            legacy.unlink()
        return path

    def keep_best(self, state: dict[str, Any], score: float, keep: int, higher: bool = True) -> bool:
        """Keep `state` in `best/` if its validation `score` is among the `keep` best so far (higher or lower is
        better; the earlier iteration first on a tie); returns whether it was kept. `best/index.json` ranks them."""
        folder = self.dir / BEST
        folder.mkdir(exist_ok=True)
        entries = [e for e in self.best() if e["iteration"] != state["iteration"]]
        new = {"iteration": int(state["iteration"]), "score": float(score), "file": f"iteration-{state['iteration']}"
                                                                                   ".safetensors"}
        ranked = sorted(entries + [new], key=lambda e: ((-e["score"] if higher else e["score"]), e["iteration"]))
        kept, dropped = ranked[:keep], ranked[keep:]
        if new in kept:
            save_checkpoint(folder / new["file"], state)
        atomic_write_json(folder / "index.json", kept)  # the index names only files already written
        for e in dropped:
            (folder / e["file"]).unlink(missing_ok=True)
        return new in kept

    def best(self) -> list[dict[str, Any]]:
        """The kept best checkpoints, best first: `[{"iteration", "score", "file"}]` (files in `best/`)."""
        index = self.dir / BEST / "index.json"
        return json.loads(index.read_text()) if index.is_file() else []

    def best_paths(self) -> list[Path]:
        """The files of the kept best checkpoints, best first."""
        return [self.dir / BEST / e["file"] for e in self.best()]

    def truncate_best(self, after_iteration: int) -> None:
        """Forget best checkpoints past `after_iteration` (a resumed run validates those iterations again)."""
        entries = self.best()
        kept = [e for e in entries if e["iteration"] <= after_iteration]
        if len(kept) != len(entries):
            atomic_write_json(self.dir / BEST / "index.json", kept)
            for e in entries:
                if e not in kept:
                    (self.dir / BEST / e["file"]).unlink(missing_ok=True)

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The saved checkpoint (loaded without unpickling anything), or None if there is none."""
        path = self.existing_checkpoint()
        return None if path is None else read_checkpoint(path)

    def plot_path(self, name: str) -> Path:
        """Path of a PNG plot in the run folder."""
        return self.dir / (name if name.endswith(".png") else f"{name}.png")

    def save_figure(self, fig, name: str) -> Path:
        """Save a matplotlib figure as PNG in the run folder and close it."""
        import matplotlib.pyplot as plt

        path = self.plot_path(name)
        tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
        plt.close(fig)
        return path
