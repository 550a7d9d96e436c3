"""Exporting the best checkpoint of an experiment and loading it back without Ray; which
checkpoints of a trial count (Ray Train's record of the run, or the folder in local mode)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from torch.utils.data import DataLoader

import vitcae_ray
from vitcae_ray import export as export_mod
from vitcae_ray.config import build_config
from vitcae_ray.data import build_datasets
from vitcae_ray.engine import evaluate
from vitcae_ray.export import main as export_main

# on top of the tiny model (the tiny_config fixture)
SMALL = {
    "train.batch_size": 32,
    "train.log_images": False,
    "train.num_workers": 0,
    "train.cpus_per_worker": 1.0,
    "train.epochs": 3,
    "train.num_checkpoints": 3,
    # every head qualifies at epoch 1; the cap freezes one head per layer
    "freeze.min_epoch": 1,
    "freeze.patience": 1,
    "freeze.kappa_window": 1,
    "freeze.drift_ratio": 1e6,
    "freeze.max_frozen_frac": 0.5,
}
TRIALS = {"a": {"optim.lr": 3e-3, "freeze.blocks": True}, "b": {"optim.lr": 5e-4, "freeze.blocks": False}}
METRICS = ("val/elbo", "val/loss", "val/mse", "val/psnr", "train/loss", "heads/frozen")
FILES = {"model.pt", "config.yaml", "hparams.json", "metrics.json", "frozen_heads.json"}


def _history(run_dir: Path) -> dict[int, dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {m["epoch"]: m for m in map(json.loads, lines)}


def _surviving(run_dir: Path) -> list[int]:
    return sorted(
        int(p.parent.name.rsplit("_", 1)[1])
        for p in (run_dir / "train").glob("checkpoint_epoch_*/checkpoint.pt")
    )


def _best_epoch(run_dir: Path, metric: str = "val/elbo") -> int:
    """Best surviving epoch by ``metric`` (lower is better; ties: the later epoch)."""
    history = _history(run_dir)
    return min(_surviving(run_dir), key=lambda e: (history[e][metric], -e))


@pytest.fixture(scope="module")
def exp(tmp_path_factory, tiny_config) -> Path:
    """Two real local-mode training runs and the results table a sweep writes for them."""
    from vitcae_ray.train import run

    root = tmp_path_factory.mktemp("exp")
    rows = []
    for trial_id, hp in TRIALS.items():
        run_dir = root / "trials" / trial_id
        run(build_config({**tiny_config, **SMALL, **hp, "train.output": str(run_dir)}), verbose=False)
        history = list(_history(run_dir).values())
        row = {
            "trial_id": trial_id,
            "run_dir": str(run_dir),
            **hp,
            "status": "completed",
            "epochs": len(history),
        }
        for key in METRICS:
            values = [m[key] for m in history]
            row[f"final/{key}"] = float(values[-1])
            row[f"best/{key}"] = float(max(values) if key == "val/psnr" else min(values))
        rows.append(row)
    rows.sort(key=lambda r: -r["best/val/elbo"])  # worst first: the order must not matter
    for r in rows:
        r["pareto"] = True
    pq.write_table(pa.Table.from_pylist(rows), root / "results.parquet")
    # trial b lost its best checkpoint: the export must fall back to the best that survives
    b = root / "trials" / "b"
    assert len(_surviving(b)) == 3
    shutil.rmtree(b / "train" / f"checkpoint_epoch_{_best_epoch(b):04d}")
    return root


def _table(exp: Path) -> list[dict[str, Any]]:
    return pq.read_table(exp / "results.parquet").to_pylist()


def _reevaluate(out: Path, model: torch.nn.Module) -> dict[str, float]:
    metrics = json.loads((out / "metrics.json").read_text())
    cfg = build_config(yaml.safe_load((out / "config.yaml").read_text()))
    _, val, _ = build_datasets(cfg.data)
    return evaluate(
        model,
        DataLoader(val, batch_size=cfg.train.batch_size, shuffle=False),
        metrics["epoch"],
        cfg,
        torch.device("cpu"),
        seed=cfg.train.seed,
    )


@pytest.mark.ray  # the experiment trains in Ray Train's local mode
def test_exports_the_best_trial_at_its_best_checkpoint_and_reloads_it(exp, tmp_path, capsys):
    best = min(_table(exp), key=lambda r: r["best/val/elbo"])
    run_dir = Path(best["run_dir"])
    epoch = _best_epoch(run_dir)
    out = tmp_path / "model"

    assert export_main(["--experiment", str(exp), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1
    assert f"trial {best['trial_id']}" in printed[0] and f"checkpoint_epoch_{epoch:04d}" in printed[0]
    assert str(out) in printed[0] and "val/elbo" in printed[0]
    assert {p.name for p in out.iterdir()} == FILES
    assert not Path(f"{out}.partial").exists()

    hparams = json.loads((out / "hparams.json").read_text())
    assert hparams == {"trial_id": best["trial_id"], **TRIALS[best["trial_id"]]}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == _history(run_dir)[epoch]
    assert f"{metrics['val/elbo']:.6g}" in printed[0]

    state = torch.load(out / "model.pt", weights_only=True)
    assert {"model", "model_args", "config", "frozen_heads"} <= set(state)
    assert state["model_args"] == {"img_size": 16, "in_chans": 1}
    assert build_config(state["config"]).optim.lr == TRIALS[best["trial_id"]]["optim.lr"]
    assert yaml.safe_load((out / "config.yaml").read_text()) == build_config(state["config"]).to_dict()

    # the frozen map agrees with the run's per-head table at that epoch
    heads = [r for r in pq.read_table(run_dir / "heads.parquet").to_pylist() if r["epoch"] == epoch]
    expected = [[r["head"] for r in heads if r["layer"] == layer and r["frozen"]] for layer in range(2)]
    frozen = json.loads((out / "frozen_heads.json").read_text())
    assert frozen["frozen_heads"] == expected == state["frozen_heads"]
    assert frozen["frozen_epochs"] == [
        [r["frozen_epoch"] for r in heads if r["layer"] == layer and r["frozen"]] for layer in range(2)
    ]
    if epoch >= 1:  # the freeze rule fires at epoch 1: one head per layer
        assert frozen["frozen_epochs"] == [[1], [1]]

    # load_pretrained rebuilds the model from model.pt alone and reproduces the checkpoint
    model = vitcae_ray.load_pretrained(str(out))
    assert not model.training
    again = _reevaluate(out, model)
    assert again["val/elbo"] == pytest.approx(metrics["val/elbo"], rel=1e-4)
    assert again["val/mse"] == pytest.approx(metrics["val/mse"], rel=1e-4)
    assert model.generate(4).shape == (4, 1, 16, 16)
    # the z_cls mixture rides along: the 3-epoch run evaluates (and fits one) at its last
    # epoch only, so only that epoch's checkpoint carries one
    fitted = epoch == SMALL["train.epochs"] - 1
    assert (state["cls_mixture"] is not None) == fitted == (model.cls_mixture is not None)
    assert state["cls_mixture_epoch"] == (epoch if fitted else None) == model.cls_mixture_epoch


@pytest.mark.ray
def test_trial_flag_and_uris_take_the_best_surviving_checkpoint(exp, tmp_path, capsys):
    b = exp / "trials" / "b"
    history = _history(b)
    overall = min(history, key=lambda e: (history[e]["val/elbo"], -e))
    epoch = _best_epoch(b)
    assert epoch != overall and overall not in _surviving(b)
    out = tmp_path / "b"
    assert export_main(["--experiment", f"file://{exp}", "--out", f"file://{out}", "--trial", "b"]) == 0
    assert f"checkpoint_epoch_{epoch:04d}" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epoch"] == epoch and metrics == history[epoch]
    assert json.loads((out / "hparams.json").read_text())["freeze.blocks"] is False
    model = vitcae_ray.load_pretrained(f"file://{out}")
    frozen = json.loads((out / "frozen_heads.json").read_text())
    assert [a.frozen_heads for a in model.attention_layers] == frozen[
        "frozen_heads"
    ] and model.frozen_blocks == 0
    assert _reevaluate(out, model)["val/elbo"] == pytest.approx(metrics["val/elbo"], rel=1e-4)


@pytest.mark.ray
def test_top_k_overwrite_and_mode_max(exp, tmp_path, capsys):
    table = _table(exp)
    order = [r["trial_id"] for r in sorted(table, key=lambda r: r["best/val/elbo"])]
    out = tmp_path / "top"
    assert export_main(["--experiment", str(exp), "--out", str(out), "--top-k", "2"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2
    assert sorted(p.name for p in out.iterdir()) == ["1", "2"]
    for i, trial_id in enumerate(order, 1):
        assert {p.name for p in (out / str(i)).iterdir()} == FILES
        assert json.loads((out / str(i) / "hparams.json").read_text())["trial_id"] == trial_id

    # a non-empty --out is refused, then replaced with --overwrite
    assert export_main(["--experiment", str(exp), "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err and (out / "2").is_dir()
    by_psnr = max(table, key=lambda r: r["best/val/psnr"])["trial_id"]
    assert (
        export_main(
            [
                "--experiment",
                str(exp),
                "--out",
                str(out),
                "--overwrite",
                "--metric",
                "val/psnr",
                "--mode",
                "max",
            ]
        )
        == 0
    )
    assert {p.name for p in out.iterdir()} == FILES
    metrics = json.loads((out / "metrics.json").read_text())
    run_dir = exp / "trials" / by_psnr
    history = _history(run_dir)
    assert metrics["val/psnr"] == max(history[e]["val/psnr"] for e in _surviving(run_dir))


@pytest.mark.ray
def test_an_interrupted_export_leaves_nothing(exp, tmp_path, monkeypatch):
    real, calls = export_mod.model_files, []

    def failing(choice):
        calls.append(choice.trial_id)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(choice)

    monkeypatch.setattr(export_mod, "model_files", failing)
    out = tmp_path / "top"
    with pytest.raises(KeyboardInterrupt):
        export_mod.export(str(exp), str(out), top_k=2)
    assert len(calls) == 2 and not out.exists() and not Path(f"{out}.partial").exists()


@pytest.mark.ray
@pytest.mark.parametrize(
    "args, words",
    [
        (["--experiment", "{tmp}/nowhere"], ["not found"]),
        (["--experiment", "{tmp}/empty"], ["results.parquet"]),
        (["--experiment", "{exp}", "--trial", "zz"], ["'zz'", "a, b"]),
        (["--experiment", "{exp}", "--metric", "val/nope"], ["val/nope", "val/elbo", "val/mse"]),
        (["--experiment", "{exp}", "--trial", "a", "--top-k", "2"], ["--trial"]),
        (["--experiment", "{tmp}/nockpt"], ["no checkpoint"]),
        (["--experiment", "nosuch://bucket/exp"], ["nosuch://bucket/exp"]),
    ],
)
def test_errors_are_one_line_exit_2_and_write_nothing(exp, tmp_path, capsys, own_stderr, args, words):
    (tmp_path / "empty").mkdir()
    nockpt = tmp_path / "nockpt"
    (nockpt / "trials" / "x").mkdir(parents=True)
    pq.write_table(
        pa.Table.from_pylist(
            [
                {
                    "trial_id": "x",
                    "run_dir": str(nockpt / "trials" / "x"),
                    "status": "error",
                    "epochs": 0,
                    "best/val/elbo": 1.0,
                    "final/val/elbo": 1.0,
                    "pareto": True,
                }
            ]
        ),
        nockpt / "results.parquet",
    )
    out = tmp_path / "out"
    argv = [a.format(tmp=tmp_path, exp=exp) for a in args] + ["--out", str(out)]
    assert export_main(argv) == 2
    captured = capsys.readouterr()
    err = own_stderr(captured.err)
    assert captured.out == "" and len(err) == 1 and err[0].startswith("error: ")
    for w in words:
        assert w in err[0]
    assert not out.exists() and not Path(f"{out}.partial").exists()


def test_checkpoints_come_from_ray_trains_record_else_from_the_folder(ray_session, tmp_path):
    import ray.train
    from ray.train.torch import TorchTrainer

    def report_checkpoints():  # defined here, so Ray ships it by value to the worker
        import tempfile

        for epoch, elbo in enumerate([3.0, 1.0, 2.0]):
            with tempfile.TemporaryDirectory() as tmp:
                (Path(tmp) / "checkpoint.pt").write_bytes(b"state")
                (Path(tmp) / "checkpoint.sha256").write_text("digest 5\n")
                ray.train.report(
                    {"epoch": epoch, "val/elbo": elbo},
                    checkpoint=ray.train.Checkpoint.from_directory(tmp),
                    checkpoint_dir_name=f"checkpoint_epoch_{epoch:04d}",
                )

    TorchTrainer(
        report_checkpoints,
        scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.5}),
        run_config=ray.train.RunConfig(
            name="train",
            storage_path=str(tmp_path),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute="val/elbo", checkpoint_score_order="min"
            ),
        ),
    ).fit()
    folder = tmp_path / "train"
    (run_dir := tmp_path / "run").mkdir()
    (run_dir / "config.yaml").write_text(f"train:\n  storage_path: {tmp_path}\n  run_name: train\n")
    assert export_mod.train_folder(str(run_dir)) == str(folder)
    assert export_mod.train_folder(str(tmp_path / "elsewhere")) == str(tmp_path / "elsewhere" / "train")

    def ckpt(epoch: int) -> Path:
        return folder / f"checkpoint_epoch_{epoch:04d}"

    # Ray kept the best (epoch 1) and the latest (epoch 2); a complete directory it never
    # registered (an upload cut off before the report, a deletion it did not finish) is not used
    shutil.copytree(ckpt(1), ckpt(0))
    assert sorted(export_mod.recorded_checkpoints(str(folder))) == [ckpt(1).name, ckpt(2).name]
    assert export_mod.surviving_checkpoints(str(folder)) == {1: str(ckpt(1)), 2: str(ckpt(2))}
    # the record checks only that a directory is there: an incomplete one is left out here
    (ckpt(2) / "checkpoint.sha256").unlink()
    assert ckpt(2).name in export_mod.recorded_checkpoints(str(folder))
    assert export_mod.surviving_checkpoints(str(folder)) == {1: str(ckpt(1))}
    # Ray refuses a record that names a deleted directory: the folder's complete ones count
    shutil.rmtree(ckpt(2))
    assert export_mod.recorded_checkpoints(str(folder)) is None
    assert export_mod.surviving_checkpoints(str(folder)) == {0: str(ckpt(0)), 1: str(ckpt(1))}
    # local mode writes no record: the folder's complete checkpoints, a partial copy left out
    local = tmp_path / "local"
    shutil.copytree(ckpt(1), local / ckpt(1).name)
    shutil.copytree(ckpt(1), local / ".partial_checkpoint_epoch_0002")
    assert export_mod.recorded_checkpoints(str(local)) is None
    assert export_mod.surviving_checkpoints(f"file://{local}") == {1: f"file://{local}/{ckpt(1).name}"}
    assert export_mod.surviving_checkpoints(str(tmp_path / "nowhere")) == {}


def test_cli_exit_code_and_load_pretrained_errors(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "vitcae_ray.export",
            "--experiment",
            str(tmp_path / "nowhere"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and not out.exists()

    with pytest.raises(FileNotFoundError, match="not found"):
        vitcae_ray.load_pretrained(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="model.pt"):
        vitcae_ray.load_pretrained(tmp_path)
    (tmp_path / "model.pt").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="model.pt") as e:
        vitcae_ray.load_pretrained(tmp_path)
    assert "\n" not in str(e.value)
    torch.save({"model": {}}, tmp_path / "model.pt")
    with pytest.raises(ValueError, match="model_args") as e:
        vitcae_ray.load_pretrained(tmp_path)
    assert "\n" not in str(e.value)


def test_importing_the_package_stays_light():
    code = (
        "import sys, vitcae_ray, vitcae_ray.export; "
        "assert not {'ray', 'torchvision', 'torch'} & set(sys.modules), sys.modules.keys(); "
        "vitcae_ray.load_pretrained; "
        "assert not {'ray', 'torchvision'} & set(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_export_ranks_by_the_metric_the_sweep_recorded():
    from vitcae_ray.config import SELECT_METRIC
    from vitcae_ray.export import sweep_metric

    assert sweep_metric([{"select_metric": "val/mse"}, {"select_metric": "val/mse"}]) == "val/mse"
    assert sweep_metric([{"trial_id": "a"}]) == SELECT_METRIC  # a table from before the column
    assert sweep_metric([{"select_metric": "val/mse"}, {"select_metric": "val/elbo"}]) == SELECT_METRIC
