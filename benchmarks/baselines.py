"""Spatial-MSMA and its baselines side by side on the benchmark cohort (PROTOCOLS.md sec. 1).

    python benchmarks/baselines.py --manifest COHORT/manifest.json [--model MODEL]
        [--work runs/baselines] [--quick] [--out benchmarks/results/baselines.json]
        [--markdown benchmarks/results/baselines.md]

Every method is trained on the cohort's healthy ``train`` split, calibrated on the healthy
``val`` split (threshold: the model file's default voxel false-positive rate, no lesion
labels; the bundled model's is 0.5 %), and evaluated on ``test`` (new subjects of the
training anatomies) and ``loao`` (the held-out anatomy), healthy scans included. Methods:

- ``spatial-msma``: the model file (default: the bundled model) as ``spatial-msma detect``
  runs it;
- ``voxel-zscore``: per-voxel z-score against the healthy training scans;
- ``autoencoder``: MONAI AutoEncoder reconstruction residual (trained here, cached);
- ``msma-gmm``: a position-blind Gaussian mixture over the same per-location score-norm
  features the flow sees (MSMA without spatial conditioning);
- ``restoration``: residual of an annealed restoration with the same score network.

All maps get the same post-processing as Spatial-MSMA (smoothing, brain rim, native-grid
mapping, component growth and minimum component size, from the model's calibration). Score
norms are computed only when a selected map reads them (the GMM, or a score-norm flow).
Costs are measured per method in a separate process (time per volume from the model-space
scan to native labels, median over ``--cost-scans`` scans, and that process's peak resident
memory); preprocessing is the same for every method and measured once. A reference-scale
configuration (a ~40M parameter score network and a 20-layer, 256-unit flow, both evaluated
at every voxel of the model grid) is trained for a few steps and timed the same way, to give
the cost ratio.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from SpatialMSMALib.baseline_harness import (  # noqa: E402
    SIZES,
    Fitted,
    Size,
    load_ae,
    measure_cost,
    needs_features,
    raw_map,
    score_digest,
)
from SpatialMSMALib.baselines import (  # noqa: E402
    AutoencoderConfig,
    LocationGMM,
    RestorationConfig,
    VoxelZScore,
    log_features,
    train_autoencoder,
)
from SpatialMSMALib.dataset import manifest_scans, model_space  # noqa: E402
from SpatialMSMALib.detection import native_detection  # noqa: E402
from SpatialMSMALib.errors import InputError  # noqa: E402
from SpatialMSMALib.inference import cached_features, select_device  # noqa: E402
from SpatialMSMALib.io import load_volume, write_text_atomically  # noqa: E402
from SpatialMSMALib.metrics import evaluate_case, split_summary  # noqa: E402
from SpatialMSMALib.model import AnomalyModel  # noqa: E402
from SpatialMSMALib.spatial import Calibration, scored_region  # noqa: E402

METHODS = ("spatial-msma", "voxel-zscore", "autoencoder", "msma-gmm", "restoration")
SPLITS = {"test": ("test_healthy", "test_lesioned"), "loao": ("loao_healthy", "loao_lesioned")}
DEFAULT_MODEL = ROOT / "Resources" / "Models" / "spatial_msma.pt"


def fit_methods(names, model, model_path, train, train_paths, work: Path, size: Size,
                device) -> dict:
    """Train every baseline on the healthy training scans (the autoencoder is cached in
    ``work`` under a digest of its config and training scans)."""
    fitted = {}
    train_ids = [s.id for s in train]
    for name in names:
        t0 = time.perf_counter()
        if name == "spatial-msma":
            f = Fitted(name, notes={"model": "trained by training/train_spatial.py"})
        elif name == "voxel-zscore":
            f = Fitted(name, zscore=VoxelZScore.fit((s.image, s.brain_mask) for s in train))
        elif name == "msma-gmm":
            rng = np.random.default_rng(0)
            samples = []
            for scan, path in zip(train, train_paths, strict=True):
                region = scored_region(scan.brain_mask, model.calibration.rim_mm,
                                       model.spacing_mm)
                with np.load(path) as cached:
                    values = log_features(cached["local"], region)
                pick = rng.choice(len(values), min(len(values), size.gmm_locations_per_scan),
                                  replace=False)
                samples.append(values[pick])
            f = Fitted(name, gmm=LocationGMM.fit(np.concatenate(samples)))
            f.notes = {"components": 8, "locations": int(sum(len(s) for s in samples))}
        elif name == "autoencoder":
            f = Fitted(name, autoencoder=fit_autoencoder(train, work, size, device))
            f.notes = {"config": f.autoencoder["config"],
                       "final_loss": f.autoencoder["losses"][-1],
                       "loss_per_100_steps": [float(np.mean(f.autoencoder["losses"][i:i + 100]))
                                              for i in range(0, len(f.autoencoder["losses"]),
                                                             100)],
                       "training_seconds": f.autoencoder["training_seconds"],
                       "cached": f.autoencoder["cached"]}
        elif name == "restoration":
            f = Fitted(name, restoration=RestorationConfig())
            f.notes = asdict(f.restoration)
        else:
            raise ValueError(name)
        f.seconds_to_fit = time.perf_counter() - t0
        f.identity = {k: v for k, v in f.notes.items()
                      if k not in ("cached", "model", "training_seconds")}
        f.identity["train"] = train_ids
        if name == "spatial-msma":
            f.identity = {"model_sha256": hashlib.sha256(Path(model_path).read_bytes())
                          .hexdigest()}
        fitted[name] = f
        print(f"fitted {name} in {f.seconds_to_fit:.1f} s", flush=True)
    return fitted


def fit_autoencoder(train, work: Path, size: Size, device) -> dict:
    from tqdm import tqdm

    from SpatialMSMALib.checkpoint import load_checkpoint, save_checkpoint

    config = AutoencoderConfig(steps=size.autoencoder_steps)
    key = hashlib.sha256(json.dumps([config.to_dict(), [s.id for s in train]]).encode())
    path = work / f"autoencoder_{key.hexdigest()[:12]}.pt"
    in_channels = train[0].image.shape[0]
    if path.exists():
        stored = load_checkpoint(path, kind="baseline-autoencoder")
        return {"config": stored["config"], "in_channels": in_channels,
                "state": stored["states"]["model"], "losses": stored["extra"]["losses"],
                "training_seconds": stored["extra"].get("seconds"), "cached": str(path)}
    bar = tqdm(total=config.steps, desc="autoencoder")

    def progress(step, loss):
        bar.update(1)
        if step % 25 == 0:
            bar.set_postfix(loss=f"{loss:.4f}")

    t0 = time.perf_counter()
    net, losses = train_autoencoder([s.image for s in train], [s.brain_mask for s in train],
                                    config, device, progress)
    seconds = time.perf_counter() - t0
    bar.close()
    save_checkpoint(path, "baseline-autoencoder", config.to_dict(),
                    {"model": net.state_dict()}, {"losses": losses, "seconds": seconds})
    return {"config": config.to_dict(), "in_channels": in_channels,
            "state": {k: v.cpu() for k, v in net.state_dict().items()}, "losses": losses,
            "training_seconds": seconds, "cached": None}


# -- maps, calibration, evaluation ------------------------------------------------------
def method_maps(fitted: Fitted, model, scans, paths, work: Path, device):
    """Yield ``(scan, model-grid map)``; maps are cached as float16 under ``work/maps``."""
    digest = hashlib.sha256(json.dumps([fitted.name, fitted.identity, score_digest(model),
        asdict(model.calibration)["smoothing_mm"],
        model.calibration.rim_mm], default=str).encode()).hexdigest()[:10]
    folder = work / "maps" / f"{fitted.name}_{digest}"
    folder.mkdir(parents=True, exist_ok=True)
    ae_net = load_ae(fitted, device) if fitted.name == "autoencoder" else None
    for scan, path in zip(scans, paths, strict=True):
        cached = folder / f"{scan.id}.npz"
        if cached.exists():
            with np.load(cached) as stored:
                yield scan, stored["heat"].astype(np.float32)
            continue
        local = None
        if needs_features(fitted.name, model):
            with np.load(path) as stored:
                local = stored["local"].astype(np.float32)
        heat = raw_map(fitted, model, scan, local, device, ae_net)
        tmp = cached.with_name(cached.name + ".partial.npz")
        np.savez(tmp, heat=heat.astype(np.float16))
        tmp.replace(cached)
        yield scan, heat


def calibrate(fitted: Fitted, model, val, val_paths, work, device) -> Calibration:
    """The method's healthy-validation calibration, with Spatial-MSMA's post-processing."""
    if fitted.name == "spatial-msma":
        return model.calibration
    c = model.calibration
    values = []
    for scan, heat in method_maps(fitted, model, val, val_paths, work, device):
        region = scored_region(scan.brain_mask, c.rim_mm, model.spacing_mm)
        values.append(heat[region])
    return Calibration.from_healthy(values, default_fpr=c.default_fpr,
                                    smoothing_mm=c.smoothing_mm, rim_mm=c.rim_mm,
                                    min_component_ml=c.min_component_ml,
                                    max_peak_fpr=c.max_peak_fpr,
                                    grow_rate_factor=c.grow_rate_factor,
                                    notes={"calibration_scans": [s.id for s in val]})


def evaluate(fitted, calibration, model, rows, scans, paths, work, device) -> list[dict]:
    holder = SimpleNamespace(calibration=calibration, heat_units=f"{fitted.name} score")
    cases = []
    maps = method_maps(fitted, model, scans, paths, work, device)
    for row, (scan, heat) in zip(rows, maps, strict=True):
        brain = load_volume(row.brain_mask, what="brain mask").data > 0
        detection = native_detection(holder, heat, scan.mapping, brain)
        truth = load_volume(row.lesion_mask, what="lesion mask", allow_empty=True)
        case = evaluate_case(detection.labels > 0, truth.data > 0, truth.spacing,
                             detection.heat, brain)
        case["id"] = row.id
        cases.append(case)
    return cases


def preprocessing_cost(row, model: AnomalyModel) -> dict:
    """Seconds to bring one native scan into the model's space, by the model's own
    preprocessing (deformable step and pipeline version included; the same for every
    method)."""
    from SpatialMSMALib.preprocessing import preprocess_scan

    t0 = time.perf_counter()
    preprocess_scan(load_volume(row.t1, what="T1"), load_volume(row.t2, what="T2"),
                    load_volume(row.brain_mask, what="brain mask"), model.preprocess_config())
    return {"seconds": time.perf_counter() - t0}


# -- tables ------------------------------------------------------------------------------
def _mean_sd(summary: dict, key: str, digits: int = 3) -> str:
    entry = summary.get(key, {})
    mean, sd = entry.get("mean", float("nan")), entry.get("sd", float("nan"))
    text = f"{mean:.{digits}f} ± {sd:.{digits}f}"
    if entry.get("n_undefined"):
        text += f" ({entry['n_undefined']} undef.)"
    return text


def table_rows(results: dict, split: str) -> list[list[str]]:
    header = ["method", "Dice", "AUPRC", "AUROC", "HD99 mm", "MSD mm", "TPR (vol)",
              "TPR pooled", "PPV (vol)", "PPV pooled", "TPR ≥0.5 mL", "healthy FP mL (median)",
              "s / volume", "peak GB"]
    rows = [header]
    for name, method in results["methods"].items():
        summary = method["splits"][split]["summary"]
        les = summary.get("lesioned", {})
        cost = method.get("cost", {})
        large = summary.get("pooled_tpr_lesions_ge_0.5ml")
        rows.append([
            name, _mean_sd(les, "dice"), _mean_sd(les, "auprc"), _mean_sd(les, "auroc"),
            _mean_sd(les, "hd99", 1), _mean_sd(les, "msd", 1), _mean_sd(les, "tpr"),
            f"{les.get('pooled_tpr', float('nan')):.3f}", _mean_sd(les, "ppv"),
            f"{les.get('pooled_ppv', float('nan')):.3f}",
            f"{large:.3f}" if large is not None else "n/a",
            f"{summary.get('healthy', {}).get('median_flagged_ml', float('nan')):.2f}",
            f"{cost.get('seconds_per_volume', float('nan')):.1f}",
            f"{cost.get('peak_rss_gb', float('nan')):.2f}"])
    return rows


def size_rows(results: dict, split: str) -> list[list[str]]:
    first = next(iter(results["methods"].values()))
    bins = first["splits"][split]["summary"]["lesioned"]["tpr_by_size"]
    header = ["method"] + [f"{int(b['bin_mm3'][0])}-{b['bin_mm3'][1]:g} mm³ (n={b['n']})"
                           for b in bins if b["n"]]
    rows = [header]
    for name, method in results["methods"].items():
        entries = method["splits"][split]["summary"]["lesioned"]["tpr_by_size"]
        rows.append([name] + [f"{b['tpr']:.2f}" for b in entries if b["n"]])
    return rows


def markdown(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(lines)


def report(results: dict) -> str:
    parts = []
    for split in results["splits"]:
        n = next(iter(results["methods"].values()))["splits"][split]["summary"]
        parts.append(f"### {split}: {n['n_lesioned']} lesioned + {n['n_healthy']} healthy "
                     "scans\n")
        parts.append(markdown(table_rows(results, split)))
        parts.append("\nTPR by lesion size (pooled):\n")
        parts.append(markdown(size_rows(results, split)))
        parts.append("")
    costs = results["costs"]
    ref = results["methods"].get("spatial-msma", {}).get("cost", {})
    lines = [f"Preprocessing (the same for every method): {costs['preprocess_seconds']:.1f} s "
             "per scan."]
    reference = costs.get("reference-scale", {})
    if "seconds_per_volume" in reference and "seconds_per_volume" in ref:
        lines.append(
            f"Reference scale ({reference['parameters']['score_network'] / 1e6:.1f}M-parameter "
            f"score network, {reference['parameters']['flow'] / 1e6:.1f}M-parameter 20-layer "
            f"flow, every voxel): {reference['seconds_per_volume']:.0f} s per volume, peak "
            f"{reference['peak_rss_gb']:.2f} GB; Spatial-MSMA is "
            f"{reference['seconds_per_volume'] / ref['seconds_per_volume']:.1f}x cheaper. "
            + reference["measured"]["note"] + ".")
    restoration = results["methods"].get("restoration", {}).get("cost", {})
    if "seconds_per_volume" in restoration and "seconds_per_volume" in ref:
        lines.append(f"Spatial-MSMA / restoration time per volume: "
                     f"{ref['seconds_per_volume'] / restoration['seconds_per_volume']:.2f}.")
    parts.append("\n".join(lines))
    return "\n".join(parts)


# -- main --------------------------------------------------------------------------------
def _take(rows, n):
    return rows if n is None else rows[:n]


def run(args, size: Size | None = None) -> dict:
    """The whole benchmark; ``size`` overrides ``--quick`` (tests use a tiny one)."""
    size = size or SIZES["quick" if args.quick else "default"]
    if args.cost_scans is not None:
        size = replace(size, cost_scans=args.cost_scans)
    device = select_device(args.device)
    model = AnomalyModel.load(args.model)
    if model.spatial is None or model.calibration is None:
        raise SystemExit(f"'{args.model}' has no Spatial-MSMA flow and calibration")
    work = Path(args.work)
    cache = Path(args.cache) if args.cache else work / "cache"
    channels = len(model.channel_names)
    names = ("train", "val") + tuple(s for split in args.splits for s in SPLITS[split])
    rows = manifest_scans(args.manifest, names)
    train_rows, val_rows = _take(rows["train"], size.train), _take(rows["val"], size.val)
    test_rows = {split: _take(rows[h], size.healthy) + _take(rows[les], size.lesioned)
                 for split, (h, les) in SPLITS.items() if split in args.splits}
    for what, r in [("train", train_rows), ("val", val_rows)] + list(test_rows.items()):
        if not r:
            hint = " (choose the splits it has with --splits)" if what in SPLITS else ""
            raise SystemExit(f"the manifest '{args.manifest}' has no {what} scans{hint}")
    feature_dir = cache / model.feature_cache_name(score_digest(model))
    with_features = any(needs_features(name, model) for name in args.methods)

    def load(rows_):
        scans = model_space(rows_, cache, model.spacing_mm, demons=model.demons, channels=channels,
                            version=model.preprocess_version)
        if not with_features:  # no selected map reads score norms: skip the score network
            return scans, [None] * len(scans)
        _, paths = cached_features(model, scans, feature_dir, device, save_local=True)
        return scans, paths

    t_start = time.perf_counter()
    train, train_paths = load(train_rows)
    val, val_paths = load(val_rows)
    fitted = fit_methods(args.methods, model, args.model, train, train_paths, work, size,
                         device)
    del train
    results = {"command": " ".join(sys.argv), "size": "quick" if args.quick else "default",
               "model": str(args.model), "provenance": model.provenance,
               "machine": {"cpu_threads": torch.get_num_threads(), "device": str(device),
                           "gpu": torch.cuda.get_device_name() if device.type == "cuda"
                           else None, "platform": platform.platform()},
               "n_train": len(train_rows), "n_val": len(val_rows),
               "splits": list(test_rows), "methods": {}, "costs": {}}
    loaded = {split: load(split_rows) for split, split_rows in test_rows.items()}
    for name in args.methods:
        f = fitted[name]
        calibration = calibrate(f, model, val, val_paths, work, device)
        entry = {"fit_seconds": f.seconds_to_fit, "notes": f.notes,
                 "threshold": calibration.default_threshold,
                 "voxel_fpr": calibration.default_fpr,
                 "post_processing": {k: getattr(calibration, k) for k in (
                     "smoothing_mm", "rim_mm", "min_component_ml", "max_peak_fpr",
                     "grow_rate_factor")},
                 "splits": {}}
        for split, split_rows in test_rows.items():
            scans, paths = loaded[split]
            cases = evaluate(f, calibration, model, split_rows, scans, paths, work, device)
            entry["splits"][split] = {"cases": cases, "summary": split_summary(cases)}
            les = entry["splits"][split]["summary"].get("lesioned", {})
            print(f"{name} {split}: Dice {les.get('dice', {}).get('mean', float('nan')):.3f} "
                  f"TPR {les.get('pooled_tpr', float('nan')):.3f} "
                  f"PPV {les.get('pooled_ppv', float('nan')):.3f}", flush=True)
        results["methods"][name] = entry
    results["evaluation_seconds"] = time.perf_counter() - t_start
    if args.out:  # the accuracy tables survive a failure of the cost part
        write_text_atomically(args.out, json.dumps(results, indent=1, default=float))
    # costs: each method in its own process on the first lesioned test scans
    first = next(iter(test_rows))
    lesioned_rows = _take(rows[SPLITS[first][1]], size.lesioned)
    cost_rows = (lesioned_rows or test_rows[first])[: size.cost_scans]
    load(cost_rows)  # in the cache, where the probes read them
    results["costs"]["preprocess_seconds"] = preprocessing_cost(cost_rows[0], model)["seconds"]
    if not args.skip_cost:
        for name in args.methods:
            print(f"cost of {name} ...", flush=True)
            results["methods"][name]["cost"] = measure_cost(
                name, fitted[name], args.model, cache, cost_rows, device, size, work)
        if not args.skip_reference:
            print("cost of the reference scale ...", flush=True)
            results["costs"]["reference-scale"] = measure_cost(
                "reference-scale", None, args.model, cache, cost_rows[:1], device, size, work)
    results["total_seconds"] = time.perf_counter() - t_start
    return results


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, required=True,
                        help="benchmark cohort (spatial-msma make-benchmark)")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--work", type=Path, default=Path("runs/baselines"),
                        help="trained baselines and cached maps")
    parser.add_argument("--cache", type=Path, help="model-space and feature cache "
                        "(default WORK/cache; share it with train_spatial.py's)")
    parser.add_argument("--quick", action="store_true",
                        help="a few scans and short training (development, < 15 min warm)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=list(SPLITS))
    parser.add_argument("--cost-scans", type=int, help="scans timed per method")
    parser.add_argument("--skip-cost", action="store_true")
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing --out / --markdown files")
    return parser.parse_args(argv)


def main(argv=None, size: Size | None = None) -> dict:
    args = parse_args(argv)
    if not args.manifest.exists():
        raise SystemExit(f"no benchmark cohort at '{args.manifest}' (build one with "
                         "`spatial-msma make-benchmark --out DIR`)")
    existing = [str(p) for p in (args.out, args.markdown) if p and p.exists()]
    if existing and not args.overwrite:
        raise SystemExit(f"{', '.join(existing)} already exist(s); pass --overwrite to "
                         "replace them")
    try:
        results = run(args, size)
    except InputError as e:  # a missing or unusable model, scan or cache file
        raise SystemExit(f"error: {e}") from None
    text = report(results)
    print("\n" + text)
    for path, content in ((args.out, json.dumps(results, indent=1, default=float)),
                          (args.markdown, text + "\n")):
        if path:
            write_text_atomically(path, content)
    return results


if __name__ == "__main__":
    main()
