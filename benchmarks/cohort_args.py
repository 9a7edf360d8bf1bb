"""Command-line pieces shared by the benchmark scripts that read a benchmark cohort through
the model-space cache (``false_positives.py``, ``lesion_evidence.py``,
``feature_precision.py``, ``groupnorm_precision.py``; ``typicality_levels.py``,
``typicality_reg_covar.py`` and ``msma_3d.py`` use the output refusal and error exit,
``detect_cost.py`` and ``cli_start_cost.py`` the output refusal), and the loop over a
split's scans with their local score norms (``false_positives.py``, ``lesion_evidence.py``
and ``post_processing_sweep.py``; ``spatial_3d.py`` its two steps, to time the features),
with the records built per scan (``false_positives.py``, ``lesion_evidence.py``); and the
options and model check of the scripts that run ``detect`` on demo-like subjects
(``thick_slices.py``, ``flair_as_t2.py``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from SpatialMSMALib.errors import InputError

BUNDLED_MODEL = Path(__file__).resolve().parents[1] / "Resources" / "Models" / "spatial_msma.pt"


def cohort_parser(description: str) -> argparse.ArgumentParser:
    """A parser with ``--model`` (default: the bundled model), ``--manifest``, ``--cache``,
    ``--out`` and ``--overwrite``; a script adds its own options."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", type=Path, default=BUNDLED_MODEL)
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--cache", type=Path, required=True, help="model-space cache folder")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--overwrite", action="store_true")
    return parser


def split_parser(description: str, splits) -> argparse.ArgumentParser:
    """:func:`cohort_parser` plus ``--splits`` (the names in ``splits``, all by default) and
    ``--device``."""
    parser = cohort_parser(description)
    parser.add_argument("--splits", nargs="+", choices=list(splits), default=list(splits))
    parser.add_argument("--device", default="cpu")
    return parser


def demo_subjects_parser(description: str, healthy_seeds: list[int]) -> argparse.ArgumentParser:
    """A parser for the scripts that run ``detect`` on 1 mm subjects made like the demo's
    (``thick_slices.py``, ``flair_as_t2.py``): ``--model`` (default: the bundled T1 + T2
    model for scans with a brain mask), ``--lesioned-seeds`` (7: the demo subject),
    ``--healthy-seeds``, ``--out``, ``--overwrite`` and ``--device``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", type=Path,
                        help="T1 + T2 model file (default: the bundled one for scans with a "
                             "brain mask)")
    parser.add_argument("--lesioned-seeds", type=int, nargs="*", default=[7])
    parser.add_argument("--healthy-seeds", type=int, nargs="*", default=healthy_seeds)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--device", default="cpu")
    return parser


def t1_t2_model(path: Path | None):
    """The model file at ``path`` (default: the bundled one for T1 + T2 with a brain mask);
    InputError unless it reads T1 + T2."""
    from SpatialMSMALib.model import resolve_model

    model = resolve_model(path, has_t2=True, has_mask=True)
    if len(model.channel_names) != 2:
        raise InputError("the model must be a T1 + T2 model")
    return model


def demo_subject_jobs(args: argparse.Namespace) -> list[tuple[str, int, object]]:
    """``(key, seed, lesion config or None)`` for each of ``--lesioned-seeds`` (the default
    lesion simulator), then each of ``--healthy-seeds`` (no lesions); keys
    ``lesioned_seed7``, ``healthy_seed8``, ..."""
    from SpatialMSMALib.lesions import LesionConfig

    return ([(f"lesioned_seed{s}", s, LesionConfig()) for s in args.lesioned_seeds]
            + [(f"healthy_seed{s}", s, None) for s in args.healthy_seeds])


def subject_volumes(subject) -> tuple:
    """``(T1, T2, brain mask)`` volumes of a synthetic subject (``synthesis.Subject``) on its
    own grid, as ``detect`` takes them."""
    from SpatialMSMALib.io import Volume

    affine = subject.grid.affine
    return (Volume(subject.t1, affine), Volume(subject.t2, affine),
            Volume(subject.brain_mask > 0, affine))


def save_result(args: argparse.Namespace, result: dict, final: bool = False) -> None:
    """Write ``result`` as JSON to ``--out`` (atomically; nothing without ``--out``), after
    each subject so that minutes of work survive an interruption; ``final`` first records
    the machine."""
    import json
    import os
    import platform

    from SpatialMSMALib.io import write_text_atomically

    if final:
        result["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform()}
    if args.out:
        write_text_atomically(args.out, json.dumps(result, indent=1) + "\n")


def load_spatial_model(path: Path):
    """The model file at ``path``; InputError if it has no Spatial-MSMA flow and
    calibration."""
    from SpatialMSMALib.model import AnomalyModel

    model = AnomalyModel.load(path)
    if model.spatial is None or model.calibration is None:
        raise InputError(f"'{path}' has no Spatial-MSMA flow and calibration")
    return model


def refuse_existing_output(args: argparse.Namespace) -> None:
    """Raise InputError when ``--out`` exists and ``--overwrite`` was not given, or cannot be
    written at all (a folder, or under a file; :func:`io.check_output_file`): before the
    script's minutes of work, not at its end."""
    from SpatialMSMALib.io import check_output_file

    if args.out:
        check_output_file(args.out, "--out")
    if args.out and args.out.exists() and not args.overwrite:
        raise InputError(f"'{args.out}' exists; pass --overwrite to replace it")


def manifest_subject(manifest_path: Path, subject_id: str) -> tuple[dict, Path, dict]:
    """``(manifest, cohort folder, subject entry)`` of one subject of a benchmark manifest
    (the file or its folder); InputError when the subject is not in it."""
    from SpatialMSMALib.cohort import load_manifest

    manifest = load_manifest(manifest_path)
    entry = {s["id"]: s for s in manifest["subjects"]}.get(subject_id)
    if entry is None:
        raise InputError(f"subject '{subject_id}' is not in '{manifest_path}'")
    return manifest, Path(manifest["root"]), entry


def exit_with(error: InputError) -> None:
    """Print ``error: ...`` on stderr and exit with status 2 (no traceback)."""
    print(f"error: {error}", file=sys.stderr)
    raise SystemExit(2) from None


def norm_paths(model, scans: list, cache: Path, device: str = "cpu") -> list:
    """The cached score-norm file of each model-space scan (computed into ``cache`` when
    missing), or None per scan for a flow that reads intensities only: the score network
    then does not run (nor for an empty list: every scan of a split refused)."""
    from SpatialMSMALib.inference import cached_features

    if not scans or not model.spatial.config.score_features:
        return [None] * len(scans)
    _, paths = cached_features(model, scans, cache / model.feature_cache_name(), device,
                               save_local=True)
    return paths


def local_norms(path: Path | None, shape):
    """``(L, X, Y, Z)`` float32 local score norms from a cached file, ``(0, *shape)`` for
    None (a flow that reads intensities only)."""
    import numpy as np

    if path is None:
        return np.zeros((0, *shape), np.float32)
    with np.load(path) as cached:
        return cached["local"].astype(np.float32)


def scans_with_local_norms(model, rows: list, cache: Path, device: str = "cpu"):
    """Yield ``(row, model-space scan, local score norms)`` for the manifest ``rows`` of one
    split, preprocessed through the model-space ``cache`` as ``benchmarks/spatial_3d.py``
    does (:func:`norm_paths`, :func:`local_norms`)."""
    from SpatialMSMALib.dataset import model_space

    scans = model_space(rows, cache, model.spacing_mm, demons=model.demons,
                        brain_masks=model.brain_masks,
                        version=model.preprocess_version, channels=len(model.channel_names))
    paths = norm_paths(model, scans, cache, device)
    for row, scan, path in zip(rows, scans, paths, strict=True):
        yield row, scan, local_norms(path, scan.brain_mask.shape)


def native_evidence_maps(model, row, scan, local, device: str = "cpu"):
    """The detection of one model-space scan at the model's default operating point (the
    path of ``benchmarks/spatial_3d.py``), with the flow's part of its heat map:
    ``(detection, flow part (I, J, K) on the native grid or None for a flow-only model,
    native brain mask (I, J, K) bool)``. For a model with a normative contrast map the heat
    map is the fused evidence (``-log10`` healthy voxel FPR) and the flow's part is its
    evidence."""
    import numpy as np

    from SpatialMSMALib.detection import component_heat_maps, native_detection
    from SpatialMSMALib.normative import evidence

    flow_heat, normative_heat = component_heat_maps(model, scan.image, scan.brain_mask, local,
                                                    device)
    brain = native_brain_mask(model, row, scan)
    if normative_heat is None:
        fused_model, flow_model = flow_heat, None
    else:
        flow_model = evidence(flow_heat, model.component_calibrations["flow"])
        fused_model = flow_model + np.nan_to_num(
            evidence(normative_heat, model.component_calibrations["normative"]))
    detection = native_detection(model, fused_model.astype(np.float32), scan.mapping, brain)
    flow_native = (None if flow_model is None else
                   native_detection(model, flow_model.astype(np.float32), scan.mapping,
                                    brain).heat)
    return detection, flow_native, brain


def native_brain_mask(model, row, scan):
    """The native-grid brain mask ``(I, J, K)`` bool that detection scores for the benchmark
    ``row``: its own mask, or for a model that sets masks aside (``brain_masks == "atlas"``)
    the atlas mask through the scan's registration, as ``detect`` takes it."""
    from SpatialMSMALib.io import load_volume
    from SpatialMSMALib.preprocessing import atlas_native_brain_mask

    if model.brain_masks == "atlas":
        return atlas_native_brain_mask(scan.mapping)
    return load_volume(row.brain_mask, what="brain mask").data > 0


def records_per_scan(model, rows: list, cache: Path, device: str, describe, line) -> dict:
    """``{scan id: describe(row, scan, local)}`` over the scans of one split
    (:func:`scans_with_local_norms`); ``line(records)`` is printed after each scan's id as
    it comes."""
    per_scan = {}
    for row, scan, local in scans_with_local_norms(model, rows, cache, device):
        per_scan[row.id] = describe(row, scan, local)
        print(f"{row.id}: {line(per_scan[row.id])}", flush=True)
    return per_scan
