"""Ray Tune sweeps over the trainer: ASHA, the results table, resume, bad spaces."""

import json
import math
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from torch.utils.data import DataLoader

import vitcae_ray
from vitcae_ray.config import build_config
from vitcae_ray.data import build_datasets
from vitcae_ray.engine import evaluate
from vitcae_ray.export import main as export_main
from vitcae_ray.tune import SpaceError, load_space, pareto_front, run_sweep


@pytest.fixture(scope="module")
def base_overrides(tiny_config):
    return {
        **tiny_config,
        "train.batch_size": 64,
        "train.log_images": False,
        "train.num_workers": 1,
        "train.cpus_per_worker": 0.5,
        "train.epochs": 3,
        "loss.recon_weight": 10.0,
    }


def _space(tmp_path, text):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return load_space(str(path))


@pytest.fixture(scope="module")
def smoke_sweep(ray_session, tmp_path_factory, base_overrides):
    """A 4-trial ASHA sweep: (Tune's results, the sweep's rows, the experiment directory)."""
    tmp = tmp_path_factory.mktemp("sweep")
    # the first trial learns; the next three barely move, so ASHA stops them at the first rung
    space = _space(
        tmp,
        "optim.lr: {grid: [3.0e-3, 1.0e-7, 2.0e-7, 3.0e-7]}\ntemperature.alpha: {loguniform: [1.0, 10.0]}\n",
    )
    base = build_config(base_overrides)
    results, rows = run_sweep(
        base,
        space,
        str(tmp / "exp"),
        num_samples=1,
        grace_period=1,
        reduction_factor=2,
        driver_resource="trial_driver",
    )
    return results, rows, tmp / "exp"


def test_smoke_sweep_asha_stops_trials_and_the_table_has_every_trial(smoke_sweep):
    results, rows, exp = smoke_sweep
    assert len(rows) == 4 and not results.errors
    by_lr = {r["optim.lr"]: r for r in rows}
    assert by_lr[3e-3]["status"] == "completed" and by_lr[3e-3]["epochs"] == 3
    stopped = [r for r in rows if r["status"] == "stopped"]
    assert stopped and all(r["epochs"] < 3 for r in stopped)
    # ASHA's clock is the epoch count each trial reports, not Tune's iteration counter; a
    # stopped trial's run may log one more epoch while the stop reaches it
    for result in results:
        m = result.metrics
        logged = next(r["epochs"] for r in rows if r["trial_id"] == m["trial_id"])
        assert m["epochs_done"] == m["epoch"] + 1
        assert m["epochs_done"] <= logged <= m["epochs_done"] + 1
    assert rows[0]["optim.lr"] == 3e-3  # sorted best first
    table = pq.read_table(exp / "results.parquet").to_pylist()
    assert [r["trial_id"] for r in table] == [r["trial_id"] for r in rows]
    for r in table:
        assert r["best/val/loss"] <= r["final/val/loss"] and r["epochs"] >= 1
        assert 1 <= r["temperature.alpha"] <= 10
    assert (exp / "results.csv").is_file()
    assert any(r["pareto"] for r in table)


def test_export_takes_the_best_trial_and_the_loaded_model_reproduces_its_val_loss(smoke_sweep, tmp_path):
    _, _, exp = smoke_sweep
    table = pq.read_table(exp / "results.parquet").to_pylist()
    out = tmp_path / "model"
    assert export_main(["--experiment", str(exp), "--out", str(out)]) == 0
    hparams = json.loads((out / "hparams.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert hparams["trial_id"] == table[0]["trial_id"] and hparams["optim.lr"] == 3e-3
    assert metrics["val/elbo"] == pytest.approx(table[0]["best/val/elbo"])
    model = vitcae_ray.load_pretrained(str(out))
    cfg = build_config(yaml.safe_load((out / "config.yaml").read_text()))
    _, val, _ = build_datasets(cfg.data)
    again = evaluate(
        model,
        DataLoader(val, batch_size=cfg.train.batch_size),
        metrics["epoch"],
        cfg,
        torch.device("cpu"),
        seed=cfg.train.seed,
    )
    assert again["val/elbo"] == pytest.approx(metrics["val/elbo"], rel=1e-4)
    assert again["val/mse"] == pytest.approx(metrics["val/mse"], rel=1e-4)


def test_top_k_export_takes_the_best_trials_and_bad_choices_write_nothing(smoke_sweep, tmp_path):
    _, _, exp = smoke_sweep
    table = pq.read_table(exp / "results.parquet").to_pylist()
    # the two best trials, as a top-k export
    assert export_main(["--experiment", str(exp), "--out", str(tmp_path / "top"), "--top-k", "2"]) == 0
    top = [json.loads((tmp_path / "top" / str(i) / "hparams.json").read_text())["trial_id"] for i in (1, 2)]
    assert top == [table[0]["trial_id"], table[1]["trial_id"]]
    for bad in (["--trial", "nope"], ["--metric", "val/nope"]):
        assert export_main(["--experiment", str(exp), "--out", str(tmp_path / "bad"), *bad]) == 2
    assert not (tmp_path / "bad").exists()


@pytest.mark.ray  # the Tune command line
def test_bad_space_fails_before_anything_starts(tmp_path):
    for text, key in [
        ("optim.lrr: {loguniform: [0.001, 0.1]}\n", "optim.lrr"),
        ("optim.lr: {lognormal: [0.001, 0.1]}\n", "optim.lr"),
        ("freeze.mode: {choice: [weights, sideways]}\n", "freeze.mode"),
        ("freeze.patience: {randint: [5, 2]}\n", "freeze.patience"),
    ]:
        with pytest.raises(SpaceError, match=key.replace(".", r"\.")):
            _space(tmp_path, text)
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim.lrr: {loguniform: [0.001, 0.1]}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "vitcae_ray.tune", "--space", str(bad), "--output", str(tmp_path / "exp")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "optim.lrr" in proc.stderr
    assert not (tmp_path / "exp").exists()


def test_pareto_front_marks_the_non_dominated_trials():
    points = [(1.0, 0.9), (2.0, 0.5), (1.5, 0.95), (3.0, 0.5), (math.nan, 0.1)]
    assert pareto_front(points) == [True, True, False, False, False]


def test_export_errors_are_one_line_and_write_nothing(tmp_path, capsys, own_stderr):
    from vitcae_ray.export import main as export

    out = tmp_path / "model"
    assert export(["--experiment", str(tmp_path / "none"), "--out", str(out)]) == 2
    err = own_stderr(capsys.readouterr().err)
    assert len(err) == 1 and "results.parquet" in err[0] and not out.exists()
    with pytest.raises(FileNotFoundError, match="model.pt"):
        vitcae_ray.load_pretrained(str(tmp_path))
