"""One machine to a cluster: resource defaults and checks, paths from any directory, trial
capacity, failed trials, and the Parquet train split streamed with Ray Data."""

import math

import pyarrow.parquet as pq
import pytest

from vitcae_ray.cluster import settle_resources, trials_that_fit, wait_for_workers
from vitcae_ray.config import ConfigError, build_config, resolve
from vitcae_ray.tune import load_space, split_space


@pytest.fixture(scope="module")
def small(tiny_config):
    return {**tiny_config, "train.batch_size": 32, "train.log_images": False, "train.eval_every": 0}


# --- paths from any directory ------------------------------------------------------------


def test_shipped_spaces_and_configs_load_by_name_or_path_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("default", "small", "tune_spaces/small.yaml", "small.yaml"):
        space = load_space(name)
        assert "temperature.alpha" in space, name
    searched, fixed = split_space(load_space("small"))
    assert fixed == {"train.epochs": 6} and "train.epochs" not in searched
    for name in ("digits_tiny", "configs/digits_tiny.yaml"):
        assert resolve(name, {}, []).data.dataset == "digits"
    with pytest.raises(ConfigError, match=r"not found.*default, small"):
        load_space("nope")
    # a file of the current directory wins over a shipped one of the same name
    (tmp_path / "small.yaml").write_text("optim.lr: {choice: [0.001]}\n")
    assert list(load_space("small.yaml")) == ["optim.lr"]


def test_relative_local_paths_become_absolute_and_uris_stay(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = resolve(
        None,
        {"data.root": "data/faces", "train.output": "runs/x", "train.storage_path": "s3://bucket/ckpt"},
        [],
    )
    assert cfg.data.root == str(tmp_path / "data" / "faces")
    assert cfg.train.output == str(tmp_path / "runs" / "x")
    assert cfg.train.storage_path == "s3://bucket/ckpt"


# --- what the cluster holds ----------------------------------------------------------------


def test_packing_counts_whole_trials_per_node():
    nodes = [{"CPU": 8.0, "trial_driver": 64.0}, {"CPU": 4.0, "GPU": 1.0}, {"CPU": 4.0, "GPU": 1.0}]
    driver, gpu_worker = {"CPU": 0.25, "trial_driver": 1.0}, {"CPU": 1.0, "GPU": 1.0}
    assert trials_that_fit(nodes, driver, gpu_worker, 1) == 2
    assert trials_that_fit(nodes, driver, gpu_worker, 2) == 1
    assert trials_that_fit(nodes, driver, gpu_worker, 3) == 0
    assert trials_that_fit([{"CPU": 2.0}], {"CPU": 0.25}, {"CPU": 0.5}, 1) == 2


def test_auto_worker_cpus_fit_this_machine_and_too_much_is_one_line(ray_session):
    cpus = ray_session.cluster_resources()["CPU"]
    cfg = settle_resources(build_config({"train.num_workers": 2}))
    assert cfg.train.cpus_per_worker == cpus / 2
    trial = settle_resources(build_config({"train.num_workers": 1}), {"CPU": 0.25})
    assert trial.train.cpus_per_worker == min(cpus - 0.25, 0.75)  # trials side by side
    local = settle_resources(build_config({"train.num_workers": 0}))
    assert local.train.cpus_per_worker >= 1
    with pytest.raises(ConfigError) as err:
        settle_resources(build_config({"train.num_workers": 3, "train.cpus_per_worker": 1.0}))
    msg = str(err.value)
    assert "\n" not in msg and "3 Ray Train workers x {1 CPU}" in msg and f"{cpus:g} CPU" in msg


def test_an_infeasible_run_is_exit_2_before_anything_is_written(ray_session, tmp_path, capsys, own_stderr):
    from vitcae_ray.cli import main

    out = tmp_path / "run"
    code = main(
        [
            "--num-workers",
            "2",
            "--output",
            str(out),
            "--set",
            "train.cpus_per_worker=2",
            "--set",
            "train.worker_resource=accel",
        ]
    )
    ours = own_stderr(capsys.readouterr().err)
    assert code == 2 and len(ours) == 1 and "accel" in ours[0]
    assert not out.exists()


def test_waiting_for_workers_is_explicit_and_bounded(ray_session):
    """``train.wait_for_workers``: what the cluster already holds returns at once; more than
    it can hold returns at the timeout with what it holds, and a run that still does not fit
    is one line. Without the key nothing waits."""
    import time

    cpus = ray_session.cluster_resources()["CPU"]
    lines = []
    start = time.monotonic()
    assert (
        wait_for_workers(
            2, {"CPU": 0.25}, {"CPU": 0.5}, 1, timeout_s=60, log=lambda *a, **k: lines.append(a[0])
        )
        == 2
    )
    assert time.monotonic() - start < 10 and lines == []
    held = trials_that_fit([{"CPU": cpus}], None, {"CPU": 1.0}, 1)
    start = time.monotonic()
    got = wait_for_workers(
        held + 2, None, {"CPU": 1.0}, 1, timeout_s=3, log=lambda *a, **k: lines.append(a[0]), poll_s=0.5
    )
    assert got == held and 3 <= time.monotonic() - start < 30
    assert lines[0].startswith(f"waiting for {held + 2} workers x {{1 CPU}}: the cluster holds {held}")
    assert lines[-1].startswith(
        f"waited 3s (train.wait_timeout_s) for {held + 2} workers: going on with the {held}"
    )
    # a run that fits goes on after the wait; one that does not is a one-line error
    fits = settle_resources(
        build_config(
            {
                "train.num_workers": 1,
                "train.cpus_per_worker": 1.0,
                "train.wait_for_workers": held + 1,
                "train.wait_timeout_s": 1,
            }
        ),
        log=lambda *a, **k: None,
    )
    assert fits.train.cpus_per_worker == 1.0
    with pytest.raises(
        ConfigError, match=r"still do not fit .* after waiting train.wait_timeout_s=1s"
    ) as err:
        settle_resources(
            build_config(
                {
                    "train.num_workers": 3,
                    "train.cpus_per_worker": 1.0,
                    "train.wait_for_workers": 3,
                    "train.wait_timeout_s": 1,
                }
            ),
            log=lambda *a, **k: None,
        )
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"train.wait_for_workers=N") as err:
        settle_resources(build_config({"train.num_workers": 3, "train.cpus_per_worker": 1.0}))


# --- sweeps ---------------------------------------------------------------------------------


@pytest.mark.ray  # Tune
def test_a_sweep_refuses_a_shared_checkpoint_storage(tmp_path, small):
    from vitcae_ray.tune import run_sweep

    base = build_config({**small, "train.storage_path": str(tmp_path / "ckpt")})
    with pytest.raises(ConfigError, match="train.storage_path"):
        run_sweep(base, load_space("small"), str(tmp_path / "exp"), num_samples=1)
    assert not (tmp_path / "exp").exists()


def test_a_sweep_whose_trials_all_fail_is_reported_as_failed(ray_session, tmp_path, capsys, small):
    from vitcae_ray.tune import main

    space = tmp_path / "space.yaml"
    space.write_text("optim.lr: {grid: [1.0e-3]}\n")
    exp = tmp_path / "exp"
    # NaN loss weight: every trial stops at its first step; --metric val/mse must still work
    code = main(
        [
            "--space",
            str(space),
            "--output",
            str(exp),
            "--num-samples",
            "1",
            "--max-epochs",
            "2",
            "--metric",
            "val/mse",
            *[f"--set={k}={v}" for k, v in small.items()],
            "--set",
            "train.cpus_per_worker=0.5",
            "--set",
            "loss.recon_weight=nan",
        ]
    )
    captured = capsys.readouterr()
    assert code == 1 and "every trial failed" in captured.err
    # Tune's max_concurrent_trials: by default what fits the cluster at start
    fit = trials_that_fit([{"CPU": ray_session.cluster_resources()["CPU"]}], {"CPU": 0.25}, {"CPU": 0.5}, 1)
    assert f"trials at once: {fit} (the cluster holds {fit} now)" in captured.out
    assert (exp / "results.csv").is_file()
    table = pq.read_table(exp / "results.parquet").to_pylist()
    assert len(table) == 1 and all(r["status"] == "error" for r in table)
    assert all(math.isnan(r["best/val/mse"]) for r in table)
