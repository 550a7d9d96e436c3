"""End-to-end training through Ray Train on the embedded digits data."""

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from vitcae_ray.checkpoints import load as load_state
from vitcae_ray.checkpoints import model_from_state
from vitcae_ray.cli import main
from vitcae_ray.config import Config, build_config
from vitcae_ray.train import run

pytestmark = pytest.mark.ray  # every test runs the trainer (Ray Train, local mode included)


@pytest.fixture(scope="module")
def small(tiny_config):
    # A small model and 16x16 images keep a 2-worker epoch to a few seconds on 2 cores.
    return {
        **tiny_config,
        "train.batch_size": 32,
        "train.num_image_samples": 8,
        "loss.recon_weight": 10.0,
    }


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# every head (and block) qualifies at epoch 1; the cap freezes half of each layer then (split
# layers under DDP, no whole block); the resumed run lifts the cap, so every head and then
# both blocks freeze (a no-grad prefix of the whole encoder)
FREEZE = {
    "freeze.min_epoch": 1,
    "freeze.patience": 1,
    "freeze.kappa_window": 1,
    "freeze.drift_ratio": 1e6,
    "freeze.block_ratio": 1e6,
    "freeze.max_frozen_frac": 0.5,
}
TWO_WORKERS = {
    **FREEZE,
    "train.epochs": 5,
    "train.num_workers": 2,
    "train.cpus_per_worker": 0.5,
    "train.eval_every": 2,
}
# what a run decides and learns: equal between an uninterrupted and a restarted run
DETERMINED = (
    "train/loss",
    "train/kl",
    "val/elbo",
    "val/mse",
    "heads/frozen",
    "heads/newly_frozen",
    "freeze/mean_drift",
    "flops/epoch",
    "comm/grad_elements",
)


@pytest.fixture(scope="module")
def two_worker_run(ray_session, tmp_path_factory, small):
    """An uninterrupted 2-worker run: (config, run directory, its metrics and heads table as
    they were when it finished)."""
    import os

    tmp = tmp_path_factory.mktemp("two_workers")
    cwd = os.getcwd()
    os.chdir(tmp)  # a relative --output (as in the README) is the caller's directory
    try:
        cfg = build_config({**small, **TWO_WORKERS, "train.output": "run"})
        result = run(cfg, verbose=False)
    finally:
        os.chdir(cwd)
    assert result.error is None
    out = tmp / "run"
    return cfg, out, _metrics(out), pq.read_table(out / "heads.parquet").to_pylist()


def test_two_worker_run_learns_and_logs_every_epoch(two_worker_run):
    _, out, history, _ = two_worker_run
    assert [m["epoch"] for m in history] == [0, 1, 2, 3, 4]
    assert history[-1]["val/mse"] < history[0]["val/mse"]
    for key in (
        "train/loss",
        "train/recon",
        "train/prior_recon",
        "train/kl",
        "train/mmd",
        "val/loss",
        "val/elbo",
        "val/mse",
        "val/psnr",
        "time/epoch_s",
        "throughput/images_per_s",
    ):
        assert all(key in m for m in history), key
    # the paper's tasks every train.eval_every epochs and at the last one
    evaluated = [m["epoch"] for m in history if "val/probe_acc" in m]
    assert evaluated == [1, 3, 4]
    assert all(0 < history[e]["val/probe_acc"] <= 1 and history[e]["val/fid"] > 0 for e in evaluated)
    # both workers' samples are counted: the train split (1617 images) less the dropped tails
    assert history[0]["train/samples"] > 1500
    assert (out / "config.yaml").is_file()


def test_two_worker_run_writes_tensorboard_images_and_checkpoints(two_worker_run, tb_tags):
    _, out, _, _ = two_worker_run
    tb = tb_tags(out / "tb")
    assert tb["val/mse"] == [0, 1, 2, 3, 4] and tb["reconstructions"] == [0, 1, 2, 3, 4]
    assert "samples" in tb
    assert tb["inpainting"] == tb["interpolation"] == [1, 3, 4]
    assert (out / "inpainting.png").is_file() and (out / "interpolation.png").is_file()
    ckpts = sorted((out / "train").glob("checkpoint_epoch_*"))
    assert ckpts and (ckpts[-1] / "checkpoint.pt").is_file()


def test_heads_freeze_mid_run_identically_on_both_ranks_and_the_step_gets_cheaper(two_worker_run):
    _, _, history, _ = two_worker_run
    total = 2 * 2  # depth x heads of the small model
    assert [m["heads/frozen"] for m in history] == [0, 0, 2, 2, 2]
    assert all(m["heads/total"] == total for m in history)
    assert all(m["ddp/rank_spread"] == 0.0 for m in history)
    assert history[2]["comm/grad_elements"] < history[1]["comm/grad_elements"]
    # FLOPs as run: nothing frozen at epoch 1, so nothing saved (the readout and probe are
    # counted in both the run and its baseline); the freeze cuts the step; the MMD terms join
    # after the KL warm-up (epochs 0-2)
    assert history[1]["flops/saved_frac"] == 0.0 < history[2]["flops/saved_frac"]
    assert history[2]["flops/train_step"] < history[1]["flops/train_step"]
    assert history[3]["flops/epoch_unfrozen"] > history[2]["flops/epoch_unfrozen"]
    cumulative = 1 - sum(m["flops/epoch"] for m in history) / sum(m["flops/epoch_unfrozen"] for m in history)
    assert history[4]["flops/cumulative_saved_frac"] == pytest.approx(cumulative)


def test_heads_table_and_tensorboard_hold_every_head_of_every_epoch(two_worker_run, tb_tags):
    _, out, _, _ = two_worker_run
    total = 2 * 2  # depth x heads of the small model
    table = pq.read_table(out / "heads.parquet").to_pylist()
    assert len(table) == 5 * total
    frozen_rows = [r for r in table if r["epoch"] == 4 and r["frozen"]]
    assert len(frozen_rows) == 2 and all(r["frozen_epoch"] == 1 for r in frozen_rows)
    assert {"heads/drift_w1", "heads/tau_effective", "heads/frozen"} <= set(tb_tags(out / "tb"))


# The tests above read the run directory as the uninterrupted run left it; the ones that use
# ``resumed_run`` continue that run in the same directory, so they come after them.


@pytest.fixture(scope="module")
def resumed_run(two_worker_run):
    """The same run rerun with more epochs (7) and the freezing cap lifted: (the latest
    checkpoint's state before the rerun, the metrics after it, the latest state after it)."""
    cfg, out, _, _ = two_worker_run
    before = load_state(sorted((out / "train").glob("checkpoint_epoch_*"))[-1])
    more = build_config(
        {
            **cfg.to_dict(),
            "train": {**cfg.to_dict()["train"], "epochs": 7, "output": str(out)},
            "freeze": {**cfg.to_dict()["freeze"], "max_frozen_frac": 1.0},
        }
    )
    result = run(more, verbose=False)
    assert result.error is None
    state = load_state(sorted((out / "train").glob("checkpoint_epoch_*"))[-1])
    return before, _metrics(out), state


def test_rerunning_with_more_epochs_resumes_at_epoch_5_with_the_history_intact(
    two_worker_run, resumed_run, tb_tags
):
    _, out, history, _ = two_worker_run
    _, resumed, state = resumed_run
    assert [m["epoch"] for m in resumed] == list(range(7))
    assert resumed[:5] == history
    assert state["epoch"] == 6 and [m["epoch"] for m in state["history"]] == list(range(7))
    assert tb_tags(out / "tb")["val/mse"][-2:] == [5, 6]


def test_the_resumed_run_restores_the_frozen_heads_then_freezes_the_rest(resumed_run):
    before, resumed, state = resumed_run
    # the resumed run restored the frozen set and the frozen heads' temperatures and weights,
    # then froze the rest and both blocks: epoch 6 trained with the whole encoder frozen
    # (a no-grad prefix), ranks still in agreement
    assert [m["heads/frozen"] for m in resumed[5:]] == [2, 4]
    assert [m["blocks/frozen"] for m in resumed] == [0] * 6 + [2]
    assert before["frozen_blocks"] == 0 and state["frozen_blocks"] == 2
    assert state["frozen_heads"] == [[0, 1], [0, 1]]
    assert all(m["ddp/rank_spread"] == 0.0 for m in resumed)
    assert resumed[6]["comm/grad_elements"] < resumed[5]["comm/grad_elements"]
    assert resumed[6]["flops/train_step"] < resumed[5]["flops/train_step"]
    # epoch 6 read the prefix's output from the cache, which ran it once for each image each
    # rank saw (half the samples; the first epoch of that prefix)
    assert [m["cache/prefix_images"] for m in resumed[5:]] == [0, resumed[6]["train/samples"] // 2]
    assert resumed[5]["cache/mb"] == 0 < resumed[6]["cache/mb"]
    for layer, heads in enumerate(before["frozen_heads"]):
        prefix = f"blocks.{layer}.attn."
        for h in heads:
            for name in ("weight", "bias", "tau"):
                key = f"{prefix}heads.{h}.{name}"
                assert torch.equal(state["model"][key], before["model"][key]), key
            assert torch.equal(
                state["model"][prefix + "tau_factor"][h], before["model"][prefix + "tau_factor"][h]
            )
    # the optimizer state is keyed by name: nothing of the frozen encoder has any, the decoder does
    names = set(state["optimizer"]["state"])
    assert not any(n.startswith(("blocks.", "patch_embed.", "cls_token", "pos_embed")) for n in names)
    assert "dec_blocks.0.attn.heads.0.weight" in names


def test_the_checkpoint_alone_rebuilds_the_model(resumed_run):
    _, _, state = resumed_run
    model = model_from_state(state)
    x = torch.rand(2, 1, 16, 16)
    assert model(x, sample=False).recon.shape == x.shape


def test_killed_worker_and_actor_change_nothing(two_worker_run, tmp_path, make_killer, tb_tags):
    """SIGKILL of a Ray Train worker (found through Ray's state API) once epoch 1 is logged,
    and of the head-convergence actor once epoch 3 is: the run restarts its workers from the
    latest checkpoint, the actor comes back with that checkpoint's head state, and the result
    equals the uninterrupted run's exactly (every RNG is seeded per epoch and rank, and the
    checkpoint holds the whole state)."""
    cfg, _, reference, ref_heads = two_worker_run
    out = tmp_path / "run"
    killer = make_killer(out, [(2, "RayTrainWorker"), (4, "HeadConvergenceActor")])
    killer.start()
    try:
        result = run(
            build_config(
                {**cfg.to_dict(), "train": {**cfg.to_dict()["train"], "output": str(out), "max_failures": 2}}
            ),
            verbose=False,
        )
    finally:
        killer.join_all()
    assert [k[1] for k in killer.killed] == ["RayTrainWorker", "HeadConvergenceActor"]
    assert result.error is None
    history = _metrics(out)
    assert [m["epoch"] for m in history] == [0, 1, 2, 3, 4]  # one line per epoch
    for key in DETERMINED:
        assert [m[key] for m in history] == [m[key] for m in reference], key
    # frozen sets, temperature factors, drift and kappa of every (epoch, layer, head)
    assert pq.read_table(out / "heads.parquet").to_pylist() == ref_heads
    assert tb_tags(out / "tb")["val/mse"] == [0, 1, 2, 3, 4]


def _local(small: dict, out: Path, **overrides) -> Config:
    """A run in Ray Train's local mode (no Ray), no images, writing to ``out``."""
    base = {"train.num_workers": 0, "train.cpus_per_worker": 1.0, "train.log_images": False}
    return build_config({**small, **base, **overrides, "train.output": str(out)})


def test_local_mode_resume_after_a_crash_replays_the_same_epoch(tmp_path, small):
    out = tmp_path / "run"
    cfg = _local(small, out, **{"train.epochs": 3, "train.num_checkpoints": 3})
    run(cfg, verbose=False)
    straight = _metrics(out)
    # a crash during epoch 2: its checkpoint never appeared, its metrics line did
    shutil.rmtree(out / "train" / "checkpoint_epoch_0002")
    run(cfg, verbose=False)
    resumed = _metrics(out)
    assert [m["epoch"] for m in resumed] == [0, 1, 2]
    assert resumed[:2] == straight[:2]
    for key in ("train/loss", "val/loss", "val/mse"):
        assert resumed[2][key] == pytest.approx(straight[2][key], rel=1e-5), key


def test_a_masked_training_run_counts_its_cheaper_steps_in_both_arms(tmp_path, small):
    """``loss.mask_prob`` through the trainer (local mode): some steps are masked, each is
    counted at its own token count, and with nothing frozen the run and its no-freezing
    baseline cost the same."""
    out = tmp_path / "masked"
    overrides = {"train.eval_every": 0, "train.epochs": 2, "freeze.enabled": False, "loss.mask_prob": 0.5}
    cfg = _local(small, out, **overrides)
    run(cfg, verbose=False)
    plain_out = tmp_path / "plain"
    run(
        replace(cfg, loss=replace(cfg.loss, mask_prob=0.0), train=replace(cfg.train, output=str(plain_out))),
        verbose=False,
    )
    masked, plain = _metrics(out), _metrics(plain_out)
    assert [m["epoch"] for m in masked] == [0, 1] and all("train/masked_steps" not in m for m in plain)
    for m, p in zip(masked, plain):
        assert 0 < m["train/masked_steps"] and m["train/samples"] == p["train/samples"]
        assert m["flops/epoch"] == m["flops/epoch_unfrozen"] and m["flops/saved_frac"] == 0.0
        # the same steps, some of them on fewer tokens: cheaper than the unmasked run's
        assert m["flops/epoch"] < p["flops/epoch"]


def test_non_finite_loss_stops_with_epoch_and_step_and_keeps_checkpoint(tmp_path, capsys, small):
    out = tmp_path / "nan"
    # the MMD term (weight NaN) enters at epoch 1, after one good epoch and its checkpoint
    code = main(
        [
            "--num-workers",
            "0",
            "--epochs",
            "3",
            "--output",
            str(out),
            *[f"--set={k}={v}" for k, v in small.items()],
            "--set",
            "train.log_images=false",
            "--set",
            "loss.kl_warmup_epochs=1",
            "--set",
            "loss.mmd_weight=nan",
        ]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert "non-finite loss at epoch 1 step 0" in err
    assert [m["epoch"] for m in _metrics(out)] == [0]
    ckpts = sorted((out / "train").glob("checkpoint_epoch_*"))
    assert [c.name for c in ckpts] == ["checkpoint_epoch_0000"]
    assert torch.isfinite(load_state(ckpts[0])["model"]["cls_token"]).all()


def test_changed_settings_on_an_existing_run_are_refused_without_touching_it(tmp_path, small):
    out = tmp_path / "run"
    args = [
        "--num-workers",
        "0",
        "--epochs",
        "1",
        "--output",
        str(out),
        *[f"--set={k}={v}" for k, v in small.items()],
        "--set",
        "train.log_images=false",
    ]
    assert main(args) == 0
    before = (out / "config.yaml").read_text(), (out / "metrics.jsonl").read_text()
    proc = subprocess.run(
        [sys.executable, "-m", "vitcae_ray.train", *args, "--set", "model.depth=3"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "model.depth" in proc.stderr
    assert ((out / "config.yaml").read_text(), (out / "metrics.jsonl").read_text()) == before


def test_bad_dataset_root_is_exit_2_one_line(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "vitcae_ray.train",
            "--dataset",
            "cifar10",
            "--data-root",
            str(tmp_path / "nowhere"),
            "--output",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "--data-root" in proc.stderr


def test_vitvae_trains_through_the_same_command_and_select_metric_ranks_checkpoints(tmp_path, small):
    out = tmp_path / "vitvae"
    args = ["--num-workers", "0", "--epochs", "3", "--output", str(out)]
    sets = {
        **small,
        "model.variant": "vitvae",
        "train.select_metric": "val/mse",
        "train.num_checkpoints": 1,
        "train.log_images": False,
        "train.eval_every": 0,
    }
    assert main([*args, *[f"--set={k}={v}" for k, v in sets.items()]]) == 0
    history = _metrics(out)
    assert [m["epoch"] for m in history] == [0, 1, 2]
    assert all(m["val/kl_cls"] == 0 and m["val/discrepancy"] == 0 for m in history)
    assert all(m["train/prior_recon"] == 0 and torch.isfinite(torch.tensor(m["val/elbo"])) for m in history)
    # kept: the best by val/mse and the latest
    best = min(history, key=lambda m: m["val/mse"])["epoch"]
    kept = sorted(int(c.name[-4:]) for c in (out / "train").glob("checkpoint_epoch_*"))
    assert kept == sorted({best, 2})
    model = model_from_state(load_state(out / "train" / f"checkpoint_epoch_{kept[-1]:04d}"))
    assert model.cfg.variant == "vitvae" and not model.has_z_cls
    assert model.representation(torch.rand(2, 1, 16, 16)).shape == (2, model.cfg.embed_dim)


def test_summary_names_the_best_checkpoint_by_the_select_metric():
    from types import SimpleNamespace

    from vitcae_ray.cli import summary

    def ckpt(path, epoch, elbo, mse):
        return SimpleNamespace(path=path), {"epoch": epoch, "val/elbo": elbo, "val/mse": mse}

    best = [ckpt("a", 0, -10.0, 0.02), ckpt("b", 1, -5.0, 0.01)]
    final = {"epoch": 1, "val/elbo": -5.0, "val/mse": 0.01, "val/psnr": 20.0}
    result = SimpleNamespace(metrics=final, best_checkpoints=best)
    by_elbo = summary(result, build_config({"train.epochs": 2}), 1.0)
    by_mse = summary(result, build_config({"train.epochs": 2, "train.select_metric": "val/mse"}), 1.0)
    assert "best val/elbo -10 at epoch 1: a" in by_elbo
    assert "best val/mse 0.01 at epoch 2: b" in by_mse
    assert "freezing" not in by_elbo
    final.update(
        {"heads/frozen": 3, "heads/newly_frozen": 1, "heads/total": 16, "flops/cumulative_saved_frac": 0.1234}
    )
    lines = summary(result, build_config({"train.epochs": 2}), 1.0)
    assert "freezing: 4/16 heads frozen; FLOPs saved 12.3% against the same run without freezing" in lines


def test_validation_shards_hold_every_image_once_so_the_metrics_ignore_the_worker_count():
    """Each rank validates every world-th image; the sums over the shards are the split's.
    A padded ``DistributedSampler`` (what Ray Train's ``prepare_data_loader`` adds) repeats
    images and moves the result."""
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    from vitcae_ray.engine import evaluate, init_model
    from vitcae_ray.train import val_shard

    cfg = build_config({"data.image_size": 16})
    images = torch.rand(13, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    images[0] = 0.0  # unlike the others: the padding repeats it
    data = TensorDataset(images, torch.zeros(13))
    model = init_model(cfg, 1, torch.device("cpu"))

    def mse(loader):
        m = evaluate(model, loader, 5, cfg, torch.device("cpu"))
        return m["val/mse"], m["val/samples"]

    whole, n = mse(DataLoader(data, batch_size=4))
    assert n == 13
    for world in (2, 3, 5):
        shards = [list(val_shard(data, rank, world).indices) for rank in range(world)]
        assert sorted(sum(shards, [])) == list(range(13))
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
        parts = [mse(DataLoader(val_shard(data, rank, world), batch_size=4)) for rank in range(world)]
        assert sum(k for _, k in parts) == 13
        assert sum(v * k for v, k in parts) / 13 == pytest.approx(whole, rel=1e-6)
    padded = [
        mse(DataLoader(data, batch_size=4, sampler=DistributedSampler(data, 2, rank, shuffle=False)))
        for rank in range(2)
    ]
    assert sum(k for _, k in padded) == 14  # image 0 twice
    assert sum(v * k for v, k in padded) / 14 != pytest.approx(whole, rel=1e-3)


def test_streamed_validation_is_the_same_with_one_and_two_workers(ray_session, tmp_path):
    """A Parquet run streams the val split to the workers, every row to exactly one of them
    (``exact_validation``), so one model's all-reduced validation is the same with 1 and 2
    workers. Ray Train's default split (equal shards) drops a row of an odd split: the
    deliberately wrong config moves the result."""
    import ray.train
    import ray.train.torch
    from ray.train.torch import TorchTrainer

    from vitcae_ray.data.streaming import TRAIN, VAL, exact_validation, split_dataset
    from vitcae_ray.data.to_parquet import main as to_parquet

    data = str(tmp_path / "pq")
    assert (
        to_parquet(["--dataset", "digits", "--image-size", "16", "--val-fraction", "0.1008", "--out", data])
        == 0
    )
    cfg = build_config(
        {"data.dataset": "parquet", "data.root": data, "data.image_size": 16, "train.batch_size": 16}
    )
    train_ds, train_rows = split_dataset(cfg.data, 1, TRAIN)
    val_ds, val_rows = split_dataset(cfg.data, 1, VAL)
    assert val_rows % 2 == 1  # an odd split: equal shards cannot hold it

    def validate(config):  # defined here, so Ray ships it by value to the workers
        from vitcae_ray.engine import evaluate, init_model
        from vitcae_ray.train import _loaders

        cfg = build_config(config["cfg"])
        ctx = ray.train.get_context()
        device = torch.device("cpu")
        *_, val_loader = _loaders(cfg, config["stream"], ctx.get_world_rank(), ctx.get_world_size(), device)
        torch.manual_seed(0)  # the same model on every worker, in every run
        # wrapped as in a run (DDP with 2 workers): shards of different batch counts must not
        # leave a rank waiting in a collective
        model = ray.train.torch.prepare_model(init_model(cfg, 1, device))
        metrics = evaluate(model, val_loader, 5, cfg, device)
        if ctx.get_world_rank() == 0:  # the all-reduced figures, the same on every rank
            Path(config["out"]).write_text(
                json.dumps({"mse": metrics["val/mse"], "n": metrics["val/samples"]})
            )

    def fit(workers: int, dataset_config) -> dict:
        out = tmp_path / f"val{workers}-{type(dataset_config).__name__}.json"
        result = TorchTrainer(
            validate,
            train_loop_config={
                "cfg": cfg.to_dict(),
                "stream": {"rows": train_rows, "channels": 1},
                "out": str(out),
            },
            datasets={TRAIN: train_ds, VAL: val_ds},
            dataset_config=dataset_config,
            scaling_config=ray.train.ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 0.5}),
            run_config=ray.train.RunConfig(name=out.stem, storage_path=str(tmp_path / "ray")),
        ).fit()
        assert result.error is None, result.error
        return json.loads(out.read_text())

    one, two = fit(1, exact_validation()), fit(2, exact_validation())
    assert one["n"] == two["n"] == val_rows
    assert two["mse"] == pytest.approx(one["mse"], rel=1e-6)
    padded = fit(2, ray.train.DataConfig())  # equal=True: a row left out
    assert padded["n"] == val_rows - 1
    assert padded["mse"] != pytest.approx(one["mse"], rel=1e-6)
