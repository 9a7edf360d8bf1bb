"""The reproducible benchmark cohort (PROTOCOLS.md section 1) and its manifest.

Splits: ``train`` / ``val`` (healthy), ``test_healthy``, ``test_lesioned`` (anatomies seen in
training, new deformations), and ``loao_healthy`` / ``loao_lesioned`` (an anatomy never used
for training: leave-one-anatomy-out). Each subject's seed is derived from the master seed and
recorded, and files are written without timestamps: the same seed gives the same bytes.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import __version__
from .anatomy import Anatomy, available_anatomies, load_anatomy
from .errors import InputError
from .io import check_output_folder, save_volume
from .lesions import LesionConfig
from .synthesis import SubjectConfig, synthesize_subject

#: anatomy held out for the leave-one-anatomy-out split, in order of preference
HOLDOUT_PREFERENCE = ("colin27", "robex_reference", "mni152nlin6asym")

MANIFEST_NAME = "manifest.json"


@dataclass
class CohortSizes:
    n_train: int = 40
    n_val: int = 10
    n_test_healthy: int = 10
    n_test_lesioned: int = 20
    n_loao_healthy: int = 5
    n_loao_lesioned: int = 10


#: range of the morph weight drawn for a morphed subject (0: own shape, 1: the target's)
MORPH_WEIGHT_RANGE = (0.2, 1.0)


def plan_cohort(
    anatomies: list[str], sizes: CohortSizes, seed: int, morph_fraction: float = 0.0
) -> tuple[list[dict], str | None]:
    """Subject list (id, split, anatomy, lesioned, seed) and the held-out anatomy (or None).

    With ``morph_fraction`` > 0 that fraction of the ``train`` and ``val`` subjects (drawn
    per subject) is made from its anatomy morphed towards another training anatomy
    (:mod:`.morph`): their records get ``morph_target`` and ``morph_weight``. The held-out
    anatomy is never a target, and the other splits are never morphed, so a cohort's test
    and LOAO scans are the same with or without morphs."""
    if not 0.0 <= morph_fraction <= 1.0:
        raise InputError(f"the morph fraction must be in [0, 1], not {morph_fraction}")
    holdout = next((a for a in HOLDOUT_PREFERENCE if a in anatomies), None)
    training = [a for a in anatomies if a != holdout]
    splits = [
        ("train", sizes.n_train, training, False),
        ("val", sizes.n_val, training, False),
        ("test_healthy", sizes.n_test_healthy, training, False),
        ("test_lesioned", sizes.n_test_lesioned, training, True),
    ]
    if holdout is not None:
        splits += [
            ("loao_healthy", sizes.n_loao_healthy, [holdout], False),
            ("loao_lesioned", sizes.n_loao_lesioned, [holdout], True),
        ]
    total = sum(n for _, n, _, _ in splits)
    seeds = np.random.SeedSequence(seed).generate_state(total, dtype=np.uint32)
    subjects, index = [], 0
    for split, n, pool, lesioned in splits:
        for i in range(n):
            subjects.append(
                {
                    "id": f"{split}_{i:03d}",
                    "split": split,
                    "anatomy": pool[i % len(pool)],
                    "lesioned": lesioned,
                    "seed": int(seeds[index]),
                }
            )
            index += 1
    if morph_fraction > 0:
        if len(training) < 2:
            raise InputError("morphing needs at least two training anatomies "
                             f"(have {', '.join(training)}): pass --anatomy-dir")
        for record in subjects:
            if record["split"] not in ("train", "val"):
                continue
            rng = np.random.default_rng([record["seed"], 1])  # independent of the subject's draws
            if rng.uniform() < morph_fraction:
                others = [a for a in training if a != record["anatomy"]]
                record["morph_target"] = others[int(rng.integers(len(others)))]
                record["morph_weight"] = round(float(rng.uniform(*MORPH_WEIGHT_RANGE)), 4)
    return subjects, holdout


def make_benchmark(
    out_dir: str | Path,
    *,
    anatomy_dir: str | Path | None = None,
    sizes: CohortSizes | None = None,
    seed: int = 0,
    subject_config: SubjectConfig | None = None,
    lesion_config: LesionConfig | None = None,
    morph_fraction: float = 0.0,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Generate the cohort into ``out_dir`` and return the manifest path.

    Writes per subject ``<id>_t1.nii.gz``, ``_t2.nii.gz`` (synthetic T2-like),
    ``_brainmask.nii.gz``, ``_lesionmask.nii.gz`` and ``_tissue.nii.gz`` (0 background,
    1 CSF, 2 GM, 3 WM), plus ``manifest.json`` and ``manifest.csv``. ``morph_fraction``:
    see :func:`plan_cohort` (the fields between anatomy pairs are computed once per run).
    """
    out_dir = Path(out_dir)
    sizes = sizes or CohortSizes()
    subject_config = subject_config or SubjectConfig()
    lesion_config = lesion_config or LesionConfig()
    check_output_folder(out_dir, "cohort folder")
    manifest_path = out_dir / MANIFEST_NAME
    if manifest_path.exists() and not overwrite:
        raise InputError(
            f"'{manifest_path}' already exists; refusing to overwrite (use --overwrite)"
        )
    anatomy_names = available_anatomies(anatomy_dir)
    subjects, holdout = plan_cohort(anatomy_names, sizes, seed, morph_fraction)
    out_dir.mkdir(parents=True, exist_ok=True)
    fields = _morph_fields(subjects, anatomy_dir, progress)
    cache: dict[str, Anatomy] = {}
    # group by anatomy so each is loaded once; order of writing does not affect the bytes
    for record in tqdm(
        sorted(subjects, key=lambda r: r["anatomy"]), desc="subjects", disable=not progress
    ):
        name = record["anatomy"]
        if name not in cache:
            cache.clear()
            cache[name] = load_anatomy(name, anatomy_dir)
        subject = synthesize_subject(
            cache[name],
            record["seed"],
            subject_config,
            lesion_config if record["lesioned"] else None,
            morph=((fields[name, record["morph_target"]], record["morph_weight"])
                   if "morph_target" in record else None),
        )
        files = {  # intensities are stored as int16 (WM ~ 1000, noise SD >= 10): lossless enough
            "t1": _to_int16(subject.t1),
            "t2": _to_int16(subject.t2),
            "brain_mask": subject.brain_mask,
            "lesion_mask": subject.lesion_mask,
            "tissue": subject.tissue_labels,
        }
        suffix = {"brain_mask": "brainmask", "lesion_mask": "lesionmask"}
        for key, array in files.items():
            file_name = f"{record['id']}_{suffix.get(key, key)}.nii.gz"
            save_volume(out_dir / file_name, array, subject.grid.affine, overwrite=True)
            record[key] = file_name
        record["shape"] = list(subject.grid.shape)
        record["spacing_mm"] = subject.grid.spacing.tolist()
        record["n_lesions"] = len(subject.lesions)
        record["lesion_volume_ml"] = round(
            float(subject.lesion_mask.sum() * np.prod(subject.grid.spacing) / 1000), 4
        )
        record["lesions"] = subject.lesions
    manifest = {
        "format": "spatial-msma-benchmark/1",
        "version": __version__,
        "seed": seed,
        "anatomies": anatomy_names,
        "holdout_anatomy": holdout,
        "notes": [
            "T2 is a synthetic T2-like channel made from tissue maps (no real T2 is available).",
            "Leave-one-anatomy-out split "
            + (f"holds out '{holdout}'." if holdout else "unavailable: only one anatomy given."),
        ],
        "sizes": vars(sizes),
        "subject_config": subject_config.to_dict(),
        "lesion_config": lesion_config.to_dict(),
        "morph": {"fraction": morph_fraction, "weight_range": list(MORPH_WEIGHT_RANGE),
                  "pairs": sorted(f"{a}->{b}" for a, b in fields)},
        "lesion_statistics": lesion_statistics(subjects),
        "subjects": subjects,
    }
    _write_text(manifest_path, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    _write_csv(out_dir / "manifest.csv", subjects)
    return manifest_path


def _morph_fields(subjects: list[dict], anatomy_dir, progress: bool) -> dict:
    """``(source, target) -> MorphField`` for every pair the planned subjects use."""
    from .morph import morph_field

    pairs = sorted({(r["anatomy"], r["morph_target"]) for r in subjects if "morph_target" in r})
    loaded: dict[str, Anatomy] = {}
    fields = {}
    for source, target in tqdm(pairs, desc="morph fields", disable=not progress or not pairs):
        for name in (source, target):
            if name not in loaded:
                loaded[name] = load_anatomy(name, anatomy_dir)
        fields[source, target] = morph_field(loaded[source], loaded[target])
    return fields


def _to_int16(image: np.ndarray) -> np.ndarray:
    return np.clip(np.round(image), 0, np.iinfo(np.int16).max).astype(np.int16)


def lesion_statistics(subjects: list[dict]) -> dict:
    """Counts, loads and sizes of the lesions over all lesioned subjects."""
    lesioned = [s for s in subjects if s.get("lesioned")]
    sizes = np.array([les["volume_mm3"] for s in lesioned for les in s.get("lesions", [])])
    loads = np.array([s.get("lesion_volume_ml", 0.0) for s in lesioned])
    counts = np.array([s.get("n_lesions", 0) for s in lesioned])
    if not lesioned or sizes.size == 0:
        return {"n_subjects": len(lesioned), "n_lesions": 0}
    edges = [50, 200, 1000, 5000, 15001]
    return {
        "n_subjects": len(lesioned),
        "n_lesions": int(sizes.size),
        "lesions_per_subject": _describe(counts),
        "load_ml": _describe(loads),
        "lesion_volume_mm3": _describe(sizes),
        "size_bins_mm3": {
            f"{lo}-{hi - 1 if hi == 15001 else hi}": int(((sizes >= lo) & (sizes < hi)).sum())
            for lo, hi in zip(edges[:-1], edges[1:], strict=True)
        },
    }


def _describe(values: np.ndarray) -> dict:
    return {
        "mean": round(float(values.mean()), 3),
        "sd": round(float(values.std(ddof=1)) if values.size > 1 else 0.0, 3),
        "min": round(float(values.min()), 3),
        "median": round(float(np.median(values)), 3),
        "max": round(float(values.max()), 3),
    }


def load_manifest(path: str | Path) -> dict:
    """Read a benchmark manifest (the file or the directory holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise InputError(f"benchmark manifest '{path}' does not exist")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"benchmark manifest '{path}' is not valid JSON: {e}") from e
    if manifest.get("format") != "spatial-msma-benchmark/1":
        raise InputError(f"'{path}' is not a spatial-msma benchmark manifest")
    manifest["root"] = str(path.parent)
    return manifest


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text)
    tmp.replace(path)


def _write_csv(path: Path, subjects: list[dict]) -> None:
    columns = [
        "id",
        "split",
        "anatomy",
        "lesioned",
        "seed",
        "n_lesions",
        "lesion_volume_ml",
        "t1",
        "t2",
        "brain_mask",
        "lesion_mask",
        "tissue",
    ]
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(subjects)
    tmp.replace(path)


def save_montage(manifest_path: str | Path, out_png: str | Path, n_subjects: int = 4) -> Path:
    """PNG of axial slices (T1, T2, lesion outline) through the largest lesion of a few
    lesioned subjects of a cohort; a cohort without lesioned subjects (e.g. a healthy training
    cohort) shows its first subjects through their middle slice. Returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .io import load_volume

    manifest = load_manifest(manifest_path)
    root = Path(manifest["root"])
    chosen = [s for s in manifest["subjects"] if s["lesioned"] and s["n_lesions"]][:n_subjects]
    chosen = chosen or manifest["subjects"][:n_subjects]
    if not chosen:
        raise InputError(f"'{manifest_path}': the cohort has no subject to show")
    fig, axes = plt.subplots(2, len(chosen), figsize=(3.2 * len(chosen), 6.6), squeeze=False)
    for col, subject in enumerate(chosen):
        t1 = load_volume(root / subject["t1"]).data
        t2 = load_volume(root / subject["t2"]).data
        lesion = load_volume(root / subject["lesion_mask"], allow_empty=True).data > 0
        k = int(np.argmax(lesion.sum(axis=(0, 1)))) if lesion.any() else lesion.shape[2] // 2
        for row, (image, name) in enumerate([(t1, "T1"), (t2, "T2 (synthetic)")]):
            ax = axes[row, col]
            ax.imshow(np.rot90(image[:, :, k]), cmap="gray")
            ax.contour(np.rot90(lesion[:, :, k]), levels=[0.5], colors="r", linewidths=0.8)
            load = f"{subject['lesion_volume_ml']:.1f} mL" if lesion.any() else "healthy"
            ax.set_title(f"{subject['id']} {name}\n{subject['anatomy']}, {load}", fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
