"""Omniglot on the real files: loader, checksums, cache, splits, rotations, episodes, a short training run."""

import io
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import OMNIGLOT
from PIL import Image

from metagrad.runs import read_checkpoint
from metagrad.tasks import omniglot as om
from metagrad.tasks.omniglot import DataError, Omniglot

pytestmark = pytest.mark.data
if not (OMNIGLOT / "images_background.zip").is_file() or not (OMNIGLOT / "images_evaluation.zip").is_file():
    pytest.skip(f"Omniglot data not found in {OMNIGLOT} (set METAGRAD_DATA to the folder holding omniglot/)",
                allow_module_level=True)

ROOT = str(OMNIGLOT)


@pytest.fixture(scope="module")
def data():
    return om.load(ROOT)


@pytest.fixture(scope="module")
def lookup(data):
    """Every drawing in each of its 4 rotations under an exact integer key: (sorted keys, (character, rotation))."""
    imgs = data["images"].long()  # [1623, 20, 28, 28]
    weights = torch.randint(1, 2**20, (28 * 28,), generator=torch.Generator().manual_seed(0))
    keys = torch.stack([torch.rot90(imgs, r, dims=(-2, -1)).reshape(1623, 20, -1) @ weights for r in range(4)])
    chars = torch.arange(1623).view(1, -1, 1).expand(4, -1, 20)
    rots = torch.arange(4).view(-1, 1, 1).expand(-1, 1623, 20)
    keys, order = keys.flatten().sort()
    return weights, keys, chars.flatten()[order], rots.flatten()[order]


def classes_of(x, lookup):
    """For images `[n, 1, 28, 28]` in [0, 1]: the set of (character, rotation) each one can be."""
    weights, keys, chars, rots = lookup
    q = x.mul(255).round().long().reshape(len(x), -1) @ weights
    lo, hi = torch.searchsorted(keys, q), torch.searchsorted(keys, q, right=True)
    return [set(zip(chars[a:b].tolist(), rots[a:b].tolist())) for a, b in zip(lo.tolist(), hi.tolist())]


# -- the files -----------------------------------------------------------------------------------------
def test_loader_reads_every_character_and_drawing(data):
    assert data["images"].shape == (1623, 20, 28, 28) and data["images"].dtype == torch.uint8
    assert int(data["background"].sum()) == 964 and int((~data["background"]).sum()) == 659
    alphabets = [a for a, b in zip(data["alphabets"], data["background"].tolist()) if b]
    assert len(set(alphabets)) == 30 and alphabets.count("Tifinagh") == 55
    evaluation = [a for a, b in zip(data["alphabets"], data["background"].tolist()) if not b]
    assert len(set(evaluation)) == 20 and evaluation.count("Angelic") == 20
    # Character 965 (first of the evaluation set), drawer 3, decoded independently of the loader.
    with zipfile.ZipFile(OMNIGLOT / "images_evaluation.zip") as z:
        raw = Image.open(io.BytesIO(z.read("images_evaluation/Angelic/character01/0965_03.png")))
        assert raw.size == (105, 105)
        ref = 255 - torch.from_numpy(np.array(raw.convert("L").resize((28, 28), Image.LANCZOS)))
    assert torch.equal(data["images"][964, 2], ref)
    # Strokes bright on a dark background: most pixels are 0.
    assert 0.6 < float((data["images"] == 0).float().mean()) < 0.95


def test_both_forms_of_the_data_path_and_the_environment_variable(monkeypatch):
    assert om.omniglot_dir(OMNIGLOT.parent) == OMNIGLOT
    assert om.omniglot_dir(OMNIGLOT) == OMNIGLOT
    monkeypatch.setenv("METAGRAD_DATA", str(OMNIGLOT.parent))
    assert om.omniglot_dir() == OMNIGLOT
    monkeypatch.setenv("METAGRAD_DATA", str(OMNIGLOT))
    assert om.omniglot_dir() == OMNIGLOT


def test_missing_folder_and_missing_file_say_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"root=.*omniglot/.*the omniglot folder itself.*download omniglot"):
        Omniglot(root=str(tmp_path))
    monkeypatch.setenv("METAGRAD_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="METAGRAD_DATA="):
        Omniglot()
    (tmp_path / "omniglot").mkdir()
    shutil.copy(OMNIGLOT / "images_background.zip", tmp_path / "omniglot")
    with pytest.raises(FileNotFoundError, match=r"missing .*images_evaluation\.zip.*download omniglot"):
        Omniglot(root=str(tmp_path))


def test_partial_and_corrupt_files_are_clear_errors(tmp_path):
    src = (OMNIGLOT / "images_evaluation.zip").read_bytes()
    shutil.copy(OMNIGLOT / "images_background.zip", tmp_path)
    (tmp_path / "images_evaluation.zip").write_bytes(src[: len(src) // 2])
    with pytest.raises(DataError, match=r"incomplete download.*Delete it and download it again"):
        Omniglot(root=str(tmp_path))
    flipped = bytearray(src)
    flipped[len(src) // 2] ^= 0xFF  # same size, one byte changed
    (tmp_path / "images_evaluation.zip").write_bytes(bytes(flipped))
    with pytest.raises(DataError, match=r"corrupt.*match neither known release"):
        Omniglot(root=str(tmp_path))


def test_decode_rejects_a_zip_with_missing_drawings(tmp_path):
    bad = tmp_path / "images_evaluation.zip"
    with zipfile.ZipFile(OMNIGLOT / "images_evaluation.zip") as z, zipfile.ZipFile(bad, "w") as out:
        for name in z.namelist():
            if not name.endswith("0970_20.png"):  # one drawing of one character missing
                out.writestr(name, b"")  # the layout is checked before any PNG is read
    with pytest.raises(DataError, match=r"659 characters \(expected 659 with 20 drawings each; incomplete: \[970\]"):
        om.decode(bad)
    shutil.copy(OMNIGLOT / "LICENSE", bad)
    with pytest.raises(DataError, match="could not be read as the Omniglot zip"):
        om.decode(bad)


def test_cache_is_keyed_by_checksum_reused_and_rebuilt_when_broken(tmp_path, monkeypatch):
    zip_path = OMNIGLOT / "images_evaluation.zip"
    calls = []
    real_decode = om.decode
    monkeypatch.setattr(om, "decode", lambda p: calls.append(p) or real_decode(p))
    first = om.load_set(zip_path, tmp_path)
    target = om.cache_file(zip_path, tmp_path)
    assert len(calls) == 1 and target.is_file() and om.verify(zip_path)[:16] in target.name
    om._LOADED.clear()
    again = om.load_set(zip_path, tmp_path)
    assert len(calls) == 1 and torch.equal(first["images"], again["images"])  # from the file, not decoded
    om._LOADED.clear()
    target.write_bytes(target.read_bytes()[:1000])  # a truncated cache file
    monkeypatch.setattr(om, "decode", lambda p: calls.append(p) or first)  # decoding itself was checked above
    with pytest.warns(UserWarning, match="unreadable Omniglot cache"):
        om.load_set(zip_path, tmp_path)
    om._LOADED.clear()
    assert len(calls) == 2 and torch.equal(om.load_set(zip_path, tmp_path)["images"], first["images"])


def test_download_verifies_and_skips_files_already_there(tmp_path, capsys):
    folder = om.download(tmp_path, base_url=OMNIGLOT.as_uri())  # a local mirror: same code path as https
    assert folder == tmp_path / "omniglot"
    for s in om.SETS:
        assert (folder / f"{s}.zip").read_bytes() == (OMNIGLOT / f"{s}.zip").read_bytes()
    assert sorted(p.name for p in folder.iterdir()) == ["images_background.zip", "images_evaluation.zip"]
    om.download(folder, base_url="file:///nonexistent")  # both verified: nothing fetched
    assert "already there and verified" in capsys.readouterr().err
    mirror = tmp_path / "bad_mirror"
    mirror.mkdir()
    for s in om.SETS:
        (mirror / f"{s}.zip").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="incomplete download"):
        om.download(tmp_path / "fresh", base_url=mirror.as_uri())
    assert list((tmp_path / "fresh" / "omniglot").iterdir()) == []  # nothing unverified left behind


def test_import_needs_no_data(tmp_path):
    env = {**os.environ, "METAGRAD_DATA": str(tmp_path / "none"), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    code = "import metagrad, metagrad.tasks.omniglot; from metagrad.tasks import load_families; " \
           "assert 'omniglot' in load_families(); import metagrad.experiments.omniglot"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
    assert not (tmp_path / "cache").exists()


# -- splits and episodes -----------------------------------------------------------------------------------
def test_maml_and_lake_splits(data):
    bg = data["background"]
    train, val, test = (om.split_characters("maml", s, bg) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (1100, 100, 423)
    assert len(torch.cat([train, val, test]).unique()) == 1623
    assert torch.equal(om.split_characters("maml", "train", bg, val_characters=0), torch.cat([train, val]).sort()[0])
    assert torch.equal(train, om.split_characters("maml", "train", bg))  # fixed
    assert not torch.equal(test, om.split_characters("maml", "test", bg, split_seed=2))
    # The 423 test characters are spread over both sets (a random split, not alphabets).
    assert 0 < int(bg[test].sum()) < 423
    lake_train, lake_test = om.split_characters("lake", "train", bg, val_characters=0), \
        om.split_characters("lake", "test", bg)
    assert bool(bg[lake_train].all()) and not bool(bg[lake_test].any()) and len(lake_test) == 659
    with pytest.raises(ValueError, match="split must be"):
        om.split_characters("maml", "dev", bg)
    with pytest.raises(ValueError, match="protocol must be"):
        om.split_characters("vinyals", "train", bg)
    with pytest.raises(ValueError, match="val_characters"):
        om.split_characters("maml", "val", bg, val_characters=0)


def test_episode_shapes_labels_and_content(lookup, gen):
    ways, shots, query = 20, 5, 15
    batch = Omniglot(ways, shots, query, root=ROOT).sample(3, gen)
    assert batch.support_x.shape == (3, ways * shots, 1, 28, 28) and batch.query_x.shape == (3, ways * query, 1, 28, 28)
    assert batch.support_x.dtype == torch.float32
    assert 0 <= float(batch.support_x.min()) < float(batch.support_x.max()) <= 1
    assert batch.support_y.dtype == torch.int64 and batch.query_y.dtype == torch.int64
    for y, k in ((batch.support_y, shots), (batch.query_y, query)):
        assert torch.equal(torch.bincount(y.flatten(), minlength=ways), torch.full((ways,), 3 * k))
    train = set(om.split_characters("maml", "train", om.load(ROOT)["background"]).tolist())
    for t in range(3):
        x = torch.cat([batch.support_x[t], batch.query_x[t]])
        y = torch.cat([batch.support_y[t], batch.query_y[t]])
        found = classes_of(x, lookup)
        assert all(found) and all(c in train for f in found for c, _ in f)  # training characters only
        # One (character, rotation) class per label, distinct across labels; distinct drawings within a class.
        per_label = [set.intersection(*[found[i] for i in (y == label).nonzero().flatten().tolist()])
                     for label in range(ways)]
        assert all(per_label)
        assert len({min(c) for c in per_label}) == ways
        for label in range(ways):
            imgs = x[y == label].flatten(1)
            assert len(torch.unique(imgs, dim=0)) >= shots + query - 1  # two drawers may draw identically


def test_rotations_are_classes_and_labels_are_shuffled(lookup):
    tasks = Omniglot(5, 1, 1, root=ROOT)
    batch = tasks.sample(200, torch.Generator().manual_seed(1))
    found = classes_of(batch.support_x.flatten(0, 1), lookup)
    rotations = {r for f in found if len(f) == 1 for _, r in f}
    assert rotations == {0, 1, 2, 3}
    # Label order vs character id: sorted in about 1/5! of tasks if labels are shuffled, always if not.
    chars = torch.tensor([min(f)[0] for f in found]).view(200, 5)
    sorted_tasks = float((chars.diff(dim=1) > 0).all(dim=1).float().mean())
    assert sorted_tasks < 0.05
    # Without rotations every drawing appears upright.
    upright = Omniglot(5, 1, 1, root=ROOT, rotations=False).sample(50, torch.Generator().manual_seed(1))
    assert all(any(r == 0 for _, r in f) for f in classes_of(upright.support_x.flatten(0, 1), lookup))
    assert tasks.n_classes == 4 * 1100


def test_test_split_uses_only_test_characters(lookup, data):
    batch = Omniglot(5, 1, 1, split="test", root=ROOT).sample(50, torch.Generator().manual_seed(2))
    test = set(om.split_characters("maml", "test", data["background"]).tolist())
    found = classes_of(torch.cat([batch.support_x, batch.query_x], 1).flatten(0, 1), lookup)
    assert all(f and all(c in test for c, _ in f) for f in found)


def test_same_seed_same_tasks():
    tasks = Omniglot(5, 1, 2, root=ROOT)
    a = tasks.sample(4, torch.Generator().manual_seed(5))
    b = tasks.sample(4, torch.Generator().manual_seed(5))
    c = tasks.sample(4, torch.Generator().manual_seed(6))
    assert all(torch.equal(s, t) for s, t in zip(a.tensors(), b.tensors()))
    assert not torch.equal(a.support_x, c.support_x)


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match=r"shots \+ query_shots must be at most 20"):
        Omniglot(5, 5, 16, root=ROOT)
    with pytest.raises(ValueError, match="ways must be a positive integer"):
        Omniglot(0, 1, 1, root=ROOT)
    with pytest.raises(ValueError, match="exceeds the 1692 classes"):
        Omniglot(2000, 1, 1, split="test", root=ROOT)
    with pytest.raises(ValueError, match="n_tasks"):
        Omniglot(root=ROOT).sample(0)
    with pytest.raises(ValueError, match="path must name one of"):
        om.verify(Path(ROOT) / "README.md")


# -- training ----------------------------------------------------------------------------------------------
def test_short_training_beats_chance_on_held_out_characters(tmp_path):
    from metagrad.experiments.omniglot import OmniglotConfig, run_omniglot
    from metagrad.runs import Run

    cfg = OmniglotConfig(iterations=50, meta_batch=8, hidden=32, val_every=0, eval_tasks=100, curve_steps=3,
                         data=ROOT, log_every=20)
    results = run_omniglot(cfg, Run(tmp_path, {}))
    curve, ci = results["evaluation"]["curve"], results["evaluation"]["curve_ci95"]
    # 5-way: chance is 20%. After 3 steps on 1 drawing per class, held-out characters: far above, CI included.
    assert curve[3] - ci[3] > 0.5, (curve, ci)
    assert curve[3] > curve[0] + 0.2  # adaptation is what does it: before any step the head is at chance
    assert results["table"][0]["published %"] == 98.7 and (tmp_path / "adaptation_curve.png").is_file()


def test_experiment_resume_is_bit_identical(tmp_path):
    from metagrad.experiments.omniglot import OmniglotConfig, run_omniglot
    from metagrad.runs import Run

    def run(path, iterations, resume=False):
        cfg = OmniglotConfig(iterations=iterations, meta_batch=2, hidden=8, val_every=0, eval_tasks=4,
                             curve_steps=1, data=ROOT, log_every=2, checkpoint_every=2)
        run_omniglot(cfg, Run(path, {"iterations": iterations}, resume=resume))
        return read_checkpoint(path / "checkpoint.safetensors")["algorithm"]

    full = run(tmp_path / "full", 6)
    run(tmp_path / "split", 3)
    resumed = run(tmp_path / "split", 6, resume=True)
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_eval_query_shots_trains_on_more_query_drawings_and_tests_the_papers_protocol(tmp_path, monkeypatch, capsys):
    import json

    from metagrad.cli import main
    from metagrad.experiments.omniglot import OmniglotConfig, run_omniglot, spec, test_tasks
    from metagrad.runs import Run
    from metagrad.train import build

    cfg = OmniglotConfig(query_shots=3, eval_query_shots=1, data=ROOT)
    _, train = build(spec(cfg))
    gen = torch.Generator().manual_seed(0)
    assert train.sample(2, gen).query_x.shape == (2, 15, 1, 28, 28)  # 5 ways x 3 drawings at meta-train
    test = test_tasks(cfg).sample(2, gen)
    assert test.query_x.shape == (2, 5, 1, 28, 28) and test.query_y.tolist() == [[0, 1, 2, 3, 4]] * 2
    # `metagrad eval` of the run folder tests as the run did: the same numbers, from the same 5-image queries.
    monkeypatch.chdir(tmp_path)
    tiny = [f"--set={k}" for k in ("query_shots=3", "eval_query_shots=1", "iterations=6", "meta_batch=2", "hidden=8",
                                   "eval_tasks=20", "curve_steps=1", "val_every=0", "path=loop", f"data={ROOT}")]
    assert main(["run", "omniglot-5w1s", *tiny, "--out", "r"]) == 0
    assert main(["eval", "r", "--no-progress"]) == 0
    assert "eval_query_shots" in capsys.readouterr().err
    run, again = (json.loads((tmp_path / "r" / f).read_text()) for f in ("results.json", "eval.json"))
    assert again["settings"]["task_args"] == {"query_shots": 1}
    assert run["evaluation"]["curve"] == again["curve"] and run["evaluation"]["n_tasks"] == again["n_tasks"] == 20
    # A test setting the data cannot serve (1 support + 20 query of 20 drawings) fails before any training.
    with pytest.raises(ValueError, match="at most 20"):
        run_omniglot(OmniglotConfig(eval_query_shots=20, data=ROOT), Run(tmp_path / "bad", {}))
    assert not (tmp_path / "bad" / "checkpoint.safetensors").exists()


def test_test_time_augmentation_of_a_run_and_of_metagrad_eval_agree(tmp_path, monkeypatch, capsys):
    import json

    from metagrad.cli import main
    from metagrad.experiments.omniglot import OmniglotConfig, run_omniglot
    from metagrad.runs import Run

    monkeypatch.chdir(tmp_path)
    tiny = [f"--set={k}" for k in ("iterations=6", "meta_batch=2", "hidden=8", "eval_tasks=20", "curve_steps=1",
                                   "val_every=0", "path=loop", "tta_shift=1", "support_shift=1", "tta_rotations=2",
                                   f"data={ROOT}")]
    assert main(["run", "omniglot-5w1s", *tiny, "--out", "r"]) == 0
    run = json.loads((tmp_path / "r" / "results.json").read_text())
    tta = run["tta"]
    views = (tta["tta_shift"], tta["support_shift"], tta["tta_rotations"])
    assert views == (1, 1, 2) and (tta["n_tasks"], tta["steps"]) == (20, 3)
    assert "test-time augmentation" in run["table"][-1]["algorithm"]
    assert run["table"][-1]["test accuracy % (ours, 95% CI)"] == f"{100 * tta['mean']:.2f} ± {100 * tta['ci95']:.2f}"
    # The same checkpoint and episodes from `metagrad eval`: the same number; without the flags, the plain one.
    flags = ["--tta-shift", "1", "--support-shift", "1", "--tta-rotations", "2"]
    assert main(["eval", "r", "--no-progress", *flags]) == 0
    again = json.loads((tmp_path / "r" / "eval.json").read_text())
    assert (again["mean"], again["ci95"]) == (tta["mean"], tta["ci95"])
    assert (again["tta_shift"], again["support_shift"], again["tta_rotations"]) == views
    assert main(["eval", "r", "--no-progress"]) == 0
    plain = json.loads((tmp_path / "r" / "eval.json").read_text())
    assert plain["curve"] == run["evaluation"]["curve"] and plain["tta_shift"] == 0
    assert main(["eval", "r", "--tta-shift", "-1"]) == 2
    assert "numbers of pixels" in capsys.readouterr().err
    # Turning whole tasks needs a model trained on rotated classes; the check runs before any training.
    with pytest.raises(ValueError, match="rotations=true"):
        run_omniglot(OmniglotConfig(tta_rotations=2, rotations=False, data=ROOT), Run(tmp_path / "bad", {}))
    with pytest.raises(ValueError, match="1 \\(none\\), 2"):
        run_omniglot(OmniglotConfig(tta_rotations=3, data=ROOT), Run(tmp_path / "bad", {}))
    assert not (tmp_path / "bad" / "checkpoint.safetensors").exists()


def test_train_ways_meta_trains_on_more_classes_and_tests_ways_with_the_first_outputs(tmp_path, monkeypatch, capsys):
    import json

    from metagrad.cli import main
    from metagrad.experiments.omniglot import OmniglotConfig, check, spec, test_tasks, tested, val_tasks
    from metagrad.train import build

    cfg = OmniglotConfig(train_ways=10, data=ROOT, hidden=8, path="loop")
    s = spec(cfg)
    algorithm, train = build(s)
    gen = torch.Generator().manual_seed(0)
    assert s["model_args"]["ways"] == 10 and algorithm.model.head.out_features == 10
    assert train.sample(2, gen).support_x.shape == (2, 10, 1, 28, 28)  # 10 classes per meta-training task
    assert val_tasks(cfg).ways == 10  # validation ranks the meta-trained 10-way classifier
    test = test_tasks(cfg).sample(2, gen)
    assert test.support_x.shape == (2, 5, 1, 28, 28) and test.query_y.tolist() == [[0, 1, 2, 3, 4]] * 2
    five = tested(algorithm, cfg)
    assert five.model.head.out_features == 5
    torch.testing.assert_close(five.model.head.weight, algorithm.model.head.weight[:5])
    assert tested(algorithm, OmniglotConfig(data=ROOT)) is algorithm  # nothing to narrow without train_ways
    with pytest.raises(ValueError, match="train_ways=3 is fewer than the 5"):
        check(OmniglotConfig(train_ways=3))
    # `metagrad eval` of the run folder tests as the run did: 5-way tasks, the head's first 5 outputs.
    monkeypatch.chdir(tmp_path)
    tiny = [f"--set={k}" for k in ("train_ways=10", "iterations=6", "meta_batch=2", "hidden=8", "eval_tasks=20",
                                   "curve_steps=1", "val_every=0", "path=loop", f"data={ROOT}")]
    assert main(["run", "omniglot-5w1s", *tiny, "--out", "r"]) == 0
    assert main(["eval", "r", "--no-progress"]) == 0
    assert "trained on train_ways" in capsys.readouterr().err
    run, again = (json.loads((tmp_path / "r" / f).read_text()) for f in ("results.json", "eval.json"))
    assert again["settings"]["task_args"] == {"ways": 5} and again["spec"]["model_args"]["ways"] == 10
    assert run["evaluation"]["curve"] == again["curve"] and run["evaluation"]["n_tasks"] == again["n_tasks"] == 20


def test_named_experiments_carry_the_papers_settings():
    from metagrad.experiments import get

    paper = {  # ways, shots, inner_lr, inner_steps (train), eval_steps (test), meta_batch: MAML paper, Omniglot
        "omniglot-5w1s": (5, 1, 0.4, 1, 3, 32), "omniglot-5w5s": (5, 5, 0.4, 1, 3, 32),
        "omniglot-20w1s": (20, 1, 0.1, 5, 5, 16), "omniglot-20w5s": (20, 5, 0.1, 5, 5, 16),
    }
    for name, values in paper.items():
        cfg = get(name).make_config()
        assert (cfg.ways, cfg.shots, cfg.inner_lr, cfg.inner_steps, cfg.eval_steps, cfg.meta_batch) == values
        assert (cfg.outer_lr, cfg.iterations, cfg.eval_tasks, cfg.query_shots) == (1e-3, 60000, 600, cfg.shots)


def test_maml_plus_plus_experiments_carry_the_maml_plus_plus_code_settings():
    from metagrad.experiments import get
    from metagrad.experiments.omniglot import spec

    # HowToTrainYourMAMLPytorch, experiment_config/omniglot_maml++-*: ways, meta_batch (batch_size), inner
    # steps (train, test), init inner rate, iterations (epochs x 500), multi-step-loss iterations (epochs x 500).
    code = {"omniglot-5w1s-maml++": (5, 8, 5, 5, 0.1, 50000, 5000),
            "omniglot-20w1s-maml++": (20, 16, 5, 5, 0.1, 125000, 10000)}
    for name, values in code.items():
        cfg = get(name).make_config()
        assert (cfg.ways, cfg.meta_batch, cfg.inner_steps, cfg.eval_steps, cfg.inner_lr, cfg.iterations,
                cfg.multi_step_loss_iters) == values
        assert (cfg.shots, cfg.query_shots, cfg.order, cfg.order_anneal_iters) == (1, 1, 2, 0)
        assert (cfg.lr_schedule, cfg.outer_lr, cfg.min_outer_lr, cfg.pool) == ("cosine", 1e-3, 1e-5, "max")
        s = spec(cfg)
        assert s["algorithm"] == "maml++" and s["model_args"]["pool"] == "max"
        assert s["algorithm_args"]["multi_step_loss_iters"] == values[-1]


def test_maml_plus_plus_short_training_learns_its_rates_and_beats_chance(tmp_path):
    from metagrad.experiments.omniglot import OmniglotMAMLPlusPlusConfig, run_omniglot, spec
    from metagrad.runs import Run
    from metagrad.train import build

    cfg = OmniglotMAMLPlusPlusConfig(iterations=40, multi_step_loss_iters=20, hidden=16, val_every=0, ensemble=0,
                                     eval_tasks=100, curve_steps=5, data=ROOT, log_every=10)
    start = build(spec(cfg), seed=cfg.seed)[0].state_dict()
    results = run_omniglot(cfg, Run(tmp_path, {}))
    curve, ci = results["evaluation"]["curve"], results["evaluation"]["curve_ci95"]
    assert curve[5] - ci[5] > 0.5, (curve, ci)  # chance: 20%
    trained = read_checkpoint(tmp_path / "checkpoint.safetensors")["algorithm"]
    rates = [k for k in trained if k.startswith("inner_meta_params.")]  # LSLR: a learned rate per layer and step
    # 4 conv x 2 + head x 2: the per-step batch norm is learned in the outer loop only, as in MAML++.
    assert len(rates) == 10 and all(trained[k].shape == (5,) for k in rates)
    assert trained["model.features.1.weight"].shape == (6, 16)  # a set per number of inner updates, 0..5
    assert any(not torch.equal(start[k], trained[k]) for k in rates)
    lrs = [m["outer_lr"] for m in Run(tmp_path, {}, resume=True).metrics() if "outer_lr" in m]
    assert lrs[0] > lrs[-1] > 1e-5  # cosine-annealed outer rate, logged
    assert results["table"][0]["published %"] == 99.47


@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "reptile", "anil", "metasgd", "maml++"])
def test_every_algorithm_trains_on_omniglot(algorithm, tmp_path):
    from metagrad.experiments.omniglot import OmniglotConfig, run_omniglot, spec
    from metagrad.runs import Run
    from metagrad.train import build

    cfg = OmniglotConfig(algorithm=algorithm, iterations=2, meta_batch=2, hidden=8, val_every=0, eval_tasks=4,
                         curve_steps=1, data=ROOT, log_every=1)
    start = build(spec(cfg), seed=cfg.seed)[0].state_dict()
    results = run_omniglot(cfg, Run(tmp_path, {}))
    trained = read_checkpoint(tmp_path / "checkpoint.safetensors")["algorithm"]
    assert int(trained["iteration"]) == 2 and results["iterations"] == 2
    assert not torch.equal(start["model.head.weight"], trained["model.head.weight"])
    assert 0 <= results["accuracy"] <= 1 and len(results["evaluation"]["curve"]) == 4  # 0..eval_steps (3)


def test_maml_plus_plus_tests_the_ensemble_of_its_best_validation_checkpoints(tmp_path):
    from metagrad.experiments.omniglot import OmniglotMAMLPlusPlusConfig, run_omniglot
    from metagrad.runs import Run

    cfg = OmniglotMAMLPlusPlusConfig(iterations=6, meta_batch=2, inner_steps=2, eval_steps=2, hidden=8,
                                     val_every=2, val_tasks=10, ensemble=2, eval_tasks=20, curve_steps=2, data=ROOT,
                                     log_every=2, multi_step_loss_iters=2)
    results = run_omniglot(cfg, Run(tmp_path, {}))
    val = {m["step"]: m["meta_test_accuracy"] for m in Run(tmp_path, {}, resume=True).metrics()
           if "meta_test_accuracy" in m}
    kept = results["ensemble"]["iterations"]
    assert len(kept) == 2 and sorted(val[i] for i in kept) == sorted(val.values())[-2:]  # the two best
    assert results["ensemble"]["n_tasks"] == 20 and 0 <= results["ensemble"]["mean"] <= 1
    assert len(results["table"]) == 2 and "ensemble of 2" in results["table"][1]["algorithm"]
