"""Training end to end on the real sample store: every model family, freeze policy, loss and augmentation."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from histodetect.data.store import Store
from histodetect.models import create_model
from histodetect.runs import load_model
from histodetect.runs.config import ConfigError, TrainConfig
from histodetect.train.run import train

pytestmark = pytest.mark.slow  # every test trains a run or scores a slide with one (seconds each on 2 cores)

QUICK = dict(epochs=1, batch_size=8, limit_train=16, val_fraction=0.2, image_size=96, num_workers=0, patience=0)


def quick(**changes) -> TrainConfig:
    return TrainConfig(**{**QUICK, **changes})


@pytest.mark.parametrize(
    ("model", "pretrained", "freeze", "loss", "aug"),
    [
        ("baseline-cnn", "none", "none", "bce", {}),
        ("baseline-cnn", "none", "none", "focal", {"mixup": 0.4}),
        ("baseline-cnn", "none", "none", "bce", {"cutmix": 1.0, "label_smoothing": 0.1, "pos_weight": 1.5}),
        (
            "baseline-cnn",
            "none",
            "none",
            "focal",
            {
                "mixup": 0.4,
                "cutmix": 1.0,
                "aug_dihedral": False,
                "aug_hed": 0.0,
                "aug_brightness": 0.0,
                "aug_contrast": 0.0,
            },
        ),
        ("tf_efficientnet_lite0", "auto", "frozen", "bce", {}),
        ("tf_efficientnet_lite0", "auto", "top:2", "focal", {"cutmix": 1.0, "warmup_epochs": 0}),
        ("resnet50", "none", "frozen", "bce", {"optimizer": "sgd", "scheduler": "onecycle"}),
        ("resnet50", "none", "top:1", "focal", {"optimizer": "rmsprop", "warmup_epochs": 0}),
        (
            "efficientnet_b0",
            "none",
            "none",
            "bce",
            {"optimizer": "adam", "scheduler": "plateau", "mixup": 0.2},
        ),
        ("convnext_atto", "none", "top:1", "bce", {"warmup_epochs": 0, "lr_warmup_epochs": 0.5}),
    ],
)
def test_every_family_trains_a_step(sample_store: Store, tmp_path: Path, model, pretrained, freeze, loss, aug) -> None:
    summary = train(
        sample_store,
        tmp_path / "run",
        quick(model=model, pretrained=pretrained, freeze=freeze, loss=loss, **aug),
    )
    assert summary["epochs_run"] == 1
    assert np.isfinite(summary["best_val_auc"])
    for name in (
        "config.yaml",
        "model.safetensors",
        "metrics.csv",
        "split.csv",
        "summary.json",
        "curves.png",
        "checkpoints/last.ckpt",
        "checkpoints/best.ckpt",
    ):
        assert (tmp_path / "run" / name).exists(), name
    net, config = load_model(tmp_path / "run")
    assert config.model == model
    with torch.no_grad():
        out = net(torch.rand(2, 3, 96, 96))
    assert out.shape == (2,) and torch.isfinite(out).all()


def _backbone_state(net) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.backbone.state_dict().items() if v.dtype.is_floating_point}


def test_frozen_backbone_does_not_change(sample_store: Store, tmp_path: Path) -> None:
    before = _backbone_state(create_model("tf_efficientnet_lite0", pretrained="auto"))
    train(
        sample_store,
        tmp_path / "run",
        quick(model="tf_efficientnet_lite0", pretrained="auto", freeze="frozen", epochs=2),
    )
    after, _ = load_model(tmp_path / "run")
    changed = [k for k, v in _backbone_state(after).items() if not torch.equal(v, before[k])]
    assert changed == []  # weights and BatchNorm running statistics alike
    head_before = create_model("tf_efficientnet_lite0", pretrained="auto").head.state_dict()
    assert any(not torch.equal(v, head_before[k]) for k, v in after.head.state_dict().items())


def test_top_k_unfreezes_at_the_set_epoch(sample_store: Store, tmp_path: Path) -> None:
    train(
        sample_store,
        tmp_path / "run",
        quick(model="tf_efficientnet_lite0", pretrained="auto", freeze="top:1", warmup_epochs=1, epochs=2),
    )
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert metrics["backbone_trainable"].tolist()[0] == 0
    assert metrics["backbone_trainable"].tolist()[1] > 0


def test_existing_run_is_not_overwritten(sample_store: Store, tmp_path: Path) -> None:
    train(sample_store, tmp_path / "run", quick())
    with pytest.raises(ConfigError, match="--resume"):
        train(sample_store, tmp_path / "run", quick())


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import lightning as L
    from histodetect.data.store import Store
    from histodetect.runs.config import TrainConfig
    from histodetect.train.run import train

    class KillAt(L.Callback):
        def __init__(self, step):
            self.step = step
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == self.step:
                os.kill(os.getpid(), signal.SIGKILL)

    store, out, kill_at, resume = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
    config = TrainConfig(model="baseline-cnn", epochs=3, batch_size=16, limit_train=96, val_fraction=0.2,
                         patience=0, seed=7, mixup=0.2, dropout=0.3)
    train(Store(store), out, config, resume=resume, callbacks=[KillAt(kill_at)] if kill_at >= 0 else [])
    """
)


def test_resume_after_sigkill_matches_uninterrupted_run(sample_store: Store, tmp_path: Path) -> None:
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)

    def run(out: Path, kill_at: int, resume: bool) -> subprocess.CompletedProcess:
        return subprocess.run(
            [
                sys.executable,
                str(script),
                str(sample_store.path),
                str(out),
                str(kill_at),
                "1" if resume else "0",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )

    straight = run(tmp_path / "straight", -1, False)
    assert straight.returncode == 0, straight.stderr[-2000:]
    killed = run(tmp_path / "killed", 8, False)  # 6 steps per epoch: step 8 is in the middle of epoch 2
    assert killed.returncode == -9
    assert not (tmp_path / "killed" / "model.safetensors").exists()
    assert (tmp_path / "killed" / "checkpoints" / "last.ckpt").exists()
    resumed = run(tmp_path / "killed", -1, True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    assert len(pd.read_csv(tmp_path / "killed" / "metrics.csv")) == 3
    summary = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert summary["epochs_run"] == 3


class WorseEveryEpoch(L.Callback):
    """Makes every epoch after the first look worse on validation (it runs before the checkpoint callbacks)."""

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.callback_metrics["val_auc"] = torch.tensor(1.0 - 0.1 * trainer.current_epoch)


def test_last_checkpoint_follows_every_epoch_not_only_the_best(sample_store: Store, tmp_path: Path) -> None:
    """Resume must start after the last finished epoch, even when the best one was long before it."""
    train(sample_store, tmp_path / "run", quick(epochs=3), callbacks=[WorseEveryEpoch()])
    folder = tmp_path / "run" / "checkpoints"
    assert torch.load(folder / "best.ckpt", weights_only=True)["epoch"] == 0
    assert torch.load(folder / "last.ckpt", weights_only=True)["epoch"] == 2


DDP_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import lightning as L
    from histodetect.data.store import Store
    from histodetect.runs.config import TrainConfig
    from histodetect.train.run import train

    class RecordRows(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            path = Path(sys.argv[2] + f".rank{trainer.global_rank}.jsonl")
            with path.open("a") as fh:
                fh.write(json.dumps({"epoch": trainer.current_epoch, "rows": batch[2].tolist()}) + "\\n")

        def on_validation_end(self, trainer, pl_module):
            path = Path(sys.argv[2] + f".rank{trainer.global_rank}.val.jsonl")
            with path.open("a") as fh:
                fh.write(json.dumps(pl_module.validated_rows.tolist()) + "\\n")

    epoch_patches = int(sys.argv[3]) if sys.argv[3] != "all" else None
    # 23 validation patches: the sampler pads the two shares to 12 each with a repeated patch.
    config = TrainConfig(model="baseline-cnn", epochs=2, batch_size=8, limit_train=64, val_fraction=0.2,
                         val_patches=23, patience=0, accelerator="cpu", devices="2", strategy="ddp",
                         precision="32", epoch_patches=epoch_patches)
    train(Store(sys.argv[1]), sys.argv[2], config, callbacks=[RecordRows()])
    """
)


@pytest.mark.parametrize(("epoch_patches", "seen_in_epoch"), [("all", 64), ("32", 32)])
def test_ddp_two_cpu_processes_see_disjoint_data_and_save_once(
    sample_store: Store, tmp_path: Path, epoch_patches: str, seen_in_epoch: int
) -> None:
    """With ``epoch_patches`` the two processes share one epoch's draw between them, not one each; every epoch
    draws afresh (the sampler wrapper forwards set_epoch); validation counts each patch once."""
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, str(script), str(sample_store.path), str(out), epoch_patches],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    records = [
        [json.loads(line) for line in Path(f"{out}.rank{rank}.jsonl").read_text().splitlines()] for rank in (0, 1)
    ]
    seen = [
        [{row for r in records[rank] if r["epoch"] == epoch for row in r["rows"]} for epoch in (0, 1)]
        for rank in (0, 1)
    ]
    for epoch in (0, 1):
        assert seen[0][epoch] and seen[1][epoch]
        assert not seen[0][epoch] & seen[1][epoch]  # disjoint processes
        assert len(seen[0][epoch] | seen[1][epoch]) == seen_in_epoch
    assert seen[0][0] != seen[0][1] and seen[1][0] != seen[1][1]  # each epoch a new draw for each process
    split = pd.read_csv(out / "split.csv")
    assert (split["part"] == "train").sum() == 64
    for rank in (0, 1):
        validated = [json.loads(line) for line in Path(f"{out}.rank{rank}.val.jsonl").read_text().splitlines()]
        assert len(validated) == 2 and all(len(rows) == len(set(rows)) == 23 for rows in validated)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted(
        [
            "checkpoints",
            "config.yaml",
            "curves.png",
            "metrics.csv",
            "model.safetensors",
            "split.csv",
            "stain.json",
            "store.json",
            "summary.json",
        ]
    )


class FrozenBatchNormModes(L.Callback):
    """Records, at every training step, whether any BatchNorm with frozen weights is in training mode."""

    def __init__(self) -> None:
        self.training_frozen_bn: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.training_frozen_bn.append(
            sum(
                isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                and m.training
                and not any(p.requires_grad for p in m.parameters())
                for m in pl_module.model.modules()
            )
        )


def test_frozen_batchnorm_normalises_with_its_pretrained_statistics(sample_store: Store, tmp_path: Path) -> None:
    """A frozen BatchNorm in training mode would normalise by batch statistics in training and by running
    statistics in validation: the head would learn features it never sees again (validation AUC near 0.5)."""
    probe = FrozenBatchNormModes()
    train(
        sample_store,
        tmp_path / "run",
        quick(model="tf_efficientnet_lite0", pretrained="auto", freeze="top:1", warmup_epochs=1, epochs=2),
        callbacks=[probe],
    )
    assert probe.training_frozen_bn and all(n == 0 for n in probe.training_frozen_bn)


def test_cli_trains_a_run_and_refuses_a_weights_file_that_does_not_fit(sample_store: Store, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from histodetect.cli import app

    runner = CliRunner()
    ok = runner.invoke(
        app,
        [
            "train",
            str(sample_store.path),
            "--out",
            str(tmp_path / "run"),
            "--epochs",
            "1",
            "--batch-size",
            "16",
            "--limit-train",
            "32",
            "--no-aug-dihedral",
            "--optimizer",
            "sgd",
        ],
    )
    assert ok.exit_code == 0, ok.output
    saved = TrainConfig.load(tmp_path / "run" / "config.yaml")
    assert (saved.epochs, saved.batch_size, saved.aug_dihedral, saved.optimizer) == (1, 16, False, "sgd")
    again = runner.invoke(
        app,
        [
            "train",
            str(sample_store.path),
            "--out",
            str(tmp_path / "run2"),
            "--config",
            str(tmp_path / "run" / "config.yaml"),
            "--epochs",
            "1",
        ],
    )
    assert again.exit_code == 0, again.output
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint at all")
    refused = runner.invoke(
        app,
        [
            "train",
            str(sample_store.path),
            "--out",
            str(tmp_path / "run3"),
            "--model",
            "resnet18",
            "--pretrained",
            str(bad),
        ],
    )
    assert refused.exit_code == 2
    assert "bad.pth" in refused.output


def test_tensorboard_logger_writes_events_and_unknown_logger_is_refused(sample_store: Store, tmp_path: Path) -> None:
    train(sample_store, tmp_path / "run", quick(logger="csv,tensorboard"))
    assert list((tmp_path / "run" / "tensorboard").rglob("events.out.tfevents.*"))
    with pytest.raises(ConfigError, match="logger must be a comma list"):
        quick(logger="wandb")  # refused with the config, before train makes anything


def test_max_time_stops_cleanly_and_keeps_the_best_weights(sample_store: Store, tmp_path: Path) -> None:
    summary = train(sample_store, tmp_path / "run", quick(epochs=200, limit_train=None, max_time=0.25))
    assert summary["stopped_by"] == "max_time"
    assert 1 <= summary["epochs_run"] < 200
    net, _ = load_model(tmp_path / "run")  # the best epoch's weights, exported when the budget ran out
    assert net(torch.rand(1, 3, 96, 96)).shape == (1,)


def test_a_budget_that_runs_out_in_the_last_epoch_is_named(sample_store: Store, tmp_path: Path) -> None:
    summary = train(sample_store, tmp_path / "run", quick(epochs=1, limit_train=None, max_time=0.001))
    assert summary["stopped_by"] == "max_time"


class SeenRows(L.Callback):
    """The store rows each training epoch and each validation pass saw."""

    def __init__(self) -> None:
        self.train: dict[int, list[int]] = {}
        self.val: set[int] = set()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.train.setdefault(trainer.current_epoch, []).extend(batch[2].tolist())

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.val.update(batch[2].tolist())


def test_epoch_patches_and_val_patches_bound_an_epoch_on_a_large_store(sample_store: Store, tmp_path: Path) -> None:
    seen = SeenRows()
    summary = train(
        sample_store,
        tmp_path / "run",
        quick(limit_train=None, epochs=2, epoch_patches=40, val_patches=20),
        callbacks=[seen],
    )
    assert [len(rows) for rows in seen.train.values()] == [40, 40]  # whole batches of 8
    assert set(seen.train[0]) != set(seen.train[1])  # a fresh draw each epoch, not the same 40 patches
    split = pd.read_csv(tmp_path / "run" / "split.csv")
    held_out = set(sample_store.ids[list(seen.val)])
    assert len(seen.val) == 20 and held_out <= set(split.loc[split["part"] == "val", "id"])
    assert summary["n_val"] == 48 and summary["n_val_monitored"] == 20  # split.csv still lists every held-out patch
    labels = sample_store.labels[list(seen.val)]
    assert 6 <= labels.sum() <= 10  # stratified: the sample is 40% positive


def test_epoch_patches_beyond_the_split_changes_nothing(sample_store: Store, tmp_path: Path) -> None:
    seen = SeenRows()
    train(sample_store, tmp_path / "run", quick(limit_train=None, epoch_patches=10_000), callbacks=[seen])
    assert len(seen.train[0]) == 192  # 240 patches, 48 held out, 24 whole batches


def test_patch_limits_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="epoch_patches"):
        quick(epoch_patches=0)


def test_auto_image_size_is_resolved_in_the_summary_and_on_reload(sample_store: Store, tmp_path: Path) -> None:
    summary = train(sample_store, tmp_path / "run", quick(image_size="auto"))
    assert summary["image_size"] == 96  # the baseline CNN's own size
    net, config = load_model(tmp_path / "run")
    assert config.image_size == "auto" and net.image_size == 96


def test_compile_trains_and_saves_the_plain_networks_weights(sample_store: Store, tmp_path: Path) -> None:
    """``--compile`` wraps the network for speed; what is saved and reloaded is the network itself."""
    summary = train(sample_store, tmp_path / "run", quick(compile=True))
    assert np.isfinite(summary["best_val_auc"])
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(key.startswith("model.") for key in state) and not any("_orig_mod" in key for key in state)
    net, _ = load_model(tmp_path / "run")
    assert net(torch.rand(1, 3, 96, 96)).shape == (1,)


def test_a_test_split_is_seen_by_nothing_in_training(sample_store: Store, tmp_path: Path) -> None:
    seen = SeenRows()
    summary = train(sample_store, tmp_path / "run", quick(limit_train=None, test_fraction=0.2), callbacks=[seen])
    split = pd.read_csv(tmp_path / "run" / "split.csv", dtype={"id": str})
    test_ids = set(split.loc[split["part"] == "test", "id"])
    assert len(test_ids) == summary["n_test"] == 48
    assert 18 <= sample_store.labels[np.isin(sample_store.ids, list(test_ids))].sum() <= 20  # stratified: 40%
    touched = set(sample_store.ids[list(seen.val)]) | set(sample_store.ids[seen.train[0]])
    assert touched and not touched & test_ids
    assert summary["n_train"] + summary["n_val"] + summary["n_test"] == 240


def test_val_fraction_zero_keeps_the_last_epoch_and_says_so(sample_store: Store, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from histodetect.cli import app

    args = ["train", str(sample_store.path), "--out", str(tmp_path / "run"), "--val-fraction", "0", "--epochs", "2"]
    done = CliRunner().invoke(app, [*args, "--batch-size", "8", "--limit-train", "16", "--num-workers", "0"])
    assert done.exit_code == 0, done.output
    assert done.exception is None and "no validation: the last epoch's weights are kept" in " ".join(
        done.output.split()
    )
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["weights"] == "last_epoch" and summary["best_val_auc"] is None and summary["n_val"] == 0
    assert summary["epochs_run"] == 2
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    saved = load_file(tmp_path / "run" / "model.safetensors")
    assert all(torch.equal(saved[k.removeprefix("model.")], v) for k, v in last.items() if k.startswith("model."))


def test_resume_restores_the_split_and_refuses_another_store(sample_store: Store, tmp_path: Path) -> None:
    import shutil

    from histodetect.errors import StoreError

    train(sample_store, tmp_path / "run", quick())
    split_path = tmp_path / "run" / "split.csv"
    split = pd.read_csv(split_path, dtype={"id": str})
    moved = split.index[split["part"] == "val"][0]
    split.loc[moved, "part"] = "train"  # a split no fresh draw would give
    split.to_csv(split_path, index=False)
    written = split_path.read_text()
    summary = train(sample_store, tmp_path / "run", quick(), resume=True)
    assert split_path.read_text() == written  # restored, not drawn again
    assert summary["n_val"] == (split["part"] == "val").sum() == 47
    recorded = json.loads((tmp_path / "run" / "store.json").read_text())
    assert recorded["fingerprint"].startswith("sha256:") and summary["store_fingerprint"] == recorded["fingerprint"]

    changed = tmp_path / "changed"
    shutil.copytree(sample_store.path, changed)
    index = pd.read_csv(changed / "index.csv", dtype=str, keep_default_na=False)
    index.loc[0, "label"] = "1" if index.loc[0, "label"] == "0" else "0"
    index.to_csv(changed / "index.csv", index=False)
    with pytest.raises(StoreError, match=r"is not the store .* was trained on") as caught:
        train(Store(changed), tmp_path / "run", quick(), resume=True)
    assert str(changed) in str(caught.value) and str(sample_store.path.resolve()) in str(caught.value)
    assert split_path.read_text() == written
