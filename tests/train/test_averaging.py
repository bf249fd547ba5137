"""Weight averaging (--ema, --swa-epochs) on tiny baseline-cnn runs over the real sample store."""

from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from histodetect.data.store import Store
from histodetect.runs.config import ConfigError, TrainConfig, build_config
from histodetect.train.averaging import AveragedWeights, weight_averaging
from histodetect.train.run import train

pytestmark = pytest.mark.slow  # every test trains a run or scores a slide with one (seconds each on 2 cores)

QUICK = dict(batch_size=16, limit_train=64, val_fraction=0.2, num_workers=0, patience=0, precision="32", seed=3)


def quick(**changes) -> TrainConfig:
    return TrainConfig(**{**QUICK, **changes})


def checkpoint(run: Path, name: str = "last") -> dict:
    return torch.load(run / "checkpoints" / f"{name}.ckpt", weights_only=True)


def model_part(state: dict) -> dict[str, torch.Tensor]:
    return {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}


class StopAfterFirstEpoch(L.Callback):
    """Ends the run after epoch 0, as an interruption at an epoch boundary would."""

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        trainer.should_stop = True


class WeightsSeen(L.Callback):
    """The network's weights at each validation (after the averaging callback swapped its weights in) and at the
    end of each epoch's training (the raw weights)."""

    def __init__(self) -> None:
        self.validated: list[dict[str, torch.Tensor]] = []
        self.raw: dict[int, dict[str, torch.Tensor]] = {}

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == 0:
            self.validated.append({k: v.clone() for k, v in pl_module.model.state_dict().items()})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.raw[trainer.current_epoch] = {k: v.clone() for k, v in pl_module.model.state_dict().items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_ema_is_validated_and_saved_in_place_of_the_raw_weights(sample_store: Store, tmp_path: Path) -> None:
    seen = WeightsSeen()
    summary = train(sample_store, tmp_path / "run", quick(epochs=1, ema=0.9), callbacks=[seen])
    best = checkpoint(tmp_path / "run", "best")
    averaged, raw = model_part(best["state_dict"]), model_part(best["current_model_state"])
    assert int(best["averaging_state"]["n_averaged"]) == 4  # 64 patches in batches of 16: one update a step
    saved = load_file(tmp_path / "run" / "model.safetensors")
    assert_same(saved, averaged)
    assert_same(seen.validated[0], averaged)  # val_auc was measured on the averaged network
    assert any(not torch.equal(averaged[k], raw[k]) for k in averaged if averaged[k].is_floating_point())
    assert_same(seen.raw[0], raw)
    assert summary["best_val_auc"] is not None


class FinalWeights(L.Callback):
    """What training ended with: the network (after the averaging callback copied the average in) and the count."""

    def on_fit_end(self, trainer, pl_module) -> None:
        self.state = {k: v.clone() for k, v in pl_module.model.state_dict().items()}
        self.count = next(c for c in trainer.callbacks if isinstance(c, AveragedWeights)).count


def test_ema_resume_keeps_the_average_exactly(sample_store: Store, tmp_path: Path) -> None:
    config = quick(epochs=2, ema=0.8, mixup=0.2, dropout=0.3)
    straight, resumed = FinalWeights(), FinalWeights()
    train(sample_store, tmp_path / "straight", config, callbacks=[straight])
    train(sample_store, tmp_path / "split", config, callbacks=[StopAfterFirstEpoch()])
    assert int(checkpoint(tmp_path / "split")["averaging_state"]["n_averaged"]) == 4
    train(sample_store, tmp_path / "split", config, resume=True, callbacks=[resumed])
    assert straight.count == resumed.count == 8
    assert_same(straight.state, resumed.state)
    saved = [load_file(tmp_path / run / "model.safetensors") for run in ("straight", "split")]
    assert_same(*saved)


def floats(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if v.is_floating_point()}


def test_swa_averages_the_last_epochs_equally(sample_store: Store, tmp_path: Path) -> None:
    seen, final = WeightsSeen(), FinalWeights()
    train(sample_store, tmp_path / "run", quick(epochs=3, swa_epochs=2, lr=3e-3), callbacks=[seen, final])
    assert final.count == 2
    expected = {k: (seen.raw[1][k] + seen.raw[2][k]) / 2 for k in floats(final.state)}
    assert_same(floats(final.state), expected)
    assert_same(seen.validated[0], seen.raw[0])  # before the window: the weights being trained
    assert_same(floats(seen.validated[1]), floats(seen.raw[1]))  # one snapshot: epoch 1's weights
    assert_same(floats(seen.validated[2]), expected)  # the last epoch is validated with itself in the average


def test_swa_resume_does_not_count_an_epoch_twice(sample_store: Store, tmp_path: Path) -> None:
    config = quick(epochs=2, swa_epochs=2)
    straight, resumed = FinalWeights(), FinalWeights()
    train(sample_store, tmp_path / "straight", config, callbacks=[straight])
    train(sample_store, tmp_path / "split", config, callbacks=[StopAfterFirstEpoch()])
    train(sample_store, tmp_path / "split", config, resume=True, callbacks=[resumed])
    assert straight.count == resumed.count == 2
    assert_same(straight.state, resumed.state)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"ema": 1.0}, "ema must be"),
        ({"swa_epochs": 5, "epochs": 3}, "swa_epochs must be"),
        ({"ema": 0.99, "swa_epochs": 1}, "choose one"),
    ],
)
def test_bad_averaging_settings_are_refused(changes, message) -> None:
    with pytest.raises(ConfigError, match=message):
        quick(**changes)


def test_ema_zero_turns_off_a_presets_average_so_swa_can_replace_it() -> None:
    assert build_config(preset="cpu").ema == 0.995
    config = build_config(preset="cpu", ema=0.0, swa_epochs=3)
    averaging = weight_averaging(config)
    assert averaging is not None and averaging.ema is None and averaging.swa_start == config.epochs - 3
    with pytest.raises(ConfigError, match="--ema 0"):
        build_config(preset="cpu", swa_epochs=3)
