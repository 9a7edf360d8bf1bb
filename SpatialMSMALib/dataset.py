"""Scan lists and a model-space preprocessing cache shared by the training and benchmark
scripts.

A scan is a ``ScanFiles`` row (id, T1, optional T2, optional brain mask). ``model_space``
preprocesses each once and caches ``image`` ``(C, X, Y, Z)`` float32 and ``brain_mask``
``(X, Y, Z)`` uint8 as ``CACHE/<id>_<spacing>mm.npz`` (written atomically), with the
native <-> model mapping (JSON text) for mapping results back to the scan.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError, RegistrationError


@dataclass(frozen=True)
class ScanFiles:
    id: str
    t1: Path
    t2: Path | None = None
    brain_mask: Path | None = None
    lesion_mask: Path | None = None


def manifest_scans(manifest_path: str | Path, splits: tuple[str, ...]) -> dict[str, list]:
    """``split -> [ScanFiles]`` for the requested splits of a benchmark manifest."""
    from .cohort import load_manifest

    manifest = load_manifest(manifest_path)
    root = Path(manifest["root"])
    out = {split: [] for split in splits}
    for s in manifest["subjects"]:
        if s["split"] in out:
            out[s["split"]].append(
                ScanFiles(s["id"], root / s["t1"], root / s["t2"], root / s["brain_mask"],
                          root / s["lesion_mask"] if s.get("lesion_mask") else None)
            )
    return out


def pooled_manifest_scans(manifest_paths, splits: tuple[str, ...]) -> dict[str, list]:
    """``split -> [ScanFiles]`` of several cohorts pooled (one manifest: exactly
    :func:`manifest_scans`). With more than one, each scan id gets its cohort's position in
    ``manifest_paths`` as a prefix (``c0_train_000``, ``c1_train_000``): generated cohorts
    reuse ids, and the preprocessing cache is keyed by id."""
    paths = [Path(p) for p in ([manifest_paths] if isinstance(manifest_paths, (str, Path))
                               else manifest_paths)]
    if len(paths) == 1:
        return manifest_scans(paths[0], splits)
    from .cohort import MANIFEST_NAME

    # a cohort's folder and its manifest file name the same cohort
    resolved = [(p / MANIFEST_NAME if p.is_dir() else p).resolve() for p in paths]
    for i, p in enumerate(resolved):
        if p in resolved[:i]:
            raise InputError(f"manifest '{paths[i]}' is given twice")
    out = {split: [] for split in splits}
    for k, path in enumerate(paths):
        for split, rows in manifest_scans(path, splits).items():
            out[split] += [dataclasses.replace(r, id=f"c{k}_{r.id}") for r in rows]
    return out


def folder_scans(folder: str | Path) -> list[ScanFiles]:
    """``<id>_t1.nii[.gz]`` files with optional ``<id>_t2`` and ``<id>_brainmask`` beside."""
    folder = Path(folder)
    t1s = sorted(folder.glob("*_t1.nii*"))
    if not t1s:
        raise InputError(f"no '*_t1.nii[.gz]' files in '{folder}'")
    rows = []
    for t1 in t1s:
        stem = t1.name.split("_t1.nii")[0]
        suffix = t1.name[len(stem) + 3 :]
        t2 = folder / f"{stem}_t2{suffix}"
        mask = folder / f"{stem}_brainmask{suffix}"
        rows.append(ScanFiles(stem, t1, t2 if t2.exists() else None,
                              mask if mask.exists() else None))
    return rows


@dataclass
class ModelSpaceScan:
    id: str
    image: np.ndarray  # (C, X, Y, Z) float32
    brain_mask: np.ndarray  # (X, Y, Z) bool
    mapping: object = None  # preprocessing.SpaceMapping, when cached


def model_space(
    rows: list[ScanFiles],
    cache_dir: str | Path,
    spacing: float = 2.0,
    progress: bool = True,
    channels: int | None = None,
    demons=None,
    version: int | None = None,
    refused: list | None = None,
    brain_masks: str = "given",
) -> list[ModelSpaceScan]:
    """Preprocess (or read from the cache) each scan onto the model grid at ``spacing`` mm.
    ``version`` is the preprocessing version to run (default the latest,
    ``PREPROCESS_VERSION``; a benchmark of an older model file passes the model's). A cache
    entry written by another version (recorded in its mapping; entries without a mapping are
    version 1) is recomputed, so a changed pipeline never mixes with stale entries.
    Every entry carries its mapping back to the native scan. ``channels=1`` keeps only the
    T1 (for T1-only models; the cache always holds every channel).

    ``demons`` (a ``preprocessing.DemonsConfig``, as a model file records it) adds the
    deformable step: its entries (``<id>_<spacing>mm_<tag>.npz``, with the displacement
    fields) are derived from the affine ones, which stay cached for affine-only models.

    ``refused``: by default a scan whose registration to the template is refused
    (``RegistrationError``) stops the run. Given a list, such a scan is left out of the result
    and ``(id, reason)`` appended to it; the refusal is cached too
    (``<id>_<spacing>mm.refused.json``, per preprocessing version), so DDP ranks and reruns
    agree without registering it again. Training scripts pass a list and report it
    (:func:`check_refused`).

    ``brain_masks="atlas"`` (a model's ``brain_masks``): each row's brain mask is set aside
    and the atlas mask taken, as ``detect`` does for such a model; these entries are cached
    under ``<id>_atlasmask`` (and the scans carry that id), apart from the given-mask ones."""
    from tqdm import tqdm

    from .io import load_volume
    from .preprocessing import (
        BRAIN_MASK_SOURCES,
        PREPROCESS_VERSION,
        REGISTRATION_RETRY,
        PreprocessConfig,
        SpaceMapping,
        deform_to_template,
        preprocess_scan,
    )
    from .template import DEFAULT_SHAPE, DEFAULT_SPACING_MM

    shape = tuple(int(round(s * DEFAULT_SPACING_MM / spacing)) for s in DEFAULT_SHAPE)
    version = PREPROCESS_VERSION if version is None else int(version)
    if brain_masks not in BRAIN_MASK_SOURCES:
        raise ValueError(f"brain_masks must be one of {BRAIN_MASK_SOURCES}, not {brain_masks!r}")
    if brain_masks == "atlas":
        rows = [without_brain_mask(row) for row in rows]
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    if demons is not None:
        out = []
        for row in tqdm(rows, desc=f"preprocess ({demons.tag})", disable=not progress):
            cached = cache_dir / f"{row.id}_{spacing:g}mm_{demons.tag}.npz"
            mapping = None
            if cached.exists():
                with np.load(cached) as stored:
                    mapping = SpaceMapping.from_dict(json.loads(str(stored["mapping"])))
                    if mapping.preprocess_version == version:
                        mapping.with_displacements(stored)
                        image, mask = stored["image"], stored["brain_mask"] > 0
                    else:
                        mapping = None
            if mapping is None:
                affine_scans = model_space([row], cache_dir, spacing, False, version=version,
                                           refused=refused)
                if not affine_scans:  # refused, and noted in ``refused``
                    continue
                affine = affine_scans[0]
                mapping = affine.mapping
                image, mask = deform_to_template(affine.image, affine.brain_mask, mapping, demons)
                tmp = cached.with_name(cached.name + ".partial.npz")
                np.savez(tmp, image=image, brain_mask=mask.astype(np.uint8),
                         mapping=np.array(mapping.to_json()), **mapping.displacement_arrays())
                tmp.replace(cached)
            out.append(ModelSpaceScan(row.id, np.asarray(image, np.float32)[:channels],
                                      np.asarray(mask, bool), mapping))
        return out
    out = []
    for row in tqdm(rows, desc="preprocess", disable=not progress):
        cached = cache_dir / f"{row.id}_{spacing:g}mm.npz"
        marker = _refusal_note_path(cache_dir, row.id, spacing)
        reason = refusal_reason(cache_dir, row.id, spacing, version)
        if refused is not None and reason is not None:
            refused.append((row.id, reason))
            continue
        stored = np.load(cached) if cached.exists() else None
        mapping = None
        if stored is not None and "brain_mask" in stored and "mapping" in stored:
            mapping = SpaceMapping.from_dict(json.loads(str(stored["mapping"])))
            if mapping.preprocess_version != version:
                mapping = None
        if mapping is not None:
            image, mask = stored["image"], stored["brain_mask"]
        else:
            try:
                result = preprocess_scan(
                    load_volume(row.t1, what="T1"),
                    load_volume(row.t2, what="T2") if row.t2 else None,
                    load_volume(row.brain_mask, what="brain mask") if row.brain_mask else None,
                    PreprocessConfig(spacing_mm=spacing, shape=shape, version=version),
                    names={"t1": row.t1, "t2": row.t2, "mask": row.brain_mask},
                )
            except RegistrationError as e:
                if refused is None:
                    raise
                tmp = marker.with_name(marker.name + ".partial")
                tmp.write_text(json.dumps({"preprocess_version": version, "reason": str(e),
                                          "registration_retry": REGISTRATION_RETRY}))
                tmp.replace(marker)
                refused.append((row.id, str(e)))
                continue
            image, mask, mapping = result.image, result.brain_mask, result.mapping
            tmp = cached.with_name(cached.name + ".partial.npz")
            np.savez(tmp, image=image, brain_mask=mask.astype(np.uint8),
                     mapping=np.array(mapping.to_json()))
            tmp.replace(cached)
            marker.unlink(missing_ok=True)  # an older refusal this pipeline overturned
        image = np.asarray(image, np.float32)[:channels]
        out.append(ModelSpaceScan(row.id, image, np.asarray(mask, bool), mapping))
    return out


#: suffix of the cache ids of scans preprocessed with their brain mask set aside
ATLAS_MASK_SUFFIX = "_atlasmask"


def healthy_ids_digest(scan_ids) -> str:
    """sha256 (hex) of a healthy cohort's scan ids, as model files record it
    (``healthy_ids_sha256``): each id without the ``_atlasmask`` suffix, sorted, one per line,
    so the same scans give the same digest whichever script wrote it, in any order, with or
    without their brain masks."""
    plain = sorted(i[: -len(ATLAS_MASK_SUFFIX)] if i.endswith(ATLAS_MASK_SUFFIX) else i
                   for i in map(str, scan_ids))
    return hashlib.sha256("\n".join(plain).encode()).hexdigest()


def without_brain_mask(row: ScanFiles) -> ScanFiles:
    """``row`` with its brain mask set aside, under its own cache id (``<id>_atlasmask``)."""
    return dataclasses.replace(row, id=row.id + ATLAS_MASK_SUFFIX, brain_mask=None)


def _refusal_note_path(cache_dir: Path, scan_id: str, spacing: float) -> Path:
    return Path(cache_dir) / f"{scan_id}_{spacing:g}mm.refused.json"


def refusal_reason(cache_dir: str | Path, scan_id: str, spacing: float,
                   version: int | None = None) -> str | None:
    """Why :func:`model_space` left ``scan_id`` out of ``cache_dir`` (its cached refusal
    note), or ``None`` when it did not; with ``version``, only a refusal by that
    preprocessing version, written with the current registration retry
    (``preprocessing.REGISTRATION_RETRY``; notes from before it had none), counts."""
    from .preprocessing import REGISTRATION_RETRY

    path = _refusal_note_path(Path(cache_dir), scan_id, spacing)
    if not path.exists():
        return None
    note = json.loads(path.read_text())
    if version is not None and (note.get("preprocess_version") != version
                                or note.get("registration_retry") != REGISTRATION_RETRY):
        return None
    return note["reason"]


def refusable_fraction(text: str) -> float:
    """argparse type of ``--max-refused-fraction``: a number in [0, 1)."""
    import argparse

    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), not '{text}'")
    return value


def check_refused(refused: list, n_scans: int, max_fraction: float = 0.1,
                  report: bool = True) -> None:
    """Report the training scans :func:`model_space` left out (``(id, reason)`` pairs of
    ``n_scans``): a warning naming each (printed when ``report``: rank 0 under DDP), or an
    ``InputError`` when more than ``max_fraction`` of the cohort was refused (then the cohort
    or the pipeline is wrong, not one scan; raised on every rank, so none waits for the
    others)."""
    if not refused:
        return
    lines = "\n".join(f"  {scan_id}: {reason}" for scan_id, reason in refused)
    if len(refused) > max_fraction * n_scans:
        raise InputError(f"{len(refused)} of {n_scans} scans could not be registered to the "
                         f"template (more than {max_fraction:.0%}):\n{lines}")
    if report:
        print(f"warning: {len(refused)} of {n_scans} scans left out, registration refused:\n"
              f"{lines}", flush=True)
