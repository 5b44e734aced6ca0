"""The training loop logs the loss by noise level beside the loss, and prints the loss-weight audit of its flags at
the start (tiny SD 1.5-style UNet, CPU, seconds)."""

import pytest

from diffusers_ztsnr.training.unet import main
from tests.train_utils import RES, tiny_assets

pytestmark = pytest.mark.usefixtures("quiet_loading")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tiny_assets(tmp_path_factory.mktemp("by_noise"), "sd15")


def run(assets, out, *extra):
    return main([
        "--pretrained_model_name_or_path", str(assets["sd15"]), "--train_data_dir", str(assets["data"]),
        "--resolution", str(RES), "--train_batch_size", "4", "--max_train_steps", "3", "--center_crop",
        "--output_dir", str(out), "--learning_rate", "1e-2", "--rank", "4", "--report_to", "none",
        "--prediction_type", "v_prediction", "--zero_terminal_snr", *extra,
    ])


def test_the_tracker_gets_the_loss_by_noise_level(assets, tmp_path, monkeypatch):
    """Every optimizer step logs, beside the loss, the mean loss of the samples in each tenth of the noise range
    they fell in; the loss is their sample-weighted mean, so it lies between the smallest and largest."""
    from accelerate import Accelerator

    logged = []
    monkeypatch.setattr(Accelerator, "log", lambda self, values, step=None, **kw: logged.append((step, values)))
    result = run(assets, tmp_path / "a")
    assert [step for step, _ in logged] == [1, 2, 3]
    for (_, values), loss in zip(logged, result["losses"], strict=True):
        bins = {k: v for k, v in values.items() if k.startswith("loss_by_noise/")}
        assert 1 <= len(bins) <= 4  # a batch of 4 samples
        assert values["loss"] == pytest.approx(loss)
        assert min(bins.values()) - 1e-6 <= loss <= max(bins.values()) + 1e-6


def test_a_run_prints_its_weight_audit_and_logs_its_warnings(assets, tmp_path, capsys, caplog):
    run(assets, tmp_path / "out", "--snr_gamma", "5", "--max_train_steps", "1")
    out = capsys.readouterr().out
    assert "effective loss weight in x0 space per log-SNR bin" in out and "SNR 0 (pure noise)" in out
    assert any("loss weighting: the effective x0 weight at SNR 0 is zero" in r.getMessage() for r in caplog.records)
