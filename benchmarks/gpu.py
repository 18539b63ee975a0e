"""The GPU run: the speed table (vmap vs loop vs the peers) and Omniglot 5-way 1-shot at the MAML paper's
60,000 iterations, on one CUDA device, each table written to `--out`.

    PYTHONPATH=src python benchmarks/gpu.py --out runs/gpu --data DIR   # CUDA torch 2.13; DIR holds omniglot/
    PYTHONPATH=src python benchmarks/gpu.py --dry-run --out /tmp/gpu-dry --data DIR   # on CPU, tiny: checks it

1. `speed.py --device cuda`: one meta-iteration (meta-batch 32, 1 inner step, order 2 and 1) of the Omniglot
   Conv4 (max-pool and stride-2) and the sinusoid MLP: metagrad `loop`, `vmap` and `auto` against the peers
   that import here (learn2learn, higher, TorchOpt; a plain torch.func loop always), with the forward+backward
   floor of the same images; gradients checked in float64 first. -> speed.txt, speed.json
2. `metagrad run omniglot-5w1s` on cuda: the paper's settings (stride-2 Conv4, meta-batch 32, inner_lr 0.4,
   1 inner step, 3 at meta-test, Adam 1e-3, 60,000 iterations), the vmap path (all 32 tasks in one set of
   kernels; on CUDA `auto` picks it too), task images kept on the device, validation every 5,000 iterations,
   600 test episodes. The 10-minute budget (`--minutes`) needs about 10 ms per iteration: plausible for vmap
   on a recent GPU, not measured yet; a slower device stops cleanly at the budget and the table says how many
   iterations it reached. -> omniglot-5w1s/ (run folder: results.json, metrics.jsonl, plots), omniglot-5w1s.txt
A summary (device, torch, commands, wall times) goes to README.md in `--out`.

Without CUDA the script stops at once with exit status 2 and says so; `--dry-run` runs both steps on CPU with
tiny settings (numbers meaningless) to check everything around the GPU work.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from pathlib import Path

import speed
import torch

from metagrad.cli import main as metagrad_main


class Tee(io.TextIOBase):
    """Writes to the console and to a file."""

    def __init__(self, *streams) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for s in self.streams:
            s.write(text)
            s.flush()
        return len(text)


def peers_here() -> list[str]:
    """The peers that import in this environment (the plain torch.func loop always does)."""
    found = []
    for peer in speed.PEERS:
        try:
            speed.PEER_STEPS[peer](torch.nn.Linear(1, 1), torch.nn.functional.mse_loss, 0.1, 1, 2)
            found.append(peer)
        except Exception as err:  # ImportError, or a peer that does not build beside this torch
            print(f"peer {peer} skipped: {type(err).__name__}: {err}", file=sys.stderr)
    return found


def speed_args(out: Path, dry: bool) -> list[str]:
    """speed.py's flags for this run."""
    if dry:
        return ["--device", "cpu", "--model", "sinusoid", "--order", "1", "--quick", "--peers", "torchfunc-loop",
                "--paths", "loop", "--json", str(out / "speed.json")]
    return ["--device", "cuda", "--model", "all", "--order", "2", "1", "--meta-batch", "32", "--repeats", "5",
            "--peers", *peers_here(), "--paths", "auto", "loop", "vmap", "--json", str(out / "speed.json")]


def omniglot_args(out: Path, data: str | None, minutes: float, dry: bool) -> list[str]:
    """`metagrad run omniglot-5w1s` flags: the paper's 60,000 iterations on cuda (tiny on CPU for a dry run)."""
    sets = {"iterations": 60000, "path": "vmap", "budget_minutes": minutes, "val_every": 5000, "val_tasks": 200,
            "checkpoint_every": 5000, "log_every": 500, "eval_tasks": 600}
    if dry:
        sets = {"iterations": 6, "meta_batch": 2, "hidden": 8, "path": "loop", "budget_minutes": 1.0,
                "val_every": 3, "val_tasks": 4, "checkpoint_every": 3, "log_every": 3, "eval_tasks": 6}
    if data:
        sets["data"] = data
    argv = ["run", "omniglot-5w1s", "--device", "cpu" if dry else "cuda", "--out", str(out / "omniglot-5w1s"),
            "--overwrite"]
    for k, v in sets.items():
        argv += ["--set", f"{k}={v}"]
    return argv


def main(argv: list[str] | None = None) -> int:
    """Run the speed table and the Omniglot protocol; write their tables to --out. Returns the exit status."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/gpu", help="folder for the tables (created)")
    p.add_argument("--data", help="folder holding omniglot/ (default: $METAGRAD_DATA)")
    p.add_argument("--minutes", type=float, default=10.0, help="budget of Omniglot meta-training, in minutes")
    p.add_argument("--skip", nargs="*", choices=("speed", "omniglot"), default=[], help="steps to leave out")
    p.add_argument("--dry-run", action="store_true", help="both steps on CPU with tiny settings (no CUDA needed)")
    args = p.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print(f"benchmarks/gpu.py needs a CUDA device: torch.cuda.is_available() is False here (torch "
              f"{torch.__version__}, CUDA build: {torch.version.cuda}). Run it on a GPU machine with a CUDA build "
              "of torch, or pass --dry-run to check the script on CPU.", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = "cpu (dry run: numbers meaningless)" if args.dry_run else torch.cuda.get_device_name(0)
    summary = {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda, "steps": []}
    steps = []
    if "speed" not in args.skip:
        steps.append(("speed", "speed.txt", lambda: speed.main(speed_args(out, args.dry_run)),
                      "benchmarks/speed.py " + " ".join(speed_args(out, args.dry_run))))
    if "omniglot" not in args.skip:
        run_argv = omniglot_args(out, args.data, args.minutes, args.dry_run)
        steps.append(("omniglot-5w1s", "omniglot-5w1s.txt", lambda: metagrad_main(run_argv),
                      "metagrad " + " ".join(run_argv)))
    status = 0
    for name, table, fn, command in steps:
        t0 = time.time()
        with open(out / table, "w") as fh, contextlib.redirect_stdout(Tee(sys.stdout, fh)):
            print(f"$ {command}")
            rc = fn()
        status = status or (rc or 0)
        summary["steps"].append({"step": name, "command": command, "seconds": round(time.time() - t0, 1),
                                 "exit": rc or 0, "table": table})
    lines = [f"# GPU run, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
             f"device: {device}; torch {torch.__version__} (CUDA {torch.version.cuda})", ""]
    lines += [f"- {s['step']}: `{s['command']}` ({s['seconds']} s, exit {s['exit']}): see {s['table']}"
              for s in summary["steps"]]
    (out / "README.md").write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"tables in {out}/")
    return status


if __name__ == "__main__":
    sys.exit(main())
