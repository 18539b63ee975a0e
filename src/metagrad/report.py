"""Markdown pages made from run folders: each run's results.json table and its PNG plots.

`metagrad report runs/a runs/b --out docs/experiments.md` writes one section per run and copies
the plots to `docs/img/<run>-<plot>.png`, so the page shows only numbers that real runs produced.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of `rows` (columns: keys in order of first appearance)."""
    if not rows:
        return "(no rows)"
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path.parent} is not a finished run folder: it has no {what}")
    return json.loads(path.read_text())


def section(run_dir: Path, img_dir: Path, img_prefix: str) -> str:
    """The markdown section of one run; copies its plots into `img_dir`."""
    results = _read_json(run_dir / "results.json", "results.json")
    config = _read_json(run_dir / "config.json", "config.json")
    out = [f"## {results.get('experiment', run_dir.name)} (`{run_dir}`)", ""]
    summary = results.get("summary")
    if isinstance(summary, dict):  # an experiment's own summary numbers, not the registry's one-liner
        out += [markdown_table([summary]), ""]
    elif summary:
        out += [str(summary), ""]
    facts = []
    if results.get("command"):
        facts.append(f"Command `{results['command']}`")
    if results.get("seconds") is not None:
        facts.append(f"wall time {results['seconds']:.0f} s")
    if results.get("finished"):
        facts.append(f"finished {results['finished']}")
    out += ["; ".join(facts) + ".", ""]
    out += ["Config: " + ", ".join(f"`{k}={v}`" for k, v in config.items()), ""]
    if results.get("note"):
        out += [results["note"], ""]
    if "table" in results:
        out += [markdown_table(results["table"]), ""]
    if isinstance(results.get("claim"), dict):
        out += ["Claim: " + ", ".join(f"{k} = {_cell(v)}" for k, v in results["claim"].items()), ""]
    for png in sorted(run_dir.glob("*.png")):
        target = img_dir / f"{img_prefix}-{png.name}"
        shutil.copyfile(png, target)
        out += [f"![{png.stem}]({img_dir.name}/{target.name})", ""]
    return "\n".join(out)


def render(run_dirs: list[str | Path], out: str | Path) -> Path:
    """Write the markdown page `out` with one section per run folder; plots go to `<out dir>/img/`."""
    out = Path(out)
    img_dir = out.parent / "img"
    img_dir.mkdir(parents=True, exist_ok=True)
    dirs = [Path(d) for d in run_dirs]
    for d in dirs:
        if not d.is_dir():
            raise FileNotFoundError(f"run folder {d} does not exist")
    page = ["# Experiments", "",
            "Made by `metagrad report` from the run folders named in each section: every number and plot "
            "below comes from that run's results.json and PNG files.", ""]
    # Image names from the whole folder path: runs/a/k5 and runs/b/k5 must not overwrite each other's plots.
    page += [section(d, img_dir, "-".join(p for p in d.parts if p not in ("/", ".", ".."))) for d in dirs]
    out.write_text("\n".join(page))
    return out
