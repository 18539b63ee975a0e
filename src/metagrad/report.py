"""Markdown pages made from run folders: each run's results.json table and its PNG plots.

`metagrad report runs/a runs/b --out docs/experiments.md` writes one section per run and copies
the plots to `docs/img/<run>-<plot>.png`, so the page shows only numbers that real runs produced.

A report never overwrites what it did not make. A new page is written whole; on an existing report
page (one that starts with the report's own header) only the sections of the run folders given are
replaced, from their heading `## <experiment> (`<run folder>`)` to the next `## ` heading, and new ones
are appended; every other line is kept. Any other existing file is refused, and so is a plot that
would replace an image no replaced section showed.
"""

from __future__ import annotations

import filecmp
import json
import re
import shutil
from pathlib import Path
from typing import Any

HEADER = "# Experiments"
INTRO = ("Made by `metagrad report` from the run folders named in each section: every number and plot "
         "below comes from that run's results.json and PNG files.")


class ReportError(FileExistsError):
    """The report would overwrite a file it did not make."""


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
    # Column names are cells too: a `|` in one (`|start - population|`) would split the header row.
    lines = ["| " + " | ".join(_cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
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
        if not (target.exists() and filecmp.cmp(png, target, shallow=False)):
            shutil.copyfile(png, target)
        out += [f"![{png.stem}]({img_dir.name}/{target.name})", ""]
    return "\n".join(out)


def _sections(text: str) -> tuple[list[str], list[tuple[str | None, list[str]]]]:
    """The page's lines before its first `## ` heading, and its sections as (run folder or None, lines)."""
    head: list[str] = []
    sections: list[tuple[str | None, list[str]]] = []
    for line in text.split("\n"):
        if line.startswith("## "):
            m = re.search(r"\(`([^`]+)`\)\s*$", line)
            sections.append((m.group(1) if m else None, [line]))
        elif sections:
            sections[-1][1].append(line)
        else:
            head.append(line)
    return head, sections


def _images(lines: list[str]) -> set[str]:
    return set(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", "\n".join(lines)))


def render(run_dirs: list[str | Path], out: str | Path) -> Path:
    """Write the markdown page `out` with one section per run folder; plots go to `<out dir>/img/`.

    An existing report page keeps every line outside the sections of these run folders; an existing file
    that is not a report page, or an image the report did not make, raises ReportError.
    """
    out = Path(out)
    img_dir = out.parent / "img"
    dirs = [Path(d) for d in run_dirs]
    for d in dirs:
        if not d.is_dir():
            raise FileNotFoundError(f"run folder {d} does not exist")
    head, old = [HEADER, "", INTRO, ""], []
    if out.exists():
        text = out.read_text()
        if not text.startswith(HEADER + "\n") or "Made by `metagrad report`" not in text.split("\n## ")[0]:
            raise ReportError(f"{out} exists and was not made by metagrad report; refusing to overwrite it: "
                              "choose another --out")
        head, old = _sections(text)
    replaced = {str(d) for d in dirs}
    # Images that the sections being replaced showed: the report made those, so it may replace them.
    own = {str(out.parent / p) for key, lines in old if key in replaced for p in _images(lines)}
    # Image names from the whole folder path: runs/a/k5 and runs/b/k5 must not overwrite each other's plots.
    prefixes = {d: "-".join(p for p in d.parts if p not in ("/", ".", "..")) for d in dirs}
    for d in dirs:
        for png in sorted(d.glob("*.png")):
            target = img_dir / f"{prefixes[d]}-{png.name}"
            if target.exists() and str(target) not in own and not filecmp.cmp(png, target, shallow=False):
                raise ReportError(f"{target} exists and no section of {d} in {out} shows it; refusing to "
                                  "overwrite it: move it away or choose another --out")
    img_dir.mkdir(parents=True, exist_ok=True)
    new = {str(d): section(d, img_dir, prefixes[d]).split("\n") for d in dirs}
    page, done = list(head), set()
    for key, lines in old:
        if key in new and key not in done:
            page += new[key] + ([""] if new[key][-1] != "" else [])
            done.add(key)
        elif key not in new:
            page += lines
    for d in dirs:
        if str(d) not in done:
            page += new[str(d)] + [""]
    _write(out, "\n".join(page).rstrip("\n") + "\n")
    return out


def _write(path: Path, text: str) -> None:
    from metagrad.runs import atomic_write_text

    atomic_write_text(path, text)
