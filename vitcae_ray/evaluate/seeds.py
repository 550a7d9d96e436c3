"""``python -m vitcae_ray.evaluate.seeds``: the quickstart trained and evaluated for several
seeds, for ViTCAE and the ViT-VAE baseline, and the table of every metric as mean ± std with
its baselines beside it.

For each variant and seed it runs the real commands, one after another:

    python -m vitcae_ray.train --seed S --output OUT/<variant>-s<S> --set model.variant=<variant>
        --set train.eval_every=1 [--epochs E]
    python -m vitcae_ray.evaluate --model OUT/<variant>-s<S> --out OUT/<variant>-s<S>/eval --seed S

(``train.eval_every=1`` records ``val/fid`` at every epoch, for the selection table; the
evaluation draws on its own generators, so the training itself is that of the quickstart.)
A finished run or evaluation is kept and not run again. Then it writes ``OUT/table.md``:
the results table and, per run, the epoch each candidate selection metric picks with that
epoch's ``val/mse`` and ``val/fid``; ``--doc FILE`` also replaces the part of FILE between
``<!-- seeds:start -->`` and ``<!-- seeds:end -->`` with it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from ..errors import fail
from .loading import EvalError

START, END = "<!-- seeds:start -->", "<!-- seeds:end -->"
VARIANTS = ("vitcae", "vitvae")
CANDIDATES = ("val/elbo", "val/mse", "val/fid", "val/kid")  # all minimised

SANITY = ("real", "prototypes", "copies", "noise")
# (label, key, lower is better (None: neither), [(baseline label, key)])
ROWS = [
    ("recon MSE", "recon/mse", True, []),
    ("-ELBO, nats (sampled)", "recon/elbo", True, []),
    ("IWAE -log p, K=64, nats", "iwae/nll_k64", True, []),
    *[
        (
            f"inpaint {m} PSNR, dB",
            f"inpaint/{m}/psnr_model",
            False,
            [("mean fill", f"inpaint/{m}/psnr_mean_fill"), ("biharmonic", f"inpaint/{m}/psnr_biharmonic")],
        )
        for m in ("center25", "center50", "random25", "random50")
    ],
    *[
        (f"sample {k}", f"sample/{k}", low, [(r, f"sample/{r}/{k}") for r in SANITY])
        for k, low in (("kid", True), ("fid", True), ("precision", False), ("recall", False))
    ],
    (
        "sample memorisation (1: as far from the training set as held-out images)",
        "sample/memorisation",
        None,
        [("real", "sample/real/memorisation"), ("copies", "sample/copies/memorisation")],
    ),
    (
        "sample low-confidence share",
        "sample/low_confidence_share",
        True,
        [("real", "sample/real/low_confidence_share")],
    ),
    *[
        (
            f"sample {k}, z_cls from the model's mixture (generate's default)",
            f"sample/mixture/{k}",
            low,
            [(r, f"sample/{r}/{k}") for r in SANITY[:2]],
        )
        for k, low in (("kid", True), ("fid", True), ("precision", False), ("recall", False))
    ],
    (
        "sample low-confidence share, z_cls from the model's mixture (generate's default)",
        "sample/mixture/low_confidence_share",
        True,
        [("real", "sample/real/low_confidence_share")],
    ),
    (
        "sample seam ratio (patch-border step / inside step)",
        "sample/seam_ratio",
        True,
        [("real", "sample/real/seam_ratio")],
    ),
    (
        "sample seam ratio, z_cls from the model's mixture (generate's default)",
        "sample/mixture/seam_ratio",
        True,
        [("real", "sample/real/seam_ratio")],
    ),
    ("recon seam ratio", "recon/seam_ratio", True, [("real", "recon/real/seam_ratio")]),
    ("interp max/mean step", "interp/smoothness", True, []),
    (
        "probe accuracy, 5-fold (the stronger representation)",
        "probe/best",
        False,
        [("PCA-8 pixels", "probe/pca8_pixels/acc"), ("pixels", "probe/pixels/acc")],
    ),
]


def _run(cmd: list[str], log) -> None:
    log("$ " + " ".join(cmd))
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        raise EvalError(f"{' '.join(cmd[:4])} ... exited with {proc.returncode}: see its output above")


def run_one(variant: str, seed: int, out: Path, epochs: int | None, log) -> tuple[dict, list[dict]]:
    """Train and evaluate one (variant, seed) unless already done: (metrics.json, history)."""
    run_dir = out / f"{variant}-s{seed}"
    history_file = run_dir / "metrics.jsonl"
    done = history_file.is_file() and any(json.loads(line).get("done") for line in history_file.open())
    if not done:
        cmd = [sys.executable, "-m", "vitcae_ray.train", "--seed", str(seed), "--output", str(run_dir)]
        cmd += ["--set", f"model.variant={variant}", "--set", "train.eval_every=1"]
        _run(cmd + (["--epochs", str(epochs)] if epochs else []), log)
    eval_dir = run_dir / "eval"
    if not (eval_dir / "metrics.json").is_file():
        cmd = [sys.executable, "-m", "vitcae_ray.evaluate", "--model", str(run_dir), "--out", str(eval_dir)]
        _run(cmd + ["--seed", str(seed)], log)
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    history = [json.loads(line) for line in history_file.open()]
    return metrics, history


def _best_probe(m: dict) -> float:
    """The stronger of the model's representations (ViT-VAE has two)."""
    names = [
        k
        for k in m
        if k.startswith("probe/") and k.endswith("/acc") and "pixels" not in k and k != "probe/acc"
    ]
    return max(m[k] for k in names)


def _ms(values: list[float], fmt: str) -> str:
    return f"{fmt.format(np.mean(values))} ± {fmt.format(np.std(values))}"


def _fmt(key: str) -> str:
    if "probe" in key or "share" in key:
        return "{:.1%}"
    return {"recon/mse": "{:.5f}", "sample/kid": "{:.3f}"}.get(key, "{:.2f}")


def results_table(results: dict[str, list[dict]]) -> list[str]:
    """Markdown: one row per metric, ViTCAE and ViT-VAE as mean ± std over seeds, the
    baselines (from ViTCAE's evaluations) beside them, and which of the two is better."""
    for runs in results.values():
        for m in runs:
            m["probe/best"] = _best_probe(m)
    variants = list(results)
    head = "| metric | " + " | ".join(variants) + " | baselines | ViTCAE vs ViT-VAE |"
    lines = [head, "|" + "---|" * (len(variants) + 3)]
    for label, key, lower, base in ROWS:
        fmt = _fmt(key)
        vals = {v: [m[key] for m in results[v] if key in m] for v in variants}
        cells = [_ms(vals[v], fmt) if vals[v] else "-" for v in variants]
        ref = results[variants[0]]
        bcell = "; ".join(f"{name} {_ms([m[k] for m in ref], fmt)}" for name, k in base) or "-"
        mark = "-"
        if lower is not None and len(variants) == 2 and all(vals.values()):
            a, b = (np.mean(vals[v]) for v in variants)
            spread = np.std(vals[variants[0]]) + np.std(vals[variants[1]])
            better = (a < b) if lower else (a > b)
            mark = ("better" if better else "worse") + (" (within spread)" if abs(a - b) <= spread else "")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {bcell} | {mark} |")
    return lines


def selection_table(histories: dict[str, list[dict]]) -> list[str]:
    """Per run: the epoch (1-based) each candidate selection metric picks, with that epoch's
    val/mse and val/fid."""
    lines = ["| run | " + " | ".join(CANDIDATES) + " |", "|" + "---|" * (len(CANDIDATES) + 1)]
    for name, history in histories.items():
        epochs = [h for h in history if "val/mse" in h]
        cells = []
        for metric in CANDIDATES:
            have = [h for h in epochs if metric in h]
            if not have:
                cells.append("-")
                continue
            h = min(have, key=lambda h: h[metric])
            fid = f"{h['val/fid']:.2f}" if "val/fid" in h else "-"
            cells.append(f"epoch {int(h['epoch']) + 1}: mse {h['val/mse']:.5f}, FID {fid}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def write_doc(doc: Path, text: str) -> None:
    body = doc.read_text()
    if START not in body or END not in body:
        raise EvalError(f"--doc {doc}: no {START} ... {END} section to replace: add the two markers")
    head, rest = body.split(START, 1)
    doc.write_text(head + START + "\n" + text + "\n" + END + rest.split(END, 1)[1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m vitcae_ray.evaluate.seeds", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    p.add_argument("--variants", default=",".join(VARIANTS), help="model.variant values, ViTCAE first")
    p.add_argument("--epochs", type=int, help="train.epochs (default: the quickstart's)")
    p.add_argument("--out", default="runs/seeds", help="where the runs and table.md go")
    p.add_argument("--doc", help="a Markdown file whose seeds section gets the tables")
    args = p.parse_args(argv)
    log = lambda s: print(s, flush=True)  # noqa: E731
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        if not seeds or any(v not in VARIANTS for v in variants):
            raise EvalError(
                f"--seeds {args.seeds!r} / --variants {args.variants!r}: pass integers and "
                f"variants from {', '.join(VARIANTS)}"
            )
        if args.doc and not Path(args.doc).is_file():
            raise EvalError(f"--doc {args.doc!r} not found: pass an existing Markdown file")
        out = Path(args.out)
        results: dict[str, list[dict]] = {v: [] for v in variants}
        histories: dict[str, list[dict]] = {}
        for v in variants:
            for s in seeds:
                m, h = run_one(v, s, out, args.epochs, log)
                results[v].append(m)
                histories[f"{v} seed {s}"] = h
        seeds_text = ", ".join(map(str, seeds))
        text = "\n".join(
            [
                f"Seeds {seeds_text}; mean ± std over seeds.",
                "",
                *results_table(results),
                "",
                "The epoch (1-based) each candidate selection metric picks, with that epoch's "
                "val/mse and val/fid:",
                "",
                *selection_table(histories),
            ]
        )
        out.mkdir(parents=True, exist_ok=True)
        (out / "table.md").write_text(text + "\n")
        log(text)
        if args.doc:
            write_doc(Path(args.doc), text)
            log(f"updated {args.doc}")
    except (EvalError, ValueError) as e:
        return fail(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
