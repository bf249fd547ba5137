"""Linear probes on cached embeddings (--freeze frozen --cache-embeddings): real Lite0 weights and a small ViT
saved to a local file, on a few dozen real patches."""

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from histodetect.data.store import Store, StoreWriter
from histodetect.models import Classifier
from histodetect.runs import load_model
from histodetect.runs.config import ConfigError, TrainConfig
from histodetect.train.embeddings import META, cache_root, open_or_build
from histodetect.train.run import hardware_for, train

pytestmark = pytest.mark.slow  # every test trains a run or scores a slide with one (seconds each on 2 cores)

PROBE = dict(
    freeze="frozen",
    cache_embeddings=True,
    batch_size=8,
    val_fraction=0.25,
    patience=0,
    num_workers=0,
    precision="32",
    image_size=96,
)


def small_store(source: Store, path: Path, n: int) -> Store:
    """The first ``n`` labeled patches of the sample, as a store of their own."""
    rows = source.rows(labeled=True)[:n]
    with StoreWriter(path, capacity=n) as writer:
        writer.add_many(
            source.read(rows),
            list(source.ids[rows]),
            [int(x) for x in source.labels[rows]],
            "train",
            [f"sample:{i}" for i in source.ids[rows]],
            list(source.index["sha1"].to_numpy()[rows]),
        )
        return writer.commit(source="test")


@pytest.fixture
def store40(sample_store: Store, tmp_path: Path) -> Store:
    return small_store(sample_store, tmp_path / "store40", 40)


class CountBackbone:
    """Counts backbone passes (``Classifier.features``) while installed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        original = Classifier.features

        def counted(model: Classifier, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return original(model, x)

        monkeypatch.setattr(Classifier, "features", counted)


def cache_of(run: Path, store: Store, config: TrainConfig):
    """The run's cache, opened again (no backbone pass: it exists)."""
    net, _ = load_model(run)
    views = 8 if config.aug_dihedral else 1
    return open_or_build(
        net, store, views=views, hardware=hardware_for(config), batch_size=8, cache_dir=config.cache_dir
    )


def assert_run_is_the_head_on_the_cache(run: Path, store: Store, config: TrainConfig) -> None:
    """The saved run, loaded as every command loads it, scores patches as its head scores their cached
    embeddings."""
    cache = cache_of(run, store, config)
    assert not cache.built
    net, _ = load_model(run)
    rows = store.rows(labeled=True)
    pixels = torch.from_numpy(store.read(rows)).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        from_pixels = net(pixels)
        from_cache = net.head(torch.from_numpy(np.array(cache.embeddings[cache.index_of(rows), 0])))[:, 0]
    torch.testing.assert_close(from_pixels, from_cache, rtol=1e-4, atol=1e-4)


def test_lite0_probe_caches_8_views_once_and_saves_one_ordinary_model(
    store40: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = TrainConfig(
        model="tf_efficientnet_lite0", pretrained="auto", epochs=3, cache_dir=str(tmp_path / "cache"), **PROBE
    )
    counter = CountBackbone(monkeypatch)
    first = train(store40, tmp_path / "run", config)
    assert counter.calls == 8 * 5  # 40 patches in batches of 8, 8 dihedral views each
    assert first["epochs_run"] == 3 and np.isfinite(first["best_val_auc"])
    (cache,) = [p for p in (tmp_path / "cache").iterdir()]
    assert (cache / META).is_file() and not cache.name.startswith(".")

    counter.calls = 0
    other_fold = config.replace(folds=2, fold=1)  # another split of the same store: the same cache
    train(store40, tmp_path / "fold1", other_fold)
    assert counter.calls == 0
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [cache.name]
    assert_run_is_the_head_on_the_cache(tmp_path / "run", store40, config)
    assert_run_is_the_head_on_the_cache(tmp_path / "fold1", store40, other_fold)
    counter.calls = 0
    assert_run_is_the_head_on_the_cache(tmp_path / "run", store40, config)
    assert counter.calls == 1  # the one pass here is the check's own, over the pixels


def test_vit_from_a_local_file_trains_a_probe(
    sample_store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = small_store(sample_store, tmp_path / "store", 24)
    weights = tmp_path / "vit_tiny.safetensors"
    save_file(timm.create_model("vit_tiny_patch16_224", pretrained=False).state_dict(), str(weights))
    config = TrainConfig(
        model="vit_tiny_patch16_224",
        pretrained=str(weights),
        epochs=2,
        cache_dir=str(tmp_path / "cache"),
        **{**PROBE, "image_size": 224, "aug_dihedral": False},
    )
    counter = CountBackbone(monkeypatch)
    summary = train(store, tmp_path / "run", config)
    assert summary["epochs_run"] == 2 and counter.calls == 3  # 24 patches in batches of 8, one view
    counter.calls = 0
    train(store, tmp_path / "again", config.replace(seed=5))
    assert counter.calls == 0
    cache = cache_of(tmp_path / "run", store, config)
    assert cache.views == 1 and cache.embeddings.shape == (24, 1, 192)
    assert_run_is_the_head_on_the_cache(tmp_path / "run", store, config)


def test_an_interrupted_cache_is_never_used(store40: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = TrainConfig(model="baseline-cnn", pretrained="none", epochs=1, cache_dir=str(tmp_path / "cache"), **PROBE)
    original = Classifier.features
    calls = {"n": 0}

    def fails_on_the_third_batch(model: Classifier, x: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 3 * 8:
            raise KeyboardInterrupt
        return original(model, x)

    monkeypatch.setattr(Classifier, "features", fails_on_the_third_batch)
    with pytest.raises(KeyboardInterrupt):
        train(store40, tmp_path / "run", config)
    assert list((tmp_path / "cache").iterdir()) == []  # the partial folder is removed with the run
    # A leftover hidden folder (a killed process cannot clean up) is never taken for a cache.
    (tmp_path / "cache" / ".stale.partial").mkdir()
    monkeypatch.setattr(Classifier, "features", original)
    train(store40, tmp_path / "run2", config)
    complete = [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]
    assert len(complete) == 1 and (complete[0] / META).is_file()


def test_a_changed_store_or_backbone_gets_its_own_cache(sample_store: Store, store40: Store, tmp_path: Path) -> None:
    config = TrainConfig(model="baseline-cnn", pretrained="none", epochs=1, cache_dir=str(tmp_path / "cache"), **PROBE)
    train(store40, tmp_path / "a", config)
    train(small_store(sample_store, tmp_path / "store41", 41), tmp_path / "b", config)
    train(store40, tmp_path / "c", config.replace(seed=9))  # another random init: other weights
    assert len(list((tmp_path / "cache").iterdir())) == 3


def test_cache_location_defaults_and_overrides(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("HISTODETECT_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_root() == Path.home() / ".cache" / "histodetect" / "embeddings"
    monkeypatch.setenv("HISTODETECT_CACHE", str(tmp_path))
    assert cache_root() == tmp_path / "embeddings"
    assert cache_root(tmp_path / "mine") == tmp_path / "mine"


@pytest.mark.parametrize(
    ("changes", "message"),
    [({"freeze": "none"}, "freeze=frozen"), ({"mixup": 0.2}, "mixup")],
)
def test_cache_needs_a_frozen_backbone_and_no_mixing(changes, message) -> None:
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**{**PROBE, **changes})


def test_probe_with_ema_saves_the_averaged_head(store40: Store, tmp_path: Path) -> None:
    config = TrainConfig(
        model="baseline-cnn", pretrained="none", epochs=2, ema=0.5, cache_dir=str(tmp_path / "cache"), **PROBE
    )
    train(store40, tmp_path / "run", config)
    best = torch.load(tmp_path / "run" / "checkpoints" / "best.ckpt", weights_only=True)
    saved, _ = load_model(tmp_path / "run")
    averaged = {k.removeprefix("model."): v for k, v in best["state_dict"].items() if k.startswith("model.")}
    raw = {k.removeprefix("model."): v for k, v in best["current_model_state"].items() if k.startswith("model.")}
    assert not torch.equal(averaged["head.1.weight"], raw["head.1.weight"])
    torch.testing.assert_close(saved.head.state_dict()["1.weight"], averaged["head.1.weight"])
    assert_run_is_the_head_on_the_cache(tmp_path / "run", store40, config)


def test_cli_flags_reach_the_run(store40: Store, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from histodetect.cli import app

    args = ["train", str(store40.path), "--out", str(tmp_path / "run"), "--freeze", "frozen", "--cache-embeddings"]
    args += ["--cache-dir", str(tmp_path / "cache"), "--ema", "0.9", "--epochs", "1", "--batch-size", "8"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    saved = TrainConfig.load(tmp_path / "run" / "config.yaml")
    assert (saved.cache_embeddings, saved.ema, saved.cache_dir) == (True, 0.9, str(tmp_path / "cache"))
    assert len(list((tmp_path / "cache").iterdir())) == 1
    refused = CliRunner().invoke(app, [*args[:3], str(tmp_path / "run2"), "--cache-embeddings"])
    assert refused.exit_code == 2 and "freeze=frozen" in refused.output
