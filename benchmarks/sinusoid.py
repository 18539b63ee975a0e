"""Sinusoid regression at the paper's length, ours beside the published numbers.

    python benchmarks/sinusoid.py                      # K=5, 70,000 iterations: MAML, pretrained, Meta-SGD
    python benchmarks/sinusoid.py --shots 5 10 20      # the Meta-SGD paper's three K
    python benchmarks/sinusoid.py --table-only         # print the table of runs already in --out

Each K is the experiment `sinusoid-paper` in its own run folder (`<out>/k<K>`); a folder that already
holds results is read, not re-run, and an interrupted one is resumed. Run with one thread per process
(`OMP_NUM_THREADS=1`): the 1-40-40-1 MLP is too small for more.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from metagrad.cli import main as metagrad
from metagrad.report import markdown_table
from metagrad.runs import has_checkpoints


def run_k(shots: int, out: Path, iterations: int, algorithms: str) -> dict:
    """Results of sinusoid-paper at K=`shots` in `out`, running (or resuming) it if needed."""
    if not (out / "results.json").exists():
        args = ["run", "sinusoid-paper", "--out", str(out), "--set", f"shots={shots}",
                "--set", f"iterations={iterations}", "--set", f"algorithms={algorithms}"]
        if has_checkpoints(out):  # interrupted: continue it (a folder without a checkpoint starts afresh)
            args += ["--resume"]
        elif out.exists():
            args += ["--overwrite"]
        code = metagrad(args)
        if code != 0:
            sys.exit(code)
    return json.loads((out / "results.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shots", type=int, nargs="+", default=[5])
    p.add_argument("--iterations", type=int, default=70000)
    p.add_argument("--algorithms", default="maml,pretrain,metasgd")
    p.add_argument("--out", default="runs/bench-sinusoid")
    p.add_argument("--table-only", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = []
    for k in args.shots:
        folder = Path(args.out) / f"k{k}"
        if args.table_only and not (folder / "results.json").exists():
            continue
        results = run_k(k, folder, args.iterations, args.algorithms)
        rows += results["table"]
        print(f"K={k}: {results['note']}", file=sys.stderr)
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
