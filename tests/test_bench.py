"""Every benchmark suite in --quick mode: the JSON it writes, its variants and fields (no timing
assertions: the numbers depend on the machine)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from vitcae_ray.bench import main
from vitcae_ray.bench.overhead import PARTS

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


def test_freeze_suite_has_every_fraction_and_block_prefix(tmp_path):
    from vitcae_ray.bench.freeze import FRACTIONS  # here: the file's other tests need no freeze.py

    rows = _bench(tmp_path, "freeze")
    depth = 2  # --quick's model
    got = [(r["frozen_frac"], r["frozen_blocks"], r["prefix_cached"]) for r in rows]
    prefixes = [(1.0, k, cached) for cached in (False, True) for k in range(1, depth + 1)]
    assert got == [(0.0, 0, False)] + [(f, 0, False) for f in FRACTIONS] + prefixes
    for r in rows:
        _positive(r, "step_ms", "time_ratio", "flop_ratio", "flops", "grad_elements")
        _spread(r["time_spread"])
    assert rows[0]["time_ratio"] == rows[0]["flop_ratio"] == 1.0
    # counted FLOPs and gradient elements (not timings) fall with every head and block frozen
    plain, cached = rows[:-depth], rows[-depth:]
    flops = [r["flops"] for r in plain]
    grads = [r["grad_elements"] for r in plain]
    assert flops == sorted(flops, reverse=True) and len(set(flops)) == len(flops)
    assert grads == sorted(grads, reverse=True) and len(set(grads)) == len(grads)
    # the cache takes the prefix's forward away, and nothing of the gradients
    for r, c in zip(plain[-depth:], cached):
        assert c["flops"] < r["flops"] and c["grad_elements"] == r["grad_elements"]


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


@pytest.mark.parametrize(
    "argv, message",
    [
        (["nosuch"], "unknown suite 'nosuch'"),
        (["freeze", "--set", "model.nosuch=1"], "unknown config key 'model.nosuch'"),
        (["freeze", "--set", "model.depth"], "--set expects dotted.key=value"),
        (["freeze", "--rounds", "0"], "--rounds must be >= 1"),
        (["freeze", "--nosuch"], "unrecognized arguments"),
        (["run", "--only", "medium"], "unknown --only 'medium': choose long or short"),
        (["run", "--seeds", "0"], "--seeds must be >= 1, got 0"),
        (["run", "--long-epochs", "0"], "--long-epochs must be >= 1"),
        (["run", "--set", "train.epochs=5"], "--set train.epochs: the run suite sets it per run"),
        (["run", "--set", "freeze.enabled=false"], "--set freeze.enabled: the run suite sets it"),
        (["freeze", "--only", "long"], "--only does not apply to the freeze suite"),
        (["run", "--epochs", "5"], "--epochs does not apply to the run suite"),
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


# --- the run suite: its arithmetic, its readers and its doc, without training -----------------


def _arm(flops, train_s, mse, probe, fid, kid, saved=None, wall_s=None) -> dict:
    """A run record as :func:`vitcae_ray.bench.run.one_arm` returns it (what summarize reads)."""
    return {
        "flops": flops,
        "train_s": train_s,
        "wall_s": wall_s if wall_s is not None else 2 * train_s,
        "val_mse": mse,
        "probe_acc": probe,
        "fid": fid,
        "kid": kid,
        "fid_normal": 2 * fid,
        "kid_normal": 2 * kid,
        "flops_saved_frac": saved,
    }


def _pairs(on: list[dict], off: list[dict]) -> dict:
    return {**{(s, "on"): r for s, r in enumerate(on)}, **{(s, "off"): r for s, r in enumerate(off)}}


def _good_runs():
    """Three seeds with known answers: FLOPs ratios 0.8/0.9/0.7 (mean 0.8), time ratios
    0.80/0.95/0.85 (median 0.85), val/mse, FID and KID 1.01/1.05/1.05, probe -0.5 points."""
    off = [_arm(100.0, 10.0, 0.010, p, 10.0, 0.010) for p in (0.90, 0.92, 0.88)]
    on = [
        _arm(f, t, 0.0101, p - 0.005, 10.5, 0.0105, saved=1 - f / 100.0)
        for f, t, p in ((80.0, 8.0, 0.90), (90.0, 9.5, 0.92), (70.0, 8.5, 0.88))
    ]
    return on, off


def test_run_summary_has_the_known_ratios_and_meets_the_targets():
    from vitcae_ray.bench.run import summarize

    on, off = _good_runs()
    rows = summarize("long", 60, [0, 1, 2], _pairs(on, off))
    by = {r["figure"]: r for r in rows}
    assert set(by) == {
        *("flops", "train_s", "val_mse", "probe_acc", "flops_saving_claimed"),
        *("fid", "kid", "fid_normal", "kid_normal"),
    }
    assert all(r["config"] == "long" and r["epochs"] == 60 and r["seeds"] == 3 for r in rows)
    assert by["flops"]["value"] == pytest.approx(0.8) and by["flops"]["bound"] == 0.85
    assert by["flops"]["statistic"] == "mean of 3 per-seed ratios"
    assert by["flops"]["off_spread"] == {"kind": "cv", "value": 0.0}
    assert by["train_s"]["value"] == pytest.approx(0.85)  # the median, not the mean (0.867)
    assert (by["train_s"]["min"], by["train_s"]["max"]) == pytest.approx((0.80, 0.95))
    assert by["train_s"]["statistic"] == "median of 3 per-seed ratios (min-max)"
    assert by["train_s"]["sum_s"] == pytest.approx(
        {"on_train": 26.0, "off_train": 30.0, "on_wall": 52.0, "off_wall": 60.0}
    )
    assert by["val_mse"]["value"] == pytest.approx(1.01)
    assert by["fid"]["value"] == pytest.approx(1.05) and by["kid"]["value"] == pytest.approx(1.05)
    assert by["fid_normal"]["value"] == pytest.approx(1.05) and by["fid_normal"]["bound"] == 1.10
    assert by["probe_acc"]["value"] == pytest.approx(-0.5)  # points
    assert by["probe_acc"]["off_spread"]["kind"] == "std_points"
    assert by["probe_acc"]["off_spread"]["value"] == pytest.approx(2.0)  # std of 90, 92, 88 points
    assert by["flops_saving_claimed"]["measured"] == pytest.approx([0.2, 0.1, 0.3])
    assert by["flops_saving_claimed"]["value"] == pytest.approx(0.0, abs=1e-12)
    assert all(r["met"] is True for r in rows), [(r["figure"], r["value"]) for r in rows if not r["met"]]
    json.dumps(rows, allow_nan=False)  # what --json writes


def test_run_summary_flips_a_target_on_a_bad_pair():
    from vitcae_ray.bench.run import summarize

    on, off = _good_runs()
    on[2] = {**on[2], "flops": 100.0, "probe_acc": off[2]["probe_acc"] - 0.05}  # seed 2: no saving
    by = {r["figure"]: r for r in summarize("long", 60, [0, 1, 2], _pairs(on, off))}
    assert by["flops"]["value"] == pytest.approx(0.9) and by["flops"]["met"] is False
    assert (
        by["probe_acc"]["value"] == pytest.approx((-0.5 - 0.5 - 5.0) / 3) and by["probe_acc"]["met"] is False
    )
    # the on arm still claims 30% saved on seed 2, against a measured 0%
    assert (
        by["flops_saving_claimed"]["value"] == pytest.approx(0.3)
        and by["flops_saving_claimed"]["met"] is False
    )
    assert by["val_mse"]["met"] is True
    on[0] = {**on[0], "fid_normal": 1.5 * off[0]["fid_normal"]}  # only the N(0, I) samples worse
    by = {r["figure"]: r for r in summarize("long", 60, [0, 1, 2], _pairs(on, off))}
    assert by["fid_normal"]["met"] is False and by["fid"]["met"] is True
    short = {r["figure"]: r for r in summarize("short", 30, [0, 1, 2], _pairs(on, off))}
    assert short["flops"]["bound"] == 1.0 and short["flops"]["met"] is True  # 0.9 <= 1.00


def test_run_reads_the_default_samplers_figures_and_n01s_beside_them():
    from vitcae_ray.bench.run import evaluation_record

    metrics = {"probe/acc": 0.9, "sample/fid": 30.0, "sample/kid": 5.0}
    mixture = {**metrics, "sample/mixture/fid": 3.0, "sample/mixture/kid": 0.5}
    assert evaluation_record(mixture) == {
        "probe_acc": 0.9,
        **{"fid": 3.0, "kid": 0.5, "fid_normal": 30.0, "kid_normal": 5.0},
    }
    # a model without a mixture (the ViT-VAE) samples N(0, I) by default
    assert evaluation_record(metrics)["fid"] == 30.0 == evaluation_record(metrics)["fid_normal"]


def test_run_summary_of_one_seed_and_an_unmeasurable_ratio():
    from vitcae_ray.bench.run import summarize

    on, off = _good_runs()
    off0 = {**off[0], "kid": -0.001}  # KID's unbiased estimate can fall below 0: no ratio
    by = {r["figure"]: r for r in summarize("short", 30, [0], {(0, "on"): on[0], (0, "off"): off0})}
    assert by["flops"]["statistic"] == "mean of 1 per-seed ratio"
    assert by["flops"]["off_spread"]["value"] is None  # no spread from one seed
    assert by["kid"]["value"] is None and by["kid"]["met"] is None
    assert by["train_s"]["value"] == pytest.approx(0.8) and by["train_s"]["met"] is True  # <= 1.02


def test_run_table_labels_every_statistic_and_says_met_or_not(tmp_path):
    from vitcae_ray.bench.run import render, summarize

    on, off = _good_runs()
    on[0] = {**on[0], "flops": 100.0}
    run_rows = []
    for (seed, arm), r in sorted(_pairs(on, off).items()):
        run_rows.append(
            {
                "kind": "run",
                "config": "long",
                "epochs": 60,
                "seed": seed,
                "arm": arm,
                "epochs_run": 60,
                "selected_epoch": 58,
                "heads_frozen": 5 if arm == "on" else 0,
                "heads_newly_frozen": 1 if arm == "on" else 0,
                "heads_total": 16,
                "blocks_frozen": None,
                **r,
            }
        )
    text = render(run_rows + summarize("long", 60, [0, 1, 2], _pairs(on, off)))
    assert text.startswith("LONG: 60 epochs, seeds 0, 1, 2") and "SHORT" not in text
    lines = text.splitlines()
    flops = next(x for x in lines if x.startswith("training FLOPs"))
    assert "0.867" in flops and "mean of 3 per-seed ratios" in flops and flops.endswith("NOT met")
    assert "<= 0.85" in flops and "CV 0.0%" in flops
    time_line = next(x for x in lines if x.startswith("training time"))
    assert "median of 3 per-seed ratios (0.800-0.950)" in time_line and time_line.endswith(" met")
    probe = next(x for x in lines if x.startswith("probe accuracy"))
    assert "-0.50 pt" in probe and "std 2.00 pt" in probe and ">= -1.0 pt" in probe
    assert "seed 0 20.00% vs 0.00%, seed 1 10.00% vs 10.00%" in text
    assert "LONG targets met: 7/9" in text
    assert (
        "training (sum of time/epoch_s) 26.0 / 30.0; the whole command, start-up included 52.0 / 60.0" in text
    )
    assert "5+1/16" in text  # the on arm's frozen heads in the per-run table


def test_the_drift_control_compares_the_epochs_before_the_first_freeze():
    from vitcae_ray.bench.run import drift_control, render, summarize

    # the on arm froze a head from its third epoch: epochs 1-2 did the same work in both arms
    on = {"steps_s": [2.2, 2.2, 1.0, 1.0], "first_freeze_epoch": 2}
    off = {"steps_s": [2.0, 2.0, 2.0, 2.0]}
    assert drift_control(on, off) == (2, pytest.approx(1.1))
    assert drift_control({**on, "first_freeze_epoch": None}, off) == (4, pytest.approx(6.4 / 8.0))
    assert drift_control({**on, "first_freeze_epoch": 0}, off) == (0, None)  # nothing to compare
    assert drift_control({**on, "steps_s": [None, 2.2, 1.0, 1.0]}, off) == (2, None)
    assert drift_control({}, off) == (0, None)  # records without timings
    # in the table, beside the training time
    good_on, good_off = _good_runs()
    good_on = [{**r, **on} for r in good_on]
    good_off = [{**r, **off} for r in good_off]
    rows = summarize("long", 60, [0, 1, 2], _pairs(good_on, good_off))
    assert next(r for r in rows if r["figure"] == "train_s")["drift_control"] == [(2, pytest.approx(1.1))] * 3
    runs = [
        {
            "kind": "run",
            "config": "long",
            "seed": seed,
            "arm": arm,
            "selected_epoch": None,
            "heads_frozen": None,
        }
        for seed, arm in _pairs(good_on, good_off)
    ]
    assert "seed 0 1.100 (epochs 1-2), seed 1 1.100 (epochs 1-2)" in render(runs + rows)


def test_run_reads_the_last_record_per_epoch_and_selects_by_the_run_metric(tmp_path):
    from vitcae_ray.bench.run import read_history, select_metric_of, training_record

    def rec(epoch, elbo, mse, flops=10, t=1.0, **extra):
        return {
            "epoch": epoch,
            "val/elbo": elbo,
            "val/mse": mse,
            "flops/epoch": flops,
            "time/epoch_s": t,
            "flops/cumulative_saved_frac": 0.1 * epoch,
            **extra,
        }

    # epochs 0..3, then a resume from the epoch-1 checkpoint repeats epochs 2 and 3
    lines = [
        rec(0, 5.0, 0.05),
        rec(1, 3.0, 0.04),
        rec(2, 1.0, 0.03, flops=99, t=9.0),  # repeated below: not counted
        rec(3, 4.0, 0.01, flops=99, t=9.0),
        rec(2, 2.0, 0.03),
        rec(3, 2.5, 0.02, **{"heads/frozen": 3, "heads/newly_frozen": 1, "heads/total": 8}),
    ]
    text = "".join(json.dumps(x) + "\n" for x in lines) + '{"epoch": 4, "val/el'  # a torn last line
    history = read_history(text)
    assert [m["epoch"] for m in history] == [0, 1, 2, 3]
    assert [m["val/elbo"] for m in history] == [5.0, 3.0, 2.0, 2.5]
    r = training_record(history, "val/elbo")
    assert r["flops"] == 40 and r["train_s"] == pytest.approx(4.0) and r["epochs_run"] == 4
    assert r["selected_epoch"] == 2 and r["val_mse"] == 0.03 and r["selected_value"] == 2.0
    assert r["flops_saved_frac"] == pytest.approx(0.3)
    assert (r["heads_frozen"], r["heads_newly_frozen"], r["heads_total"]) == (3, 1, 8)
    assert r["blocks_frozen"] is None  # absent from these records
    assert r["first_freeze_epoch"] == 3 and r["steps_s"] == [None] * 4  # no step timings here
    assert training_record(history, "val/mse")["selected_epoch"] == 3

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert select_metric_of(str(run_dir)) == "val/elbo"  # no config.yaml: the default
    (run_dir / "config.yaml").write_text("train:\n  select_metric: val/mse\n")
    assert select_metric_of(str(run_dir)) == "val/mse"


def test_run_replaces_the_text_between_the_doc_markers(tmp_path):
    from vitcae_ray.bench.run import DOC_END, DOC_START, check_doc, replace_between_markers

    text = f"# Benchmarks\n\nbefore\n{DOC_START}\nold table\nold line\n{DOC_END}\nafter\n"
    new = replace_between_markers(text, "new table\n")
    assert new == f"# Benchmarks\n\nbefore\n{DOC_START}\nnew table\n{DOC_END}\nafter\n"
    assert replace_between_markers(new, "new table") == new  # idempotent
    doc = tmp_path / "bench.md"
    doc.write_text(text)
    assert check_doc(str(doc)) == text
    for bad in ("no markers\n", f"{DOC_END}\n{DOC_START}\n", f"{DOC_START}\n{DOC_START}\n{DOC_END}\n"):
        doc.write_text(bad)
        with pytest.raises(ValueError, match="bench-run:start"):
            check_doc(str(doc))


def test_run_without_doc_markers_fails_before_training(tmp_path, capsys):
    doc = tmp_path / "bench.md"
    doc.write_text("# Benchmarks\n")
    assert main(["run", "--doc", str(doc), "--output", str(tmp_path / "runs")]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --doc {doc} has no single <!-- bench-run:start")
    assert "add a line" in lines[0] and not captured.out and not (tmp_path / "runs").exists()


def test_run_commands_are_the_users_plus_the_bench_settings():
    import argparse

    import torch

    from vitcae_ray.bench import config_argv, suite_module
    from vitcae_ray.bench.run import eval_command, train_command

    mod = suite_module("run")
    args = argparse.Namespace(config=None, quick=False, preset=None, set=["optim.lr=1e-3"])
    opts = argparse.Namespace(config_argv=config_argv(args, mod), device=torch.device("cpu"))
    on = train_command(opts, "on", 60, 2, "/r/on")
    off = train_command(opts, "off", 60, 2, "/r/off")
    assert on[:3] == [sys.executable, "-m", "vitcae_ray.train"]
    assert on[3:] == [
        "--set",
        "optim.lr=1e-3",
        "--epochs",
        "60",
        "--seed",
        "2",
        "--output",
        "/r/on",
        "--set",
        "train.eval_every=0",
        "--set",
        "train.log_images=false",
    ]
    assert off[: on.index("/r/on")] == on[: on.index("/r/on")]
    assert off[-2:] == ["--set", "freeze.enabled=false"] and "freeze.enabled=false" not in on
    ev = eval_command(opts, 2, "/r/on")
    assert ev[2:] == ["vitcae_ray.evaluate", "--model", "/r/on", "--out", "/r/on/eval"] + [
        "--tasks",
        "probe,sample",
        "--seed",
        "2",
    ]
    quick = config_argv(argparse.Namespace(config="configs/x.yaml", quick=True, preset=None, set=[]), mod)
    assert quick[:2] == ["--config", "configs/x.yaml"]
    assert (
        "model.embed_dim=32" in quick
        and "freeze.patience=1" in quick
        and "train.cpus_per_worker=1.0" in quick
    )


def test_run_refuses_a_used_output_unless_resuming(tmp_path, capsys):
    (tmp_path / "old").write_text("x")
    assert main(["run", "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"--output {str(tmp_path)!r} is not empty: pass a new directory, or --resume-existing" in err


def test_run_failure_is_one_line_with_the_last_output(capsys):
    from vitcae_ray.bench.run import RunFailed, stream

    seen = []
    code = "import sys\nfor i in range(9): print('line', i)\nsys.exit(3)"
    with pytest.raises(RunFailed) as e:
        stream([sys.executable, "-c", code], "long seed 0 on", seen.append)
    assert seen[0] == "[long seed 0 on] line 0" and len(seen) == 9
    message = str(e.value)
    assert "\n" not in message and e.value.code == 1
    assert message.startswith("long seed 0 on exited with 3; its last lines: line 4 | ")
    assert message.endswith("line 8")
    assert stream([sys.executable, "-c", "pass"], "ok", seen.append) > 0


@pytest.mark.slow  # 2 training runs and their evaluations (the first trains the feature classifier): ~3 min
@pytest.mark.ray  # the runs train in Ray Train's local mode, through python -m vitcae_ray.train
def test_run_suite_trains_both_arms_through_the_cli_and_reports_the_targets(tmp_path, capsys):
    from vitcae_ray.bench.run import DOC_END, DOC_START, FIGURES

    runs_dir, doc = tmp_path / "runs", tmp_path / "bench.md"
    doc.write_text(f"# Benchmarks\n{DOC_START}\nold\n{DOC_END}\nafter\n")
    rows = _bench(tmp_path, "run", "--only", "long", "--output", str(runs_dir), "--doc", str(doc))
    out = capsys.readouterr().out
    runs = {r["arm"]: r for r in rows if r["kind"] == "run"}
    assert [(r["arm"], r["seed"]) for r in rows if r["kind"] == "run"] == [("on", 0), ("off", 0)]
    for r in runs.values():
        assert r["config"] == "long" and r["epochs"] == r["epochs_run"] == 3  # --quick: LONG is 3 epochs
        _positive(r, "flops", "train_s", "wall_s", "eval_wall_s", "val_mse", "fid")
        _finite(r, "kid")
        assert 0 < r["probe_acc"] <= 1 and r["selected_epoch"] in range(3)
        assert r["wall_s"] > r["train_s"]  # the whole command: start-up, data, FLOP count, checkpoints
        run_dir = Path(r["run_dir"])
        assert run_dir.parent.parent == runs_dir and (run_dir / "tb").is_dir()
        assert (run_dir / "metrics.jsonl").is_file() and (run_dir / "eval" / "metrics.json").is_file()
    on, off = runs["on"], runs["off"]
    assert off["heads_frozen"] == 0 and on["heads_frozen"] > 0  # --quick: heads freeze after epoch 2
    assert on["flops"] < off["flops"]
    assert on["flops_saved_frac"] == pytest.approx(1 - on["flops"] / off["flops"], abs=0.005)
    targets = {r["figure"]: r for r in rows if r["kind"] == "target"}
    assert set(targets) == {*FIGURES, "flops_saving_claimed"}
    assert all(isinstance(r["met"], bool) for r in targets.values())
    assert targets["flops"]["value"] == pytest.approx(on["flops"] / off["flops"])
    assert targets["flops_saving_claimed"]["met"] is True
    lines = out.splitlines()
    assert any(x.startswith("LONG: 3 epochs, seeds 0") for x in lines) and "SHORT" not in out
    for label in ("training FLOPs", "training time", "val/mse", "probe accuracy", "FID of", "KID of"):
        line = next(x for x in lines if x.startswith(label))
        assert line.endswith((" met", "NOT met")) and ("<= " in line or ">= " in line), line
    assert "LONG targets met: " in out
    text = doc.read_text()
    assert text.startswith(f"# Benchmarks\n{DOC_START}\n`python -m vitcae_ray.bench run --quick")
    assert "LONG: 3 epochs" in text and text.endswith(f"{DOC_END}\nafter\n") and "\nold\n" not in text

    # continued with --resume-existing: both runs are complete and evaluated, nothing runs again
    again = tmp_path / "again.json"
    argv = ["run", "--quick", "--only", "long", "--output", str(runs_dir), "--resume-existing"]
    assert main([*argv, "--json", str(again)]) == 0
    err = capsys.readouterr().err
    assert err.count("is complete, not trained again") == 2 and "evaluated in" not in err
    assert json.loads(again.read_text())["rows"] == rows
