"""Faults injected for real (killed drivers, damaged checkpoints, non-finite losses) and the
bad inputs that must give one line and exit code 2. Killed workers and actors mid-run are in
test_train.py (they compare against its uninterrupted run) and test_actor.py."""

import json
import multiprocessing
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vitcae_ray import checkpoints
from vitcae_ray.checkpoints import LocalCheckpoints
from vitcae_ray.checkpoints import load as load_state
from vitcae_ray.cli import main
from vitcae_ray.config import build_config
from vitcae_ray.engine import init_model
from vitcae_ray.freezing import rank_spread


@pytest.fixture(scope="module")
def small(tiny_config):
    return {**tiny_config, "train.batch_size": 32, "train.log_images": False, "loss.recon_weight": 10.0}


@pytest.fixture(scope="module")
def sets(small):
    return [f"--set={k}={v}" for k, v in small.items()]


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- bad input -----------------------------------------------------------------------------


@pytest.mark.ray
def test_address_with_no_cluster_is_one_line_exit_2(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "vitcae_ray.train",
            "--address",
            f"127.0.0.1:{_free_port()}",
            "--output",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "no Ray cluster answers at --address" in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.ray
def test_output_naming_a_file_is_one_line_exit_2_and_the_file_is_kept(tmp_path, capsys, own_stderr):
    from vitcae_ray.tune import main as tune_main

    path = tmp_path / "notes.txt"
    path.write_text("mine")
    assert main(["--num-workers", "0", "--output", str(path)]) == 2
    assert tune_main(["--output", str(path)]) == 2
    err = own_stderr(capsys.readouterr().err)
    assert len(err) == 2 and all(f"--output {path} is a file" in line for line in err)
    assert path.read_text() == "mine"


# --- seeding and the rank check ----------------------------------------------------------


def test_initial_weights_depend_on_train_seed_alone(small):
    cfg = build_config({**small, "train.seed": 3})
    first = init_model(cfg, 1, torch.device("cpu")).state_dict()
    torch.rand(100)  # whatever ran before (data loading, another model) draws differently
    again = init_model(cfg, 1, torch.device("cpu")).state_dict()
    other = init_model(build_config({**small, "train.seed": 4}), 1, torch.device("cpu")).state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["cls_token"], other["cls_token"])


def _spread_worker(rank: int, port: int, small: dict, results) -> None:
    import torch.distributed as dist

    from vitcae_ray.freezing import apply_frozen

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    model = init_model(build_config(small), 1, torch.device("cpu"))
    results[("same", rank)] = rank_spread(model, 2)
    if rank == 1:
        with torch.no_grad():
            model.cls_token.add_(1e-3)
    results[("weights", rank)] = rank_spread(model, 2)
    if rank == 1:
        with torch.no_grad():
            model.cls_token.sub_(1e-3)
        apply_frozen(model, [[0], []])
    results[("frozen", rank)] = rank_spread(model, 2)
    dist.destroy_process_group()


def test_rank_spread_sees_ranks_that_disagree(small):
    """``ddp/rank_spread`` on two gloo ranks: 0 when they agree, > 0 when one rank's weights
    or frozen set differ (in a run it is measured before DDP's re-wrap copies rank 0's)."""
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Manager().dict()
    port = _free_port()
    procs = [ctx.Process(target=_spread_worker, args=(r, port, small, results)) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    for case in ("same", "weights", "frozen"):
        assert results[(case, 0)] == results[(case, 1)], case
        assert (results[(case, 0)] == 0.0) == (case == "same"), case


# --- non-finite losses -------------------------------------------------------------------


@pytest.mark.ray
def test_non_finite_steps_are_skipped_up_to_the_bound_then_the_run_stops(tmp_path, capsys, monkeypatch, sets):
    """The fault, injected into the real loss: every 10th training step's loss is NaN (as a
    rare bad batch or overflow would make it). With a bound of 6 the 5 of epoch 0 are skipped
    and counted; the 2nd of epoch 1 passes the bound and stops the run."""
    import vitcae_ray.engine as engine

    calls = {"train": 0}

    def sometimes_nan(out, x, epoch, cfg, generator=None):
        terms = loss(out, x, epoch, cfg, generator=generator)
        if generator is None:  # a training step (validation passes its fixed generator)
            calls["train"] += 1
            if calls["train"] % 10 == 0:
                terms["loss"] = terms["loss"] * float("nan")
        return terms

    loss = engine.vitcae_loss
    monkeypatch.setattr(engine, "vitcae_loss", sometimes_nan)
    out = tmp_path / "run"
    code = main(
        [
            "--num-workers",
            "0",
            "--epochs",
            "4",
            "--output",
            str(out),
            *sets,
            "--set",
            "train.max_nonfinite_steps=6",
        ]
    )
    assert code == 1
    steps = 1617 // 32  # training steps an epoch: the 2nd NaN of epoch 1 is its step 19
    assert steps == 50
    assert (
        "non-finite loss at epoch 1 step 19 after 6 skipped non-finite steps (train.max_nonfinite_steps=6)"
    ) in capsys.readouterr().err
    history = _metrics(out)
    assert [m["train/nonfinite_steps"] for m in history] == [5]
    assert history[0]["train/samples"] == (steps - 5) * 32  # the skipped steps' images left out
    latest = LocalCheckpoints(str(out), "train", 2).latest()
    state = load_state(latest.path)
    assert state["epoch"] == 0  # the last good checkpoint; nothing was stepped with NaN
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_an_epoch_with_no_finite_step_stops_even_within_the_bound(small):
    from torch.utils.data import DataLoader, TensorDataset

    from vitcae_ray.engine import NonFiniteLossError, train_one_epoch
    from vitcae_ray.optim import build_lr_schedule, build_optimizer

    cfg = build_config(
        {
            **small,
            "loss.kl_warmup_epochs": 0,
            "loss.mmd_weight": float("nan"),
            "train.max_nonfinite_steps": 1000,
        }
    )
    model = init_model(cfg, 1, torch.device("cpu"))
    loader = DataLoader(TensorDataset(torch.rand(8, 1, 16, 16), torch.zeros(8)), batch_size=4)
    opt = build_optimizer(model, cfg.optim)
    sched = build_lr_schedule(opt, cfg.optim, 1, len(loader))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.set_readout(True)
    with pytest.raises(NonFiniteLossError, match="epoch 5 step 1, and at every step"):
        train_one_epoch(model, loader, opt, sched, 5, cfg, torch.device("cpu"), skips_left=1000)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# --- checkpoints -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, sets):
    out = tmp_path_factory.mktemp("local") / "run"
    args = [
        "--num-workers",
        "0",
        "--epochs",
        "2",
        "--output",
        str(out),
        *sets,
        "--set",
        "train.num_checkpoints=3",
    ]
    assert main(args) == 0
    return out, args


@pytest.mark.ray  # local_run trains in Ray Train's local mode
def test_a_checkpoint_cut_off_mid_write_never_becomes_latest(local_run, tmp_path):
    out, _ = local_run
    ckpts = LocalCheckpoints(str(out), "train", 3)
    assert Path(ckpts.latest().path).name == "checkpoint_epoch_0001"
    # what a kill leaves: the file cut off, its digest never written (in a copy under the
    # final name, as a filesystem without atomic rename would leave it)
    cut = out / "train" / "checkpoint_epoch_0002"
    cut.mkdir()
    data = (out / "train" / "checkpoint_epoch_0001" / checkpoints.CHECKPOINT_FILE).read_bytes()
    (cut / checkpoints.CHECKPOINT_FILE).write_bytes(data[: len(data) // 2])
    try:
        assert Path(ckpts.latest().path).name == "checkpoint_epoch_0001"
        assert checkpoints.latest_heads_state(str(out), "train") is not None
        with pytest.raises(
            checkpoints.CheckpointError, match="checkpoint_epoch_0002/checkpoint.pt is unreadable"
        ):
            load_state(cut)
    finally:
        (cut / checkpoints.CHECKPOINT_FILE).unlink()
        cut.rmdir()


@pytest.mark.ray  # local_run trains in Ray Train's local mode
def test_a_damaged_latest_checkpoint_is_named_and_nothing_is_written(local_run, capsys, own_stderr):
    out, args = local_run
    path = out / "train" / "checkpoint_epoch_0001" / checkpoints.CHECKPOINT_FILE
    good = path.read_bytes()
    damaged = bytearray(good)
    damaged[len(damaged) // 2] ^= 0xFF  # a flipped bit in the tensor data still unpickles
    path.write_bytes(bytes(damaged))
    before = (out / "metrics.jsonl").read_text()
    try:
        assert main([*args, "--epochs", "3"]) == 2
        err = own_stderr(capsys.readouterr().err)
        assert len(err) == 1 and f"checkpoint {path} is damaged" in err[0]
        assert (out / "metrics.jsonl").read_text() == before
        assert not (out / "train" / "checkpoint_epoch_0002").exists()
    finally:
        path.write_bytes(good)


def test_checkpoints_load_weights_only(tmp_path):
    # a pickle that would run code when loaded without weights_only
    torch.save({"model": {}, "hook": Path("x")}, tmp_path / checkpoints.CHECKPOINT_FILE)
    with pytest.raises(checkpoints.CheckpointError, match="unreadable .*weights_only|unreadable .*Weights"):
        load_state(tmp_path)


# --- killed drivers ------------------------------------------------------------------------


def _launch(cmd: list[str], log: Path, cwd: Path) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=cwd)


def _kill_at(proc: subprocess.Popen, count, lines: int, sig: int, timeout: float = 600) -> int:
    deadline = time.monotonic() + timeout
    while count() < lines:
        assert proc.poll() is None, "the run ended before the kill"
        assert time.monotonic() < deadline, "the run did not get far enough"
        time.sleep(0.2)
    proc.send_signal(sig)
    return proc.wait(timeout=300)


@pytest.mark.ray
def test_killed_local_driver_resumes_on_rerun(tmp_path, sets, metrics_lines):
    """Local mode (``--num-workers 0``): SIGKILL once epoch 1 is logged, whatever the
    checkpoint copy was doing; the same command resumes, and every epoch is logged once."""
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "vitcae_ray.train",
        "--num-workers",
        "0",
        "--epochs",
        "3",
        "--output",
        "run",
        *sets,
    ]
    proc = _launch(cmd, tmp_path / "1.log", tmp_path)
    assert _kill_at(proc, lambda: metrics_lines(out), 2, signal.SIGKILL) == -signal.SIGKILL
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr
    resumed = [line for line in proc.stdout.splitlines() if line.startswith("resuming from")]
    assert len(resumed) == 1 and resumed[0].endswith(("at epoch 2", "at epoch 3")), resumed
    assert [m["epoch"] for m in _metrics(out)] == [0, 1, 2]


def test_interrupted_and_killed_ray_drivers_and_tune_experiment_resume(
    ray_session, tmp_path, sets, metrics_lines
):
    """``python -m vitcae_ray.train`` on a Ray cluster: Ctrl-C (SIGINT) once epoch 1 is
    logged, then the same command, SIGKILL once epoch 2 is logged, then the same command
    again. ``python -m vitcae_ray.tune``: SIGKILL in the trial's first epochs,
    then the same command with ``--resume``. Both join the test's Ray with --address."""
    address = ray_session.get_runtime_context().gcs_address
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "vitcae_ray.train",
        "--address",
        address,
        "--num-workers",
        "1",
        "--epochs",
        "4",
        "--output",
        str(out),
        *sets,
        "--set",
        "train.cpus_per_worker=0.5",
    ]

    # Ctrl-C once epoch 1 is logged: epoch 0's checkpoint is then registered with Ray Train
    # (one uploaded but not yet registered when the driver stops is not the run's latest)
    assert (
        _kill_at(_launch(cmd, tmp_path / "1.log", tmp_path), lambda: metrics_lines(out), 2, signal.SIGINT)
        == 130
    )
    log = (tmp_path / "1.log").read_text().strip().splitlines()
    assert log[-1] == "interrupted: rerun the same command to continue from the last checkpoint"
    first = (out / "metrics.jsonl").read_text().splitlines()[0]  # its epoch time is unique
    proc = _launch(cmd, tmp_path / "2.log", tmp_path)
    assert _kill_at(proc, lambda: metrics_lines(out), 3, signal.SIGKILL) == -signal.SIGKILL
    assert (out / "metrics.jsonl").read_text().splitlines()[0] == first  # resumed, not redone
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "resuming from" in proc.stdout
    assert [m["epoch"] for m in _metrics(out)] == [0, 1, 2, 3]
    assert (out / "metrics.jsonl").read_text().splitlines()[0] == first

    exp = tmp_path / "exp"
    space = tmp_path / "space.yaml"
    space.write_text("optim.lr: {grid: [3.0e-3]}\n")
    tune = [
        sys.executable,
        "-m",
        "vitcae_ray.tune",
        "--address",
        address,
        "--space",
        str(space),
        "--num-samples",
        "1",
        "--max-epochs",
        "2",
        "--workers-per-trial",
        "1",
        "--output",
        str(exp),
        "--trial-driver-resource",
        "trial_driver",
        *sets,
        "--set",
        "train.cpus_per_worker=0.5",
    ]

    def trial_lines() -> int:
        return max((metrics_lines(p.parent) for p in exp.glob("trials/*/metrics.jsonl")), default=0)

    proc = _launch(tune, tmp_path / "tune.log", tmp_path)
    assert _kill_at(proc, trial_lines, 1, signal.SIGKILL) == -signal.SIGKILL
    proc = subprocess.run([*tune, "--resume"], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (trial,) = list(exp.glob("trials/*"))
    assert [m["epoch"] for m in _metrics(trial)] == [0, 1]
    assert "1 trials in" in proc.stdout
