"""explain: Grad-CAM overlays for the from-scratch baseline and a timm backbone."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from histodetect.data.store import Store, StoreError
from histodetect.infer.engine import InferError, Predictor
from histodetect.infer.explain import cams, explain
from histodetect.infer.sources import open_source
from histodetect.runs import load_model

pytestmark = pytest.mark.slow  # every test trains a run or scores a slide with one (seconds each on 2 cores)


def test_store_patches_balanced_between_classes(baseline_run: Path, sample_store: Store, tmp_path: Path) -> None:
    paths = explain(baseline_run, [sample_store.path], tmp_path / "cam", limit=6)
    overlays = [p for p in paths if p.name != "grid.png"]
    assert len(overlays) == 6 and paths[-1] == tmp_path / "cam" / "grid.png"
    ids = [p.stem.split("_", 1)[1] for p in overlays]
    labels = sample_store.index.set_index("id").loc[ids, "label"]
    assert sorted(labels) == [0, 0, 0, 1, 1, 1]
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size[0] > 96
    assert sorted(p.name for p in (tmp_path / "cam").iterdir()) == sorted(p.name for p in paths)  # no leftovers


def test_a_timm_model_on_image_files_with_gradcam_plus_plus(
    make_run: Callable[[str], Path], tmp_path: Path, test_images: Path
) -> None:
    images = sorted(test_images.glob("*.tif"))[:2]
    paths = explain(make_run("resnet18"), images, tmp_path / "cam", method="gradcam++")
    assert [p.name for p in paths] == [f"000_{images[0].stem}.png", f"001_{images[1].stem}.png", "grid.png"]


def test_heatmaps_and_probabilities(make_run: Callable[[str], Path], test_images: Path) -> None:
    run = make_run("tf_efficientnet_lite0")
    patches = open_source(test_images).patches[:4]
    heat, probabilities = cams(load_model(run)[0], patches)
    assert heat.shape == (4, 96, 96) and heat.min() >= 0 and heat.max() <= 1
    np.testing.assert_allclose(probabilities, Predictor([run], precision="fp32").predict(patches), atol=1e-5)


def test_unknown_method(baseline_run: Path, tmp_path: Path, test_images: Path) -> None:
    with pytest.raises(InferError, match="gradcam"):
        explain(baseline_run, [test_images], tmp_path / "cam", method="lime")


def test_a_folder_gives_its_first_limit_images(baseline_run: Path, tmp_path: Path, test_images: Path) -> None:
    paths = explain(baseline_run, [test_images], tmp_path / "cam", limit=3)
    first = sorted(p.stem for p in test_images.glob("*.tif"))[:3]
    assert [p.name for p in paths] == [f"{i:03d}_{id_}.png" for i, id_ in enumerate(first)] + ["grid.png"]


def test_an_id_that_names_a_path_cannot_make_explain_write_outside_out(
    baseline_run: Path, sample_store: Store, tmp_path: Path
) -> None:
    """Overlays are named by id: a store whose index holds '../../evil' is refused when it opens."""
    store = tmp_path / "store"
    shutil.copytree(sample_store.path, store)
    index = pd.read_csv(store / "index.csv", dtype=str, keep_default_na=False)
    index.loc[0, "id"] = "../../evil"
    index.to_csv(store / "index.csv", index=False)
    with pytest.raises(StoreError, match=r"index.csv: line 2: id '../../evil': path separator"):
        explain(baseline_run, [store], tmp_path / "a" / "b" / "cam", limit=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]
