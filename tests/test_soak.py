"""``python -m vitcae_ray.soak``: its argument checks (fast) and a short soak (marker ``slow``)."""

import json

import pytest

from vitcae_ray.soak import main


@pytest.mark.parametrize(
    "args, words",
    [
        (["--minutes", "0"], "--minutes must be > 0"),
        (["--kill-every", "0"], "--kill-every must be >= 1"),
        (["--output", "{tmp}"], "already exists"),
    ],
)
def test_bad_arguments_are_one_line_exit_2(tmp_path, capsys, args, words):
    argv = [a.format(tmp=tmp_path) for a in args]
    assert main(argv if "--output" in argv else [*argv, "--output", str(tmp_path / "soak")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err
    assert not (tmp_path / "soak").exists()


@pytest.mark.slow  # about 3 minutes
def test_a_short_soak_kills_workers_and_keeps_every_epoch_once(ray_session, tmp_path, capsys, tiny_config):
    out = tmp_path / "soak"
    sets = [
        f"--set={k}={v}"
        for k, v in {
            **tiny_config,
            "train.batch_size": 32,
            "train.log_images": False,
            "train.cpus_per_worker": 0.5,
        }.items()
        if k != "train.max_failures"
    ]
    assert main(["--minutes", "2.5", "--kill-every", "3", "--output", str(out), *sets]) == 0
    report = json.loads((out / "soak.json").read_text())
    assert report["every_epoch_once"] and report["epochs"] >= 6 and report["kills"]
    assert [r["epoch"] for r in report["per_epoch"]] == list(range(report["epochs"]))
    assert all(r["driver_mib"] > 0 and r["worker_mib"] > 0 for r in report["per_epoch"])
    assert report["driver_exit"] == 130  # stopped with SIGINT, as Ctrl-C
    assert "workers killed, every epoch once: True" in capsys.readouterr().out
