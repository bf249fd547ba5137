"""``--model hf-hub:ORG/NAME`` on a machine that cannot reach the Hugging Face hub: one actionable line."""

from pathlib import Path

import huggingface_hub.constants
import pytest

from histodetect.data.store import Store
from histodetect.errors import ModelError
from histodetect.models import create_model


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No hub and an empty cache, as on a machine without network (offline mode fails at once, without the
    client's retries)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))


@pytest.mark.parametrize("pretrained", ["auto", "none"])
def test_unreachable_hub_is_one_line_pointing_to_a_local_file(offline: None, pretrained: str) -> None:
    with pytest.raises(ModelError) as raised:
        create_model("hf-hub:MahmoodLab/UNI", pretrained=pretrained)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith("hf-hub:MahmoodLab/UNI: the Hugging Face hub cannot be reached")
    assert "--pretrained FILE" in message


def test_cli_train_says_so_and_exits_2(offline: None, sample_store: Store, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from histodetect.cli import app

    args = ["train", str(sample_store.path), "--out", str(tmp_path / "run"), "--model", "hf-hub:bioptimus/H-optimus-0"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert "hub cannot be reached" in result.output and "Traceback" not in result.output
