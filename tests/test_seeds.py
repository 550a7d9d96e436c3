"""The 3-seed table of ``python -m vitcae_ray.evaluate.seeds``: mean ± std per metric, the
baselines beside it, an honest better/worse mark, and the selection table."""

import pytest

from vitcae_ray.evaluate import seeds


def _metrics(mse: float, probe: float, fid: float) -> dict:
    m = {row[1]: 1.0 for row in seeds.ROWS if row[1] != "probe/best"}
    for _, _, _, base in seeds.ROWS:
        m.update({k: 2.0 for _, k in base})
    m.update({"recon/mse": mse, "sample/fid": fid, "probe/z_cls/acc": probe, "probe/acc": probe})
    m.update({"probe/pca8_pixels/acc": 0.9, "probe/pixels/acc": 0.95})
    return m


def test_table_marks_the_better_variant_and_within_spread():
    vitcae = [_metrics(0.002, 0.95, 10.0), _metrics(0.003, 0.96, 12.0)]
    vitvae = [_metrics(0.004, 0.90, 11.0), _metrics(0.005, 0.91, 11.5)]
    for m in vitvae:  # the ViT-VAE's stronger representation is the one compared
        m["probe/cls_feature/acc"], m["probe/patch_mean/acc"] = m.pop("probe/z_cls/acc"), 0.5
    lines = seeds.results_table({"vitcae": vitcae, "vitvae": vitvae})
    row = {line.split(" | ")[0].lstrip("| "): line for line in lines[2:]}
    assert "0.00250 ± 0.00050" in row["recon MSE"] and row["recon MSE"].endswith("| better |")
    assert "95.5% ± 0.5%" in row["probe accuracy, 5-fold (the stronger representation)"]
    assert "90.5% ± 0.5%" in row["probe accuracy, 5-fold (the stronger representation)"]
    assert "PCA-8 pixels 90.0% ± 0.0%" in row["probe accuracy, 5-fold (the stronger representation)"]
    # FID 11 ± 1 against 11.25 ± 0.25: better on the mean, but inside the spread
    assert row["sample fid"].endswith("| better (within spread) |")
    # worse is said as plainly
    vitvae[0]["recon/mse"] = vitvae[1]["recon/mse"] = 0.001
    worse = [
        line for line in seeds.results_table({"vitcae": vitcae, "vitvae": vitvae}) if "recon MSE" in line
    ]
    assert worse[0].endswith("| worse |")


def test_selection_table_names_each_candidates_epoch():
    history = [
        {"epoch": 0, "val/elbo": 5.0, "val/mse": 0.01, "val/fid": 30.0, "val/kid": 3.0},
        {"epoch": 1, "val/elbo": 3.0, "val/mse": 0.02, "val/fid": 20.0, "val/kid": 2.5},
        {"epoch": 2, "val/elbo": 4.0, "val/mse": 0.03, "val/fid": 25.0, "val/kid": 1.0},
    ]
    line = seeds.selection_table({"run": history})[2]
    elbo, mse, fid, kid = line.split(" | ")[1:5]
    assert elbo.startswith("epoch 2:") and "FID 20.00" in elbo
    assert mse.startswith("epoch 1:") and "mse 0.01000" in mse
    assert fid.startswith("epoch 2:") and kid.startswith("epoch 3:")


def test_doc_section_is_replaced_and_a_doc_without_markers_is_refused(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text(f"intro\n{seeds.START}\nold\n{seeds.END}\nafter\n")
    seeds.write_doc(doc, "new table")
    assert doc.read_text() == f"intro\n{seeds.START}\nnew table\n{seeds.END}\nafter\n"
    plain = tmp_path / "plain.md"
    plain.write_text("no markers\n")
    with pytest.raises(seeds.EvalError, match="markers"):
        seeds.write_doc(plain, "x")
    assert plain.read_text() == "no markers\n"
    assert seeds.main(["--variants", "nope"]) == 2
