"""Every benchmark suite in --quick mode: the JSON it writes, its variants and fields (no timing
assertions: the numbers depend on the machine)."""

import json
import math
import subprocess
import sys

import pytest

from vitcae_ray.bench import main
from vitcae_ray.bench.freeze import FRACTIONS, MODES
from vitcae_ray.bench.overhead import PARTS
from vitcae_ray.bench.quality import VARIANTS

MACHINE = {"cpu", "cores", "gpu", "torch", "ray", "python", "date", "command"}


def _bench(tmp_path, suite: str, *extra: str) -> list[dict]:
    out = tmp_path / f"{suite}.json"
    assert main([suite, "--quick", "--json", str(out), *extra]) == 0
    doc = json.loads(out.read_text())
    assert doc["suite"] == suite and set(doc["machine"]) == MACHINE
    machine = doc["machine"]
    assert machine["cores"] >= 1 and machine["cpu"] and machine["torch"] and machine["ray"]
    assert machine["command"].startswith(f"python -m vitcae_ray.bench {suite} --quick")
    assert doc["rows"]
    return doc["rows"]


def _positive(row: dict, *keys: str) -> None:
    for key in keys:
        v = row[key]
        assert isinstance(v, (int, float)) and math.isfinite(v) and v > 0, (key, v, row)


def _finite(row: dict, *keys: str) -> None:
    for key in keys:
        assert isinstance(row[key], (int, float)) and math.isfinite(row[key]), (key, row)


def _spread(s: dict) -> None:
    assert set(s) == {"min", "q1", "q3", "max"}
    assert all(math.isfinite(v) for v in s.values()) and s["min"] <= s["q1"] <= s["q3"] <= s["max"]


def test_freeze_suite_has_every_mode_fraction_and_out_proj(tmp_path):
    rows = _bench(tmp_path, "freeze")
    got = {(r["mode"], r["out_proj"], r["frozen_frac"]) for r in rows}
    assert got == {("none", False, 0.0)} | {
        (m, p, f) for m in MODES for p in (False, True) for f in FRACTIONS
    }
    assert len(rows) == len(got)
    for r in rows:
        _positive(r, "step_ms", "time_ratio", "flop_ratio", "flops", "grad_elements")
        _spread(r["time_spread"])
    base = next(r for r in rows if r["mode"] == "none")
    assert base["time_ratio"] == base["flop_ratio"] == 1.0
    by = {(r["mode"], r["out_proj"], r["frozen_frac"]): r for r in rows}
    for m in MODES:  # counted FLOPs and gradient elements (not timings) fall as heads freeze
        for p in (False, True):
            flops = [by[m, p, f]["flops"] for f in FRACTIONS]
            assert base["flops"] > flops[0] and flops == sorted(flops, reverse=True)
            assert by[m, p, 1.0]["grad_elements"] < base["grad_elements"]
        assert by[m, True, 0.5]["grad_elements"] < by[m, False, 0.5]["grad_elements"]
    assert by["detach", False, 1.0]["flops"] < by["weights", False, 1.0]["flops"]


def test_attention_suite_compares_the_same_encoder_with_timm(tmp_path):
    pytest.importorskip("timm")
    rows = _bench(tmp_path, "attention")
    assert {r["attention"] for r in rows} == {"sdpa", "manual"}
    for r in rows:
        _positive(
            r,
            "ratio",
            "ours_images_per_s",
            "timm_images_per_s",
            "ours_tokens_per_s",
            "timm_tokens_per_s",
            "ours_step_ms",
            "timm_step_ms",
            "tokens",
        )
        _spread(r["ratio_spread"])
        assert r["tokens"] == 1 + (16 // 4) ** 2  # --quick: 16x16 images, 4x4 patches
        # the same architecture: ours has one extra parameter per head (its temperature)
        assert r["ours_params"] - r["timm_params"] == r["depth"] * r["num_heads"]
        assert r["target"] == 0.95 and isinstance(r["meets_target"], bool)


def test_overhead_suite_splits_the_machinery_by_part(ray_session, tmp_path):
    rows = _bench(tmp_path, "overhead")
    assert [r["part"] for r in rows] == ["epoch", *PARTS, "total", "epoch_difference"]
    by = {r["part"]: r for r in rows}
    _positive(by["epoch"], "ms", "epoch_ms")
    for part in ("readout", "probe", "controller", "all_reduce"):
        _positive(by[part], "ms", "epoch_frac")
    for r in rows:  # the actor's part and the epoch difference are differences: any sign
        _finite(r, "ms", "epoch_frac")
        _spread(r["epoch_frac_spread"])
    assert by["total"]["target"] == 0.03 and isinstance(by["total"]["meets_target"], bool)
    assert ray_session.is_initialized()  # a Ray that was running is left running


@pytest.mark.slow  # trains under Ray and in-process: about 45 s on 2 cores
def test_ray_suite_times_both_variants_and_breaks_the_epoch_down(ray_session, tmp_path):
    rows = _bench(tmp_path, "ray")
    assert [r["variant"] for r in rows] == ["ray", "local"]
    by = {r["variant"]: r for r in rows}
    for r in rows:
        _positive(r, "epoch_s", "train_s", "ratio", "train_ratio", "run_wall_s", "torch_threads")
        _finite(r, "rest_s", "startup_s")
        _spread(r["ratio_spread"])
        assert {"train", "head_stats", "heads", "evaluate", "log", "ckpt_save", "report", "other"} <= set(
            r["phases_s"]
        )
        assert all(math.isfinite(v) and v >= 0 for k, v in r["phases_s"].items() if k != "other")
        if r["cores_used"] is not None:  # Linux: who used the CPUs during the timed epochs
            assert set(r["cores_used"]) == {"worker", "ray", "other"}
            assert all(math.isfinite(v) and v >= 0 for v in r["cores_used"].values())
        assert r["ratio_no_ray"] is None  # a Ray that was running is not shut down for it
    assert by["local"]["ratio"] == 1.0 and by["ray"]["num_workers"] == 1
    assert "persist" in by["local"]["phases_s"]  # local mode copies its checkpoints itself
    assert by["ray"]["target"] == 1.10 and isinstance(by["ray"]["meets_target"], bool)
    assert ray_session.is_initialized()


@pytest.mark.slow  # trains every variant: about 45 s on 2 cores
@pytest.mark.ray  # in Ray Train's local mode
def test_quality_suite_trains_every_variant_with_the_same_seed(tmp_path):
    rows = _bench(tmp_path, "quality", "--output", str(tmp_path / "runs"))
    runs = [r for r in rows if r["kind"] == "run"]
    means = {r["variant"]: r for r in rows if r["kind"] == "mean"}
    assert [(r["variant"], r["seed"]) for r in runs] == [(v, 0) for v in VARIANTS]
    assert list(VARIANTS)[:3] == ["off", "weights", "detach"] and set(means) == set(VARIANTS)
    for r in rows:
        _positive(r, "val_mse", "wall_s", "train_s", "probe_acc", "fid")
        _finite(r, "flops_saved_frac", "val_elbo")
        assert r["epochs"] == 3 and 0 < r["probe_acc"] <= 1
    assert means["off"]["mse_ratio"] == 1.0 and means["off"]["heads_frozen"] == 0
    for mode in list(VARIANTS)[1:]:  # --quick lets heads freeze from epoch 1 on
        assert means[mode]["heads_frozen"] > 0
        assert means[mode]["flops_saved_frac"] > means["off"]["flops_saved_frac"]
        _positive(means[mode], "mse_ratio")
        _spread(means[mode]["mse_ratio_spread"])
    assert "meets_target" in means["weights"]  # the default mode carries the target
    assert (tmp_path / "runs" / "detach-seed0" / "metrics.jsonl").is_file()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["nosuch"], "unknown suite 'nosuch'"),
        (["freeze", "--set", "model.nosuch=1"], "unknown config key 'model.nosuch'"),
        (["freeze", "--set", "model.depth"], "--set expects dotted.key=value"),
        (["freeze", "--rounds", "0"], "--rounds must be >= 1"),
        (["freeze", "--nosuch"], "unrecognized arguments"),
        (["quality", "--variants", "weights,nosuch"], "unknown --variants nosuch"),
        (["ray", "--seeds", "2"], "--seeds does not apply to the ray suite"),
    ],
)
def test_bad_input_is_one_error_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


def test_the_module_runs_as_a_command():
    p = subprocess.run(
        [sys.executable, "-m", "vitcae_ray.bench", "nosuch"], capture_output=True, text=True, check=False
    )
    assert p.returncode == 2 and p.stderr.startswith("error: unknown suite") and not p.stdout
