"""Omniglot N-way K-shot classification (Lake et al. 2015) with the protocol of the MAML paper.

Data: the official release, `images_background.zip` (30 alphabets, 964 characters) and
`images_evaluation.zip` (20 alphabets, 659 characters), each character drawn by 20 people as a
105x105 binary PNG. The zips are read directly (zipfile + PIL), verified by checksum (the official
md5, or the sha256 of the repacked copy in ../shared/data/omniglot), decoded once to 28x28 uint8
(strokes bright, background 0, Lanczos antialiasing from greyscale) and cached as one tensor file
keyed by the zip's sha256, so later runs load 25 MB in well under a second.

Where the data is: the `root` argument, else `$METAGRAD_DATA`, else `~/.cache/metagrad/data`;
either the folder that holds `omniglot/` or the `omniglot` folder itself. `download(dest)` fetches
the zips from the canonical address (github.com/brendenlake/omniglot, `python/`); nothing is ever
read or downloaded at import time.

Protocol (Finn et al. 2017, after Santoro et al. 2016 and Vinyals et al. 2016):
- `protocol="maml"`: the 1,623 characters (in order of their global id 1..1623) are permuted
  with `torch.Generator().manual_seed(split_seed)` (split_seed=1); the first 1,200 are the paper's
  meta-training characters, the other 423 the meta-test ones (`split="test"`). As in the MAML
  reference code (cbfinn/maml, data_generator.py), the last `val_characters` (100) of the 1,200 are
  held out for validation (`split="val"`) and `split="train"` is the other 1,100;
  `val_characters=0` trains on all 1,200.
- `protocol="lake"`: background alphabets for training (964), evaluation alphabets for test (659);
  `split="val"` is the last `val_characters` background characters (in id order), taken out of train.
- `rotations=True`: each character in each of the 4 rotations by multiples of 90 degrees is its own
  class (4 x 1,200 training classes), in both splits, as in the papers.
- An episode draws `ways` distinct classes and, per class, `shots` + `query_shots` distinct
  drawings; the class order is random, so labels 0..ways-1 are shuffled per task.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import sys
import urllib.request
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from metagrad.core import TaskBatch
from metagrad.tasks.base import check_positive, family

URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/"
HOMEPAGE = "https://github.com/brendenlake/omniglot"
SETS = ("images_background", "images_evaluation")
OFFICIAL_MD5 = {
    "images_background": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation": "6b91aef0f799c5bb55b94e3f2daec811",
}
OFFICIAL_BYTES = {"images_background": 9464212, "images_evaluation": 6462886}
# The repacked zips of ../shared/data/omniglot: the official PNGs, byte for byte, in a new container.
REPACKED_SHA256 = {
    "images_background": "512b4a2b61ff1c7d09db743d05d12aedc2a5f38192fa40d63fd91f0fc1504c88",
    "images_evaluation": "98893e98e6c7ac15783039de81205741dffe6bb4ac1e1f0c5568f6889e7e523c",
}
REPACKED_BYTES = {"images_background": 8588032, "images_evaluation": 5863926}
CHARACTERS = {"images_background": 964, "images_evaluation": 659}
DRAWERS = 20
SIZE = 28
MAML_TRAIN_CHARACTERS = 1200
CACHE_VERSION = 1
_PNG = re.compile(r"^(images_background|images_evaluation)/([^/]+)/(character\d+)/(\d{4})_(\d{2})\.png$")


class DataError(ValueError):
    """A data file exists but is not what it should be (checksum, size, content)."""


# -- where the files are ---------------------------------------------------------------------------
def default_data_root() -> Path:
    """`~/.cache/metagrad/data` (or under `$XDG_CACHE_HOME`): where `download()` puts data by default."""
    return _cache_home() / "data"


def _cache_home() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "metagrad"


def _given_root(root: str | Path | None) -> tuple[Path, str]:
    """The root to use and where it came from (for error messages)."""
    if root is not None and str(root) != "":
        return Path(root).expanduser(), f"root={str(root)!r}"
    env = os.environ.get("METAGRAD_DATA")
    if env:
        return Path(env).expanduser(), f"METAGRAD_DATA={env!r}"
    return default_data_root(), "the default location (no root argument, METAGRAD_DATA unset)"


def omniglot_dir(root: str | Path | None = None) -> Path:
    """The folder holding the Omniglot zips: `root/omniglot` if it exists, else `root` itself if it holds them."""
    base, source = _given_root(root)
    candidates = [base / "omniglot", base]
    for folder in candidates:
        if folder.is_dir() and any((folder / f"{s}.zip").exists() for s in SETS):
            return folder
    raise FileNotFoundError(
        f"Omniglot data not found for {source}: looked for {SETS[0]}.zip and {SETS[1]}.zip in "
        f"{candidates[0]} (a folder holding omniglot/) and in {candidates[1]} (the omniglot folder itself). "
        f"Fetch them with `metagrad download omniglot --dest {base}` or "
        f"`metagrad.tasks.omniglot.download({str(base)!r})`, or download both zips from {HOMEPAGE} (python/ "
        "folder) into that folder; or point root= / METAGRAD_DATA at the folder that holds them."
    )


# -- checksums ---------------------------------------------------------------------------------------
_VERIFIED: dict[tuple[str, int, int], str] = {}


def verify(path: str | Path, name: str | None = None) -> str:
    """Check one zip against the official md5 or the repacked sha256; returns its sha256 (the cache key).

    `name` is the set ("images_background" | "images_evaluation"); by default taken from the file name.
    """
    path = Path(path)
    name = path.name.removesuffix(".zip") if name is None else name
    if name not in SETS:
        raise ValueError(f"path must name one of {[s + '.zip' for s in SETS]} (or pass name=), got {path.name!r}")
    if not path.is_file():
        raise FileNotFoundError(
            f"missing {path}: Omniglot needs both {SETS[0]}.zip and {SETS[1]}.zip in {path.parent}. "
            f"Fetch them with `metagrad download omniglot --dest {path.parent}` or from {HOMEPAGE} (python/ folder)."
        )
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _VERIFIED:
        return _VERIFIED[key]
    md5, sha = hashlib.md5(), hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            md5.update(block)
            sha.update(block)
    if md5.hexdigest() != OFFICIAL_MD5[name] and sha.hexdigest() != REPACKED_SHA256[name]:
        known = {OFFICIAL_BYTES[name], REPACKED_BYTES[name]}
        if stat.st_size not in known and stat.st_size < max(known):
            why = (f"it has {stat.st_size} bytes, where the official file has {OFFICIAL_BYTES[name]} (the repacked "
                   f"copy {REPACKED_BYTES[name]}): probably an incomplete download")
        else:
            why = f"its md5 {md5.hexdigest()} and sha256 {sha.hexdigest()[:16]}... match neither known release"
        raise DataError(
            f"{path} is corrupt or not the Omniglot release: {why}. Delete it and download it again "
            f"(`metagrad download omniglot --dest {path.parent}`, or {URL}{path.name}); expected md5 "
            f"{OFFICIAL_MD5[name]} (official) or sha256 {REPACKED_SHA256[name]} (repacked copy)."
        )
    _VERIFIED[key] = sha.hexdigest()
    return sha.hexdigest()


# -- download ----------------------------------------------------------------------------------------
def download(dest: str | Path | None = None, base_url: str = URL) -> Path:
    """Fetch both zips into `dest/omniglot` (or `dest` if it is named omniglot), verified; returns that folder."""
    from tqdm import tqdm

    base = Path(dest).expanduser() if dest is not None else _given_root(None)[0]
    folder = base if base.name == "omniglot" else base / "omniglot"
    folder.mkdir(parents=True, exist_ok=True)
    for name in SETS:
        target = folder / f"{name}.zip"
        if target.exists():
            try:
                verify(target)
                print(f"{target} is already there and verified", file=sys.stderr)
                continue
            except DataError as err:
                print(f"re-downloading: {err}", file=sys.stderr)
        url = f"{base_url.rstrip('/')}/{name}.zip"
        tmp = target.with_name(f".{target.name}.part{os.getpid()}")
        try:
            with urllib.request.urlopen(url) as response, open(tmp, "wb") as fh:
                total = int(response.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=target.name) as bar:
                    for block in iter(lambda: response.read(1 << 16), b""):
                        fh.write(block)
                        bar.update(len(block))
            verify(tmp, name)  # only a verified file gets the real name
            os.replace(tmp, target)
        except OSError as err:
            raise OSError(f"downloading {url} failed ({err}); check the connection or fetch it by hand from "
                          f"{HOMEPAGE} into {folder}") from err
        finally:
            tmp.unlink(missing_ok=True)
    return folder


# -- decoding and cache --------------------------------------------------------------------------------
def decode(path: str | Path) -> dict:
    """Read every PNG of one zip: images uint8 `[characters, 20, 28, 28]`, alphabet and character names."""
    path = Path(path)
    from PIL import Image

    name = path.name.removesuffix(".zip")
    if name not in SETS:
        raise ValueError(f"path must name one of {[s + '.zip' for s in SETS]}, got {path.name!r}")
    try:
        with zipfile.ZipFile(path) as z:
            entries = [(m, e) for e in z.namelist() if (m := _PNG.match(e))]
            # The layout is checked before any PNG is decoded, so a wrong file fails in a moment.
            drawers: dict[int, set[int]] = {}
            for m, _ in entries:
                drawers.setdefault(int(m.group(4)), set()).add(int(m.group(5)))
            incomplete = [c for c, d in drawers.items() if d != set(range(1, DRAWERS + 1))]
            if len(drawers) != CHARACTERS[name] or incomplete or len(entries) != CHARACTERS[name] * DRAWERS:
                raise DataError(f"{path} holds {len(drawers)} characters (expected {CHARACTERS[name]} with "
                                f"{DRAWERS} drawings each; incomplete: {incomplete[:5]}); delete it and download "
                                "it again")
            ids = sorted(drawers)
            row = {c: i for i, c in enumerate(ids)}
            images = torch.zeros(len(ids), DRAWERS, SIZE, SIZE, dtype=torch.uint8)
            alphabets, characters = [""] * len(ids), [""] * len(ids)
            for m, entry in entries:
                c = row[int(m.group(4))]
                alphabets[c], characters[c] = m.group(2), m.group(3)
                with Image.open(io.BytesIO(z.read(entry))) as im:
                    small = im.convert("L").resize((SIZE, SIZE), Image.LANCZOS)
                # Strokes are black on white in the PNGs; store them bright on 0, as the MAML code did.
                pixels = torch.frombuffer(bytearray(small.tobytes()), dtype=torch.uint8).view(SIZE, SIZE)
                images[c, int(m.group(5)) - 1] = 255 - pixels
    except (zipfile.BadZipFile, OSError) as err:
        raise DataError(f"{path} could not be read as the Omniglot zip ({err}); delete it and download it again "
                        f"(`metagrad download omniglot --dest {path.parent}`)") from err
    return {"images": images, "ids": torch.tensor(ids), "alphabets": alphabets, "characters": characters}


def cache_file(path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Where the decoded tensors of one (verified) zip are cached: keyed by its sha256."""
    path = Path(path)
    folder = Path(cache_dir).expanduser() if cache_dir is not None else _cache_home() / "omniglot"
    return folder / f"{path.name.removesuffix('.zip')}-{verify(path)[:16]}-{SIZE}px-v{CACHE_VERSION}.pt"


_LOADED: dict[str, dict] = {}


def load_set(path: str | Path, cache_dir: str | Path | None = None) -> dict:
    """The decoded set of one zip, from the cache when it is there (decoding and caching it otherwise)."""
    target = cache_file(path, cache_dir)
    if str(target) in _LOADED:
        return _LOADED[str(target)]
    data = None
    if target.exists():
        try:
            data = torch.load(target, map_location="cpu", weights_only=True)
        except Exception as err:  # a truncated or foreign cache file is rebuilt, never trusted
            warnings.warn(f"ignoring unreadable Omniglot cache {target} ({err}); decoding the zip again", stacklevel=2)
    if data is None:
        data = decode(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
        torch.save(data, tmp)
        os.replace(tmp, target)
    _LOADED[str(target)] = data
    return data


def load(root: str | Path | None = None, cache_dir: str | Path | None = None) -> dict:
    """Both sets joined in order of global character id: images uint8 `[1623, 20, 28, 28]`, `background`
    (bool `[1623]`), alphabet and character names."""
    folder = omniglot_dir(root)
    for s in SETS:  # both files checked before the slow part, so a missing one is reported at once
        verify(folder / f"{s}.zip")
    sets = [load_set(folder / f"{s}.zip", cache_dir) for s in SETS]
    return {
        "images": torch.cat([d["images"] for d in sets]),
        "background": torch.cat([torch.full((len(d["ids"]),), s == SETS[0]) for s, d in zip(SETS, sets)]),
        "alphabets": [a for d in sets for a in d["alphabets"]],
        "characters": [c for d in sets for c in d["characters"]],
    }


def split_characters(protocol: str, split: str, background: Tensor, split_seed: int = 1,
                     val_characters: int = 100) -> Tensor:
    """Indices (sorted) of the characters of `split` ("train" | "val" | "test") under `protocol` ("maml" | "lake")."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    if protocol == "maml":
        perm = torch.randperm(len(background), generator=torch.Generator().manual_seed(split_seed))
        meta_train, test = perm[:MAML_TRAIN_CHARACTERS], perm[MAML_TRAIN_CHARACTERS:]
    elif protocol == "lake":
        meta_train, test = torch.nonzero(background).flatten(), torch.nonzero(~background).flatten()
    else:
        raise ValueError(f"protocol must be 'maml' (1,200 random characters train / 423 test) or 'lake' "
                         f"(background / evaluation alphabets), got {protocol!r}")
    if not 0 <= val_characters < len(meta_train):
        raise ValueError(f"val_characters must be in [0, {len(meta_train)}) for protocol {protocol!r}, "
                         f"got {val_characters!r}")
    if split == "val" and val_characters == 0:
        raise ValueError("split='val' needs val_characters > 0 (0 puts every meta-training character in 'train')")
    cut = len(meta_train) - val_characters
    chosen = {"train": meta_train[:cut], "val": meta_train[cut:], "test": test}[split]
    return chosen.sort().values


# -- the task family -----------------------------------------------------------------------------------
@family("omniglot")
@dataclass
class Omniglot:
    """N-way K-shot Omniglot episodes: support `[tasks, ways*shots, 1, 28, 28]`, labels int64 in [0, ways)."""

    ways: int = 5
    shots: int = 1
    query_shots: int = 1
    split: str = "train"
    protocol: str = "maml"
    rotations: bool = True
    root: str | None = None
    cache_dir: str | None = None
    device: str = "cpu"
    split_seed: int = 1
    val_characters: int = 100

    def __post_init__(self) -> None:
        check_positive(ways=self.ways, shots=self.shots, query_shots=self.query_shots)
        if self.shots + self.query_shots > DRAWERS:
            raise ValueError(f"shots + query_shots must be at most {DRAWERS} (drawings per character), got "
                             f"{self.shots} + {self.query_shots}")
        data = load(self.root, self.cache_dir)
        self.characters = split_characters(self.protocol, self.split, data["background"], self.split_seed,
                                           self.val_characters)
        # The split's drawings stay in memory as uint8 on the device: an episode is an indexing operation.
        self.images = data["images"][self.characters].to(self.device)  # [characters, 20, 28, 28]
        self.n_classes = len(self.characters) * (4 if self.rotations else 1)
        if self.ways > self.n_classes:
            raise ValueError(f"ways={self.ways} exceeds the {self.n_classes} classes of split {self.split!r}")

    def sample(self, n_tasks: int, generator: torch.Generator | None = None) -> TaskBatch:
        """`n_tasks` episodes; indices come from the (CPU) generator, so every device gives the same tasks."""
        check_positive(n_tasks=n_tasks)
        k = self.shots + self.query_shots
        # A random permutation per task: its first `ways` entries are the classes, in shuffled label order.
        classes = torch.rand(n_tasks, self.n_classes, generator=generator).argsort(dim=1)[:, :self.ways]
        drawings = torch.rand(n_tasks, self.ways, DRAWERS, generator=generator).argsort(dim=2)[..., :k]
        char, rot = (classes // 4, classes % 4) if self.rotations else (classes, torch.zeros_like(classes))
        dev = self.images.device
        x = self.images[char[..., None].to(dev), drawings.to(dev)]  # [tasks, ways, k, 28, 28]
        rot = rot.to(dev)
        for r in (1, 2, 3):
            x[rot == r] = torch.rot90(x[rot == r], r, dims=(-2, -1))
        x = (x.float() / 255.0).unsqueeze(3)  # [tasks, ways, k, 1, 28, 28]
        y = torch.arange(self.ways, device=dev).view(1, self.ways, 1).expand(n_tasks, self.ways, k)

        def flat(t: Tensor) -> Tensor:
            return t.reshape(n_tasks, -1, *t.shape[3:])

        return TaskBatch(flat(x[:, :, :self.shots]), flat(y[:, :, :self.shots]),
                         flat(x[:, :, self.shots:]), flat(y[:, :, self.shots:]))
