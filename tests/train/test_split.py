from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from histodetect.data.split import groups_of, read_groups, split_rows, stratified_subset
from histodetect.data.store import Place, Store, StoreWriter
from histodetect.runs.config import ConfigError

LABELS = np.array([0] * 60 + [1] * 40)


def test_holdout_is_stratified_disjoint_and_complete() -> None:
    train, val, test = split_rows(LABELS, val_fraction=0.2, seed=0)
    assert len(test) == 0
    assert len(val) == 20 and LABELS[val].sum() == 8
    assert not set(train) & set(val) and len(train) + len(val) == len(LABELS)


def test_folds_cover_every_patch_once() -> None:
    vals = [split_rows(LABELS, val_fraction=0.2, seed=1, folds=5, fold=k)[1] for k in range(5)]
    assert sorted(np.concatenate(vals)) == list(range(len(LABELS)))


def test_groups_never_straddle_the_split() -> None:
    groups = np.repeat(np.arange(20), 5)
    rng = np.random.default_rng(0)
    labels = np.repeat(rng.integers(0, 2, 20), 5)
    train, val, _ = split_rows(labels, val_fraction=0.25, seed=0, groups=groups)
    assert not set(groups[train]) & set(groups[val])
    assert 0.15 <= len(val) / len(labels) <= 0.35


def test_a_test_split_is_stratified_drawn_first_and_the_same_in_every_fold() -> None:
    parts = [split_rows(LABELS, val_fraction=0.2, seed=3, folds=4, fold=k, test_fraction=0.2) for k in range(4)]
    test = parts[0].test
    assert len(test) == 20 and LABELS[test].sum() == 8  # stratified
    for train, val, fold_test in parts:
        assert list(fold_test) == list(test)  # held out of every fold
        assert not set(test) & (set(train) | set(val))
        assert len(train) + len(val) + len(test) == len(LABELS)
    assert sorted(np.concatenate([p.val for p in parts])) == sorted(set(range(len(LABELS))) - set(test))
    train, val, test = split_rows(LABELS, val_fraction=0.25, seed=3, test_fraction=0.2)
    assert (len(train), len(val), len(test)) == (60, 20, 20)


def test_a_grouped_test_split_keeps_groups_whole() -> None:
    groups = np.repeat(np.arange(20), 5)
    labels = np.repeat(np.random.default_rng(0).integers(0, 2, 20), 5)
    train, val, test = split_rows(labels, val_fraction=0.25, seed=0, groups=groups, test_fraction=0.2)
    assert len(test) and not set(groups[test]) & (set(groups[train]) | set(groups[val]))
    assert not set(groups[train]) & set(groups[val])


def test_read_groups_names_missing_ids(tmp_path: Path) -> None:
    (tmp_path / "g.csv").write_text("id,group\na,s1\nb,s2\n")
    assert list(read_groups(tmp_path / "g.csv", np.array(["b", "a"]))) == ["s2", "s1"]
    with pytest.raises(ConfigError, match="no group"):
        read_groups(tmp_path / "g.csv", np.array(["a", "c"]))
    (tmp_path / "bad.csv").write_text("id,slide\na,s1\n")
    with pytest.raises(ConfigError, match="group"):
        read_groups(tmp_path / "bad.csv", np.array(["a"]))


def test_stratified_subset_keeps_the_balance_and_copes_with_tiny_sizes() -> None:
    keep = stratified_subset(LABELS, 50, seed=0)
    assert len(keep) == len(set(keep)) == 50 and LABELS[keep].sum() == 20
    assert len(stratified_subset(LABELS, 1, seed=0)) == 1
    assert list(stratified_subset(LABELS, 500, seed=0)) == list(range(len(LABELS)))


def slide_store(sample_store: Store, path: Path, *, slides: int = 8, unplaced: int = 0) -> Store:
    """The sample's training patches on ``slides`` fake slides, as ``ingest`` records them; the first
    ``unplaced`` patches on none."""
    rows = sample_store.rows("train")
    with StoreWriter(path, capacity=len(rows)) as writer:
        for i, row in enumerate(rows):
            place = Place(f"slide-{i % slides}", 96 * i, 0) if i >= unplaced else None
            label, sha1 = int(sample_store.labels[row]), sample_store.index["sha1"].iloc[row]
            writer.add(sample_store.patches[row], sample_store.ids[row], label, "train", "x", sha1, place)
        return writer.commit(source="test")


@pytest.mark.slow
def test_train_groups_auto_keeps_every_slide_on_one_side(sample_store: Store, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from histodetect.cli import app

    store = slide_store(sample_store, tmp_path / "store")
    args = ["train", str(store.path), "--out", str(tmp_path / "run"), "--model", "baseline-cnn", "--groups", "auto"]
    options = ["--test-fraction", "0.2", "--val-fraction", "0.25", "--epochs", "1", "--batch-size", "16"]
    done = CliRunner().invoke(app, [*args, *options, "--limit-train", "16", "--num-workers", "0"])
    assert done.exit_code == 0, done.output
    split = pd.read_csv(tmp_path / "run" / "split.csv").merge(
        pd.DataFrame({"id": store.ids, "group": store.groups}), on="id"
    )
    slides = split.groupby("group")["part"].unique()
    assert len(slides) == 8 and all(len(parts) == 1 for parts in slides)  # no slide on two sides
    assert set(split["part"]) >= {"train", "val", "test"}


def test_groups_auto_needs_a_group_for_every_labeled_patch(sample_store: Store, tmp_path: Path) -> None:
    labeled = sample_store.rows(labeled=True)
    with pytest.raises(ConfigError, match=r"holds no slide groups; ingest a PCam source with its _meta\.csv"):
        groups_of("auto", sample_store, labeled)
    partial = slide_store(sample_store, tmp_path / "store", unplaced=3)
    with pytest.raises(ConfigError, match=r"3 of the 240 labeled patches .* have no group"):
        groups_of("auto", partial, labeled)
    placed = slide_store(sample_store, tmp_path / "placed")
    assert groups_of("auto", placed, labeled[:3]).tolist() == ["slide-0", "slide-1", "slide-2"]
