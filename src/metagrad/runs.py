"""A run folder: resolved config, metrics.jsonl, results.json, checkpoint and plots.

Everything is written to a temporary file and renamed, so an interrupted run never leaves a
half-written checkpoint or results file behind.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

# Config keys a resumed run may change: how long and where it runs, not what it computes.
RESUMABLE_CHANGES = ("resume", "iterations", "out", "device", "time_budget")


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write JSON via a temporary file and rename."""
    _atomic_write_bytes(path, (json.dumps(obj, indent=2, default=_jsonable) + "\n").encode())


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, (Path, torch.dtype, torch.device)):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


class Run:
    """The folder of one run: `runs/<name>/{config.json, metrics.jsonl, results.json, checkpoint.pt, *.png}`."""

    def __init__(self, directory: str | Path, config: dict[str, Any] | None = None, resume: bool = False,
                 overwrite: bool = False) -> None:
        self.dir = Path(directory)
        self.resume = resume
        if overwrite and not resume and self.dir.exists():
            shutil.rmtree(self.dir)
        if self.dir.exists() and not resume and any(self.dir.iterdir()):
            if (self.dir / "checkpoint.pt").exists() or (self.dir / "results.json").exists():
                raise FileExistsError(
                    f"run folder {self.dir} already holds a run; pass --resume to continue it, --overwrite to "
                    "replace it, or choose another --out"
                )
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config = dict(config or {})
        if resume and (self.dir / "config.json").exists():
            saved = json.loads((self.dir / "config.json").read_text())
            changed = {k: (saved.get(k), v) for k, v in self.config.items()
                       if k in saved and saved[k] != v and k not in RESUMABLE_CHANGES}
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
        """Where the checkpoint lives."""
        return self.dir / "checkpoint.pt"

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
        """Drop metric lines past `after_step` (a resumed run re-logs them from its checkpoint)."""
        kept = [m for m in self.metrics() if m["step"] <= after_step]
        _atomic_write_bytes(self.dir / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in kept).encode())

    def save_results(self, results: dict[str, Any]) -> Path:
        """Write results.json atomically."""
        path = self.dir / "results.json"
        atomic_write_json(path, results)
        return path

    def save_checkpoint(self, state: dict[str, Any]) -> Path:
        """Write checkpoint.pt atomically (torch.save to a temporary file, then rename)."""
        tmp = self.checkpoint_path.with_name(f".checkpoint.pt.tmp{os.getpid()}")
        torch.save(state, tmp)
        os.replace(tmp, self.checkpoint_path)
        return self.checkpoint_path

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The saved checkpoint, or None if there is none."""
        if not self.checkpoint_path.exists():
            return None
        return torch.load(self.checkpoint_path, map_location="cpu", weights_only=False)

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
