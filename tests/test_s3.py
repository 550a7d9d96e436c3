"""Everything on S3 (moto's S3 server in this process): Parquet data streamed to two workers
with Ray Data into a run directory on S3, an interrupted sweep on S3 resumed, export to S3
and ``load_pretrained`` from S3."""

import json
import os
import signal

import pytest
import torch
from torch.utils.data import DataLoader

import vitcae_ray
from vitcae_ray import filesystem
from vitcae_ray.config import build_config
from vitcae_ray.data import build_datasets
from vitcae_ray.data.streaming import streams
from vitcae_ray.data.to_parquet import main as to_parquet
from vitcae_ray.engine import evaluate
from vitcae_ray.export import main as export_main
from vitcae_ray.filesystem import join
from vitcae_ray.outputs import TRIALS_DIR
from vitcae_ray.train import run
from vitcae_ray.tune import load_space, run_sweep


@pytest.fixture(scope="module")
def small(tiny_config):
    return {
        **tiny_config,
        "train.batch_size": 32,
        "train.log_images": False,
        "train.eval_every": 0,
        "train.cpus_per_worker": 0.5,
    }


def _lines(uri: str, name: str) -> list[dict]:
    return [json.loads(line) for line in (filesystem.read_text(join(uri, name)) or "").splitlines()]


def _dirs(uri: str) -> list[str]:
    return filesystem.list_dirs(uri)


def test_parquet_on_s3_streams_to_two_workers_with_the_run_directory_on_s3(ray_session, s3, small):
    data = s3("digits-16")
    # 1,599 train rows: odd, and half of them rounded up (800) is a multiple of 32 (see below)
    assert (
        to_parquet(["--dataset", "digits", "--image-size", "16", "--val-fraction", "0.1102", "--out", data])
        == 0
    )
    base = {
        **small,
        "data.dataset": "parquet",
        "data.root": data,
        "train.num_workers": 2,
        "train.epochs": 1,
        "train.output": s3("runs/pq"),
    }
    assert streams(build_config(base).data)
    train_rows = sum(1 for _ in build_datasets(build_config(base).data)[0])
    # Ray Data splits the stream into equal shards of floor(rows / 2); a DataLoader with a
    # DistributedSampler would give each worker ceil(rows / 2). With an odd row count and a
    # batch size that divides ceil(rows / 2), the DataLoader path trains one more batch.
    half_up = -(-train_rows // 2)
    batch = 32
    assert train_rows % 2 and half_up % batch == 0
    cfg = build_config(base)
    run(cfg, verbose=False)
    out = cfg.train.output
    (first,) = _lines(out, "metrics.jsonl")
    assert first["train/samples"] == 2 * ((train_rows // 2) // batch * batch)
    assert first["train/samples"] != 2 * half_up  # what the DataLoader path trains on
    assert first["epochs_done"] == 1 and first["val/mse"] < 0.1
    assert _dirs(join(out, "train")) == ["checkpoint_epoch_0000"]
    assert filesystem.read_text(join(out, "config.yaml")) is not None


@pytest.mark.slow  # about 2.5 minutes: a two-trial sweep, its resume, an export
def test_sweep_on_s3_resumes_exports_to_s3_and_loads_from_s3(ray_session, s3, tmp_path, small):
    from ray import tune

    class InterruptAfterFirstTrial(tune.Callback):
        """Ctrl-C once (a marker file remembers it across the restore)."""

        def __init__(self, marker):
            self.marker = marker

        def on_trial_complete(self, iteration, trials, trial, **info):
            if not os.path.exists(self.marker):
                open(self.marker, "w").close()
                os.kill(os.getpid(), signal.SIGINT)

    space_file = tmp_path / "space.yaml"
    space_file.write_text("optim.lr: {grid: [3.0e-3, 2.0e-3]}\n")
    space = load_space(str(space_file))
    base = build_config({**small, "train.num_workers": 1, "train.epochs": 2})
    exp = s3("exp")
    try:
        run_sweep(
            base,
            space,
            exp,
            num_samples=1,
            grace_period=2,
            callbacks=[InterruptAfterFirstTrial(str(tmp_path / "interrupted"))],
            max_concurrent_trials=1,  # the second trial starts only after the first completes
        )
    except (KeyboardInterrupt, tune.TuneError):
        pass
    assert (tmp_path / "interrupted").exists()
    # interrupted as the first trial completed: it trained both epochs, the second none
    trials = join(exp, TRIALS_DIR)
    done = {t: [m["epoch"] for m in _lines(join(trials, t), "metrics.jsonl")] for t in _dirs(trials)}
    assert sorted(done.values()) in ([[0, 1]], [[], [0, 1]]), done
    _, rows = run_sweep(base, space, exp, num_samples=1, grace_period=2, resume=True)
    assert sorted(r["optim.lr"] for r in rows) == [2e-3, 3e-3]
    for r in rows:
        assert r["status"] == "completed"
        assert [m["epoch"] for m in _lines(r["run_dir"], "metrics.jsonl")] == [0, 1]
    assert filesystem.read_text(join(exp, "results.csv")) is not None

    model_uri = s3("best")
    assert export_main(["--experiment", exp, "--out", model_uri]) == 0
    metrics = json.loads(filesystem.read_text(join(model_uri, "metrics.json")))
    model = vitcae_ray.load_pretrained(model_uri)
    _, val, _ = build_datasets(base.data)
    again = evaluate(
        model,
        DataLoader(val, batch_size=32),
        metrics["epoch"],
        base,
        torch.device("cpu"),
        seed=base.train.seed,
    )
    assert again["val/elbo"] == pytest.approx(metrics["val/elbo"], rel=1e-4)
