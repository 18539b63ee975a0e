"""MAML++ ablation on Omniglot 20-way 1-shot: each option of the full configuration flipped, the same budget.

The full configuration is `metagrad run omniglot-20w1s-maml++` (the MAML++ code's settings: learned per-layer
per-step inner rates, the multi-step loss, cosine-annealed outer rate, per-step batch-norm weights and biases,
second order throughout, the ensemble of the 5 best validation checkpoints; per-step running statistics
are an option there, off by default: in the MAML++ code they never change an output).
Each row changes one option and trains for the same wall-time budget (`--minutes`, the same iteration cap):

| row | change |
|---|---|
| full | none (and its ensemble row: no training of its own; the other rows validate alike, test no ensemble) |
| -LSLR | one fixed inner rate (`lslr=false`) |
| -MSL | the last step's query loss only (`multi_step_loss_iters=0`) |
| +DA | first order for the first third of the iterations (the paper's DA; its code: second order throughout) |
| -CA | constant outer rate |
| -BNWB | one batch-norm weight and bias for every step |
| BNRS at test | per-step running statistics kept, and normalising at meta-test (`bn_statistics=running`; on the loop) |

    python benchmarks/maml_pp_ablation.py --minutes 60 --out runs/ablation     # 7 runs of an hour each
    python benchmarks/maml_pp_ablation.py --smoke --out /tmp/ablation            # tiny: checks the driver

A budget holds far fewer iterations than the paper's 125,000 (an hour of 20-way MAML++ on 2 cores: under
a thousand), so every run is scheduled over the iterations that fit it (`--iterations`; 0: timed on a short
run of the full configuration): the cosine reaches its floor at the end of the budget, the multi-step loss
keeps its share of the schedule (10,000 of 125,000 iterations), +DA keeps its first third, and each run
validates 10 times (inside its budget) so that the ensemble has checkpoints to choose from. Scheduled over
125,000, an hour's run would see a constant rate, the multi-step loss throughout and +DA first order throughout.

Each run is a normal run folder under `--out`; the table (accuracy on 600 test episodes, 95% CI, difference to
the full configuration, iterations reached) is printed and written to `--out`/ablation.md and ablation.json.
A row whose folder already holds a finished run of the config it would be given (the ensemble aside) is read, not
trained again (`--rerun` trains it anyway), so the seven hours can be spent in parts, and two rows can train at once,
each on a core of its own, into the same `--out` (set `--iterations` so that every part has one schedule):

    OMP_NUM_THREADS=1 taskset -c 0 python benchmarks/maml_pp_ablation.py --iterations 400 --rows=full &
    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/maml_pp_ablation.py --iterations 400 --rows=-LSLR --no-full
    python benchmarks/maml_pp_ablation.py --iterations 400 --table     # the table of every finished row
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from metagrad.cli import main as metagrad_main
from metagrad.cli import parse_sets
from metagrad.experiments import get
from metagrad.experiments.omniglot import fitted_schedule
from metagrad.runs import normalise

EXPERIMENT = "omniglot-20w1s-maml++"


def rows(iterations: int) -> dict[str, dict]:
    """Row name -> the config keys it changes from the full configuration."""
    return {
        "full": {},
        "-LSLR": {"lslr": False},
        "-MSL": {"multi_step_loss_iters": 0},
        "+DA": {"order_anneal_iters": iterations // 3},
        "-CA": {"lr_schedule": "constant"},
        "-BNWB": {"per_step_bn": False, "running_stats": False},
        "BNRS at test": {"running_stats": True, "bn_statistics": "running", "path": "loop"},  # in-place statistics
    }


PROBE = 10  # iterations timed to fit the schedule to the budget
VALIDATIONS = 10  # per run, inside its budget (the paper's code: one per 500-iteration epoch, 250 in all)

# Keys that change what is evaluated after training, not the training: a row that differs only there is the same row.
AFTER_TRAINING = ("ensemble",)

SMOKE = {"iterations": 4, "meta_batch": 2, "hidden": 8, "inner_steps": 2, "eval_steps": 2, "val_every": 2,
         "val_tasks": 4, "eval_tasks": 6, "ensemble": 2, "multi_step_loss_iters": 2, "curve_steps": 2,
         "log_every": 2, "checkpoint_every": 2}


def row_folder(name: str, out: Path) -> Path:
    """Where row `name`'s run lives."""
    return out / name.replace(" ", "_").replace("+", "plus_").replace("-", "minus_")


def sets_of(changes: dict) -> list[str]:
    """The `--set` values of a config change, as `metagrad run` takes them."""
    return [f"{k}={json.dumps(v) if isinstance(v, bool) else v}" for k, v in changes.items()]


def finished(name: str, changes: dict, base: dict, out: Path) -> dict | None:
    """Row `name`'s results.json if its folder holds a finished run of exactly this config, else None."""
    folder = row_folder(name, out)
    if not (folder / "results.json").is_file() or not (folder / "config.json").is_file():
        return None
    # The config the row would run with, resolved as `metagrad run` resolves it (strings to each key's type).
    want = normalise(dataclasses.asdict(get(EXPERIMENT).make_config(parse_sets(sets_of({**base, **changes})))))
    have = json.loads((folder / "config.json").read_text())
    if any(want.get(k) != have.get(k) for k in set(want) | set(have) if k not in AFTER_TRAINING):
        return None
    return json.loads((folder / "results.json").read_text())


def run_row(name: str, changes: dict, base: dict, out: Path) -> dict:
    """One run of the experiment with `base` and `changes` set; its results.json."""
    folder = row_folder(name, out)
    argv = ["run", EXPERIMENT, "--out", str(folder), "--overwrite"]
    for kv in sets_of({**base, **changes}):
        argv += ["--set", kv]
    print(f"[{name}] metagrad {' '.join(argv)}", file=sys.stderr, flush=True)
    if metagrad_main(argv) != 0:
        raise SystemExit(f"row {name!r} failed")
    return json.loads((folder / "results.json").read_text())


def iterations_in(minutes: float, base: dict, out: Path) -> int:
    """How many iterations of the full configuration fit `minutes`, from a short timed run of it (its first,
    slower iterations included: the estimate errs short, and a schedule that ends early stays at its floor)."""
    probe = run_row("probe", {}, {**base, "iterations": PROBE, "budget_minutes": 0, "val_every": 0,
                                  "ensemble": 0, "eval_tasks": 10, "curve_steps": 1}, out)
    return max(PROBE, int(minutes * 60 / (probe["train_seconds"] / probe["iterations"])))


def table(results: dict[str, dict]) -> list[dict]:
    """One line per row (and the full run's ensemble), with the difference to the full configuration (None
    while the full configuration has not run)."""
    full = results["full"]["accuracy"] if "full" in results else None
    lines = []
    for name, r in results.items():
        lines.append({"row": name, "accuracy %": 100 * r["accuracy"], "ci95 %": 100 * r["ci95"],
                      "vs full (points)": None if full is None else 100 * (r["accuracy"] - full),
                      "iterations": r["iterations"], "train minutes": r["train_seconds"] / 60})
        if name == "full" and "ensemble" in r:
            e = r["ensemble"]
            lines.append({"row": f"full, ensemble of {len(e['iterations'])}", "accuracy %": 100 * e["mean"],
                          "ci95 %": 100 * e["ci95"], "vs full (points)": 100 * (e["mean"] - full),
                          "iterations": r["iterations"], "train minutes": r["train_seconds"] / 60})
    return lines


def markdown(lines: list[dict]) -> str:
    """The table in markdown."""
    out = ["| row | accuracy % (95% CI) | vs full (points) | iterations | train minutes |", "|---|---|---|---|---|"]
    out += [f"| {x['row']} | {x['accuracy %']:.2f} ± {x['ci95 %']:.2f} | "
            f"{'' if x['vs full (points)'] is None else format(x['vs full (points)'], '+.2f')} | "
            f"{x['iterations']} | {x['train minutes']:.1f} |" for x in lines]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    """Run every row with the same budget, print and write the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/maml-pp-ablation")
    p.add_argument("--minutes", type=float, default=60.0, help="meta-training budget of every run, in minutes")
    p.add_argument("--rows", help="only these rows, comma-separated, after '=' (--rows=-MSL,+DA; default: all; "
                                  "'full' is always run unless --no-full)")
    p.add_argument("--no-full", action="store_true", help="do not run the full configuration (another "
                   "invocation into the same --out runs it)")
    p.add_argument("--rerun", action="store_true", help="train a row even if --out holds a finished run of it "
                   "with the same config")
    p.add_argument("--table", action="store_true", help="train nothing: the table of the rows --out holds "
                   "finished with this config")
    p.add_argument("--data", help="folder holding omniglot/ (default: $METAGRAD_DATA)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--path", default="loop", help="execution path of every run but the BNRS row's, whose "
                                                  "in-place statistics need 'loop' ('auto', 'parallel', 'vmap')")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config change for every row, as `metagrad run --set` (e.g. curve_steps=5)")
    p.add_argument("--smoke", action="store_true", help="a few iterations on a tiny net: checks the driver only")
    p.add_argument("--iterations", type=int, default=0, help="the schedule's length in every run (the cosine, "
                   "the multi-step loss's share, +DA's third); 0: what fits --minutes, timed on a short run")
    args = p.parse_args(argv)
    cfg = get(EXPERIMENT).make_config()
    base = {**(SMOKE if args.smoke else {}), "budget_minutes": args.minutes, "device": args.device,
            "path": args.path}
    if args.data:
        base["data"] = args.data
    sets = parse_sets(args.set)
    base.update(sets)
    named = args.rows.split(",") if args.rows else list(rows(1))
    chosen = ([] if args.no_full else ["full"]) + [r for r in named if r != "full" or args.no_full]
    unknown = sorted(set(chosen) - set(rows(1)))
    if unknown:
        p.error(f"unknown rows {unknown}; known: {list(rows(1))}")
    if args.table and not (base.get("iterations") or args.iterations):
        p.error("--table needs the schedule's length: --iterations N")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    iterations = int(base.get("iterations") or args.iterations or iterations_in(args.minutes, base, out))
    base.update({**fitted_schedule(cfg, iterations, VALIDATIONS), **sets})  # what --set names stays as set
    print(f"every run is scheduled over {iterations} iterations", file=sys.stderr, flush=True)
    # The ensemble is tested on the full configuration only: on each other row it would add five evaluations
    # (about seven minutes of a 20-way run on one core, measured 2026-12-05) that the table does not show.
    grid = {name: {**changes, **({} if name == "full" else {"ensemble": 0})}
            for name, changes in rows(iterations).items()}
    results = {}
    for name in [] if args.table else chosen:
        done = None if args.rerun else finished(name, grid[name], base, out)
        if done is not None:
            print(f"[{name}] finished before in {row_folder(name, out)}: read, not trained again",
                  file=sys.stderr, flush=True)
        results[name] = done or run_row(name, grid[name], base, out)
    # And every row of this config that other invocations into the same --out have finished.
    found = {**{name: finished(name, grid[name], base, out) for name in grid if name not in results}, **results}
    results = {name: found[name] for name in grid if found[name] is not None}
    if not results:
        raise SystemExit(f"no finished row of this config in {out}")
    lines = table(results)
    text = (f"MAML++ ablation, {EXPERIMENT}, {args.minutes:g} minutes per run, scheduled over {iterations} "
            f"iterations (multi-step loss for the first {base['multi_step_loss_iters']})"
            + (" (SMOKE: tiny net, a few iterations; numbers meaningless)" if args.smoke else "") + "\n\n"
            + markdown(lines))
    print(text)
    (out / "ablation.md").write_text(text + "\n")
    (out / "ablation.json").write_text(json.dumps({"base": base, "rows": lines}, indent=1) + "\n")


if __name__ == "__main__":
    main()
