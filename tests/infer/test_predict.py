"""predict and its engine: submissions that follow the sample exactly, and probabilities that agree across sources,
TTA modes, ensembles and the ONNX export."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from histodetect.cli import app
from histodetect.data.augment import dihedral
from histodetect.data.store import Store
from histodetect.infer import predict as predict_module
from histodetect.infer.engine import CPU_ENGINE, InferError, Predictor, _choose_engine
from histodetect.infer.predict import predict
from histodetect.infer.sources import open_source

pytestmark = pytest.mark.slow  # every test trains a run or scores a slide with one (seconds each on 2 cores)

MakeRun = Callable[[str], Path]


def sample_ids(path: Path) -> list[str]:
    return pd.read_csv(path, dtype={"id": str})["id"].tolist()


def test_submission_follows_the_sample_submission(
    baseline_run: Path, tmp_path: Path, test_images: Path, sample_submission: Path
) -> None:
    out = tmp_path / "submission.csv"
    frame = predict([baseline_run], test_images, out, sample_submission=sample_submission)
    written = pd.read_csv(out, dtype={"id": str})
    assert list(written.columns) == ["id", "label"]
    assert written["id"].tolist() == sample_ids(sample_submission)  # same ids, same (unsorted) order
    assert written["id"].tolist() == frame["id"].tolist()
    assert written["label"].between(0, 1).all() and written["label"].nunique() > 1


@pytest.mark.shared
def test_submission_on_the_shared_competition_subset(baseline_run: Path, shared_subset: Path, tmp_path: Path) -> None:
    sample = shared_subset / "sample_submission.csv"
    frame = predict([baseline_run], shared_subset / "test", tmp_path / "s.csv", sample_submission=sample)
    assert frame["id"].tolist() == sample_ids(sample)
    assert frame["label"].between(0, 1).all()


def test_without_a_sample_one_row_per_image_sorted_by_id(baseline_run: Path, tmp_path: Path, test_images: Path) -> None:
    frame = predict([baseline_run], test_images, tmp_path / "s.csv")
    assert frame["id"].tolist() == sorted(p.stem for p in test_images.glob("*.tif"))


def test_an_id_without_an_image_is_an_error_naming_it(
    baseline_run: Path, tmp_path: Path, test_images: Path, sample_submission: Path
) -> None:
    sample = tmp_path / "sample.csv"
    ids = [*sample_ids(sample_submission), "f" * 40, "e" * 40]
    pd.DataFrame({"id": ids, "label": 0}).to_csv(sample, index=False)
    out = tmp_path / "s.csv"
    with pytest.raises(InferError, match=r"2 id\(s\).*ffffffff.*eeeeeeee"):
        predict([baseline_run], test_images, out, sample_submission=sample)
    assert not out.exists()


def test_images_the_sample_does_not_list_are_left_out_with_a_note(
    baseline_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], test_images: Path, sample_submission: Path
) -> None:
    sample = tmp_path / "sample.csv"
    ids = sample_ids(sample_submission)[:5]
    pd.DataFrame({"id": ids, "label": 0}).to_csv(sample, index=False)
    frame = predict([baseline_run], test_images, tmp_path / "s.csv", sample_submission=sample)
    assert frame["id"].tolist() == ids
    assert "11 patch(es)" in capsys.readouterr().err


def test_threshold_writes_decisions(baseline_run: Path, tmp_path: Path, test_images: Path) -> None:
    p = predict([baseline_run], test_images, tmp_path / "p.csv")
    threshold = float(np.median(p["label"]))
    decided = predict([baseline_run], test_images, tmp_path / "d.csv", threshold=threshold)
    assert pd.read_csv(tmp_path / "d.csv")["label"].isin([0, 1]).all()
    assert (decided["label"] == (p["label"] >= threshold).astype(int)).all()


def test_ensemble_is_the_mean_of_its_members(
    baseline_run: Path, make_run: MakeRun, tmp_path: Path, test_images: Path
) -> None:
    other = make_run("tf_efficientnet_lite0")
    a = predict([baseline_run], test_images, tmp_path / "a.csv", precision="fp32")["label"]
    b = predict([other], test_images, tmp_path / "b.csv", precision="fp32")["label"]
    both = predict([baseline_run, other], test_images, tmp_path / "ab.csv", precision="fp32")["label"]
    np.testing.assert_allclose(both, (a + b) / 2, atol=1e-6)


def test_d4_tta_of_a_symmetric_patch_equals_no_tta(baseline_run: Path, test_images: Path) -> None:
    patches = torch.from_numpy(open_source(test_images).patches[:4]).permute(0, 3, 1, 2).float()
    symmetric = torch.stack([dihedral(patches, k) for k in range(8)]).mean(0).round().to(torch.uint8)
    for k in range(8):  # the input really is invariant, so every transform sees the same pixels
        assert torch.equal(dihedral(symmetric, k), symmetric)
    symmetric = symmetric.permute(0, 2, 3, 1).contiguous().numpy()
    plain = Predictor([baseline_run], precision="fp32").predict(symmetric)
    d4 = Predictor([baseline_run], tta="d4", precision="fp32").predict(symmetric)
    np.testing.assert_allclose(d4, plain, atol=1e-6)


def test_flips_tta_averages_identity_and_the_three_flips(baseline_run: Path, test_images: Path) -> None:
    patches = open_source(test_images).patches[:6]
    plain = Predictor([baseline_run], precision="fp32")
    views = (patches, patches[:, :, ::-1], patches[:, ::-1], patches[:, ::-1, ::-1])
    by_hand = np.mean([plain.predict(np.ascontiguousarray(v)) for v in views], axis=0)
    flips = Predictor([baseline_run], tta="flips", precision="fp32").predict(patches)
    np.testing.assert_allclose(flips, by_hand, atol=1e-6)


def test_store_folder_and_single_image_agree(
    baseline_run: Path, sample_store: Store, tmp_path: Path, test_images: Path
) -> None:
    from_store = predict([baseline_run], sample_store.path, tmp_path / "store.csv", precision="fp32")
    from_folder = predict([baseline_run], test_images, tmp_path / "folder.csv", precision="fp32")
    assert from_store["id"].tolist() == from_folder["id"].tolist()  # the store's default split is test
    np.testing.assert_allclose(from_store["label"], from_folder["label"], atol=1e-6)
    image = sorted(test_images.glob("*.tif"))[3]
    single = predict([baseline_run], image, tmp_path / "one.csv", precision="fp32")
    assert single["id"].tolist() == [image.stem]
    np.testing.assert_allclose(single["label"], from_folder.set_index("id").loc[[image.stem], "label"], atol=1e-6)


def test_onnx_export_as_a_run_matches_the_run(
    baseline_run: Path, exported: Callable[[str], dict[str, Any]], tmp_path: Path, test_images: Path
) -> None:
    onnx = Path(exported("baseline-cnn")["path"])
    torch_p = predict([baseline_run], test_images, tmp_path / "t.csv", tta="flips", precision="fp32")
    onnx_p = predict([onnx], test_images, tmp_path / "o.csv", tta="flips", precision="fp32")
    assert onnx_p["id"].tolist() == torch_p["id"].tolist()
    assert np.abs(onnx_p["label"] - torch_p["label"]).max() < 1e-4


def test_patches_are_read_one_batch_at_a_time(baseline_run: Path, test_images: Path) -> None:
    class Recording:
        def __init__(self, data: np.ndarray) -> None:
            self.data, self.reads = data, []

        def __len__(self) -> int:
            return len(self.data)

        def __getitem__(self, index: slice) -> np.ndarray:
            self.reads.append(index)
            return self.data[index]

    reader = Recording(open_source(test_images).patches[:10])
    Predictor([baseline_run], batch_size=4).predict(reader)
    assert [(s.start, s.stop) for s in reader.reads] == [(0, 4), (4, 8), (8, 12)]


def test_a_bad_image_midway_leaves_no_output(baseline_run: Path, tmp_path: Path, test_images: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    for path in sorted(test_images.glob("*.tif"))[:6]:
        shutil.copy(path, folder)
    Image.new("RGB", (100, 100)).save(folder / "ffff.tif")  # sorts last: fails after the first batches
    out = tmp_path / "s.csv"
    out.write_text("previous\n")
    with pytest.raises(InferError, match=r"ffff\.tif.*100x100"):
        predict([baseline_run], folder, out, batch_size=2)
    assert out.read_text() == "previous\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"tta": "d8"}, "--tta"), ({"threshold": 1.5}, "--threshold"), ({"batch_size": 0}, "--batch-size")],
)
def test_bad_options_are_user_errors(
    baseline_run: Path, tmp_path: Path, kwargs: dict, match: str, test_images: Path
) -> None:
    with pytest.raises(InferError, match=match):
        predict([baseline_run], test_images, tmp_path / "s.csv", **kwargs)


# ------------------------------------------------------------------------------------------ refused up front
@pytest.fixture
def no_scoring(monkeypatch: pytest.MonkeyPatch) -> None:
    """What is refused must be refused before any model is loaded or patch scored."""
    monkeypatch.setattr(predict_module, "Predictor", pytest.fail)


def one_line_error(result: Any) -> str:
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error:") and result.stderr.count("\n") == 1, result.stderr
    return str(result.stderr)


def test_predict_into_a_folder_is_refused_before_scoring(
    baseline_run: Path, tmp_path: Path, test_images: Path, no_scoring: None
) -> None:
    args = ["predict", str(baseline_run), str(test_images), "--out", str(tmp_path)]
    assert f"--out {tmp_path}: is a folder" in one_line_error(CliRunner().invoke(app, args))


def test_a_header_only_sample_submission_is_refused(
    baseline_run: Path, tmp_path: Path, test_images: Path, no_scoring: None
) -> None:
    sample = tmp_path / "sample.csv"
    sample.write_text("id,label\n")
    out = tmp_path / "s.csv"
    args = ["predict", str(baseline_run), str(test_images), "--out", str(out), "--sample-submission", str(sample)]
    assert f"{sample}: lists no ids" in one_line_error(CliRunner().invoke(app, args))
    assert not out.exists()


def test_evaluate_into_a_file_is_one_line(baseline_run: Path, sample_store: Store, tmp_path: Path) -> None:
    out = tmp_path / "report"
    out.write_text("not a folder\n")
    args = ["evaluate", str(baseline_run), str(sample_store.path), "--out", str(out)]
    assert f"--out {out}: is a file" in one_line_error(CliRunner().invoke(app, args))


def test_a_bad_setting_in_a_runs_config_names_the_file(tmp_path: Path, test_images: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model: baseline-cnn\noptimizer: lbfgs\n")
    args = ["predict", str(run), str(test_images), "--out", str(tmp_path / "s.csv")]
    error = one_line_error(CliRunner().invoke(app, args))
    assert f"{run / 'config.yaml'}: " in error and "lbfgs" in error


def test_predict_refuses_the_training_store_once_it_has_changed(sample_store: Store, tmp_path: Path) -> None:
    """Another store is fine to predict on; the very store a run was trained on, changed since, is refused."""
    from histodetect.errors import StoreError
    from histodetect.runs.config import TrainConfig
    from histodetect.train.run import train

    copy = tmp_path / "store"
    shutil.copytree(sample_store.path, copy)
    run = tmp_path / "run"
    train(Store(copy), run, TrainConfig(epochs=1, batch_size=8, limit_train=8, patience=0, num_workers=0))
    assert len(predict([run], copy, tmp_path / "same.csv")) == 16
    assert len(predict([run], sample_store.path, tmp_path / "other.csv")) == 16  # another store: allowed
    index = pd.read_csv(copy / "index.csv", dtype=str, keep_default_na=False)
    index.loc[0, "label"] = "1" if index.loc[0, "label"] == "0" else "0"
    index.to_csv(copy / "index.csv", index=False)
    with pytest.raises(StoreError, match="is not the store") as caught:
        predict([run], copy, tmp_path / "changed.csv")
    assert str(copy) in str(caught.value) and not (tmp_path / "changed.csv").exists()


def test_the_engine_is_chosen_in_the_predictor_and_each_can_be_forced(
    baseline_run: Path, test_images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HISTODETECT_CACHE", str(tmp_path / "cache"))
    patches = open_source(test_images).patches[:]
    expected = Predictor([baseline_run], precision="fp32", engine="torch", progress=False).predict(patches)
    onnx = Predictor([baseline_run], engine="onnx", progress=False)
    assert onnx.engine == "onnx" and onnx.precision == "fp32"
    np.testing.assert_allclose(onnx.predict(patches), expected, atol=1e-5)
    (cached,) = (tmp_path / "cache" / "onnx").glob("*.onnx")  # the export is kept: the next start skips it
    stamp = cached.stat().st_mtime_ns
    np.testing.assert_allclose(Predictor([baseline_run], engine="onnx").predict(patches), expected, atol=1e-5)
    assert cached.stat().st_mtime_ns == stamp
    out = tmp_path / "cli.csv"
    result = CliRunner().invoke(app, ["predict", str(baseline_run), str(test_images), "--out", str(out), "--engine",
                                      "onnx"])  # fmt: skip
    assert result.exit_code == 0, result.output
    np.testing.assert_allclose(pd.read_csv(out, dtype={"id": str}).sort_values("id")["label"], expected, atol=1e-5)
    with pytest.raises(InferError, match="--engine 'tensorrt'"):
        Predictor([baseline_run], engine="tensorrt")
    with pytest.raises(InferError, match="--precision bf16 needs --engine torch"):
        Predictor([baseline_run], engine="onnx", precision="bf16")


def test_auto_runs_the_measured_engine_on_a_cpu_and_pytorch_where_bf16_is_asked_for() -> None:
    cpu = torch.device("cpu")
    assert _choose_engine("auto", cpu, "auto") == _choose_engine("auto", cpu, "fp32") == CPU_ENGINE != "torch"
    assert _choose_engine("auto", cpu, "bf16") == "torch"
    assert _choose_engine("auto", torch.device("cuda"), "auto") == "torch"
    assert _choose_engine("torch", cpu, "auto") == "torch" and _choose_engine("onnx", cpu, "fp32") == "onnx"
    with pytest.raises(InferError, match="runs on the CPU"):
        _choose_engine("onnx", torch.device("cuda"), "auto")
