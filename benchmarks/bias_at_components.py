"""The simulated bias field under each detected component of one benchmark scan.

    python benchmarks/bias_at_components.py --manifest benchmark --subject test_healthy_004 \\
        --labels DETECT_OUT/labels.nii.gz [--anatomy-dir ../shared/data/anatomy] [--out F]

A benchmark scan is regenerated from the manifest (its anatomy, seed and subject settings),
with the generator's two multiplicative bias fields (T1, T2) captured as they are drawn; the
regenerated T1 must equal the stored one (else the script refuses). For each component of
``--labels`` (a ``spatial-msma detect`` label volume on the scan's grid) it reports the mean
bias factor of each channel inside the component, against the brain's median and the white
matter's 5th percentile, and what preprocessing's N4 leaves of it (the true factor divided
by N4's estimate, made with the brain mask, both relative to the brain median); per scan,
the SD of the log bias in the brain before and after N4. Ground truth is only read to
explain a result, never to set one.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cohort_args import exit_with, manifest_subject, refuse_existing_output  # noqa: E402

from SpatialMSMALib.errors import InputError  # noqa: E402


def regenerate_with_bias(entry: dict, manifest: dict, anatomy_dir: Path | None):
    """``(subject, [t1_bias, t2_bias])``: the scan rebuilt from its manifest entry, and the
    multiplicative bias factor arrays ``exp(amplitude * field)`` on its grid."""
    import SpatialMSMALib.synthesis as synthesis
    from SpatialMSMALib.anatomy import load_anatomy

    names = {f.name for f in fields(synthesis.SubjectConfig)}
    config = synthesis.SubjectConfig(**{
        k: tuple(v) if isinstance(v, list) else v
        for k, v in manifest["subject_config"].items() if k in names})
    drawn = []
    original = synthesis.smooth_random_field

    def capture(shape, control, rng):
        field = original(shape, control, rng)
        drawn.append(field)
        return field

    synthesis.smooth_random_field = capture
    try:
        subject = synthesis.synthesize_subject(load_anatomy(entry["anatomy"], anatomy_dir),
                                               entry["seed"], config)
    finally:
        synthesis.smooth_random_field = original
    # the generator draws the T1 and then the T2 bias field last
    return subject, [np.exp(config.bias_amplitude * f) for f in drawn[-2:]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--subject", required=True)
    parser.add_argument("--labels", type=Path, required=True)
    parser.add_argument("--anatomy-dir", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args()
    try:
        refuse_existing_output(args)
        from SpatialMSMALib.io import load_volume

        manifest, root, entry = manifest_subject(args.manifest, args.subject)
        if entry.get("lesioned"):
            raise InputError(f"'{args.subject}' is lesioned; lesions change the draws")
        labels = load_volume(args.labels, what="label volume", allow_empty=True)
        stored = load_volume(root / entry["t1"], what="T1")
        if labels.shape != stored.shape or not np.allclose(labels.affine, stored.affine):
            raise InputError(f"'{args.labels}' is not on the grid of {args.subject}'s T1")
        subject, bias = regenerate_with_bias(entry, manifest, args.anatomy_dir)
        if subject.t1.shape != stored.shape or np.abs(subject.t1 - stored.data).max() > 1.0:
            raise InputError(f"regenerating {args.subject} did not give its stored T1 (another "
                             "generator version or anatomy folder?)")
    except InputError as e:
        exit_with(e)
    brain = subject.brain_mask > 0
    white = subject.tissue_labels == 3
    # what preprocessing's N4 (with the brain mask, as detection with --mask runs it) leaves
    # of each channel's field: true factor / N4's estimate, both relative to the brain median
    from SpatialMSMALib.registration import n4_bias_correction

    relative = [factor / np.median(factor[brain]) for factor in bias]
    residual = []
    channels = {"t1": stored, "t2": load_volume(root / entry["t2"], what="T2")}
    for name, factor in zip(("t1", "t2"), bias, strict=True):
        channel = channels[name]
        _, estimate = n4_bias_correction(channel.data, channel.affine, brain)
        left = factor / estimate
        residual.append(left / np.median(left[brain]))
    scan = {name: {"sd_log_bias_in_brain": float(np.log(r[brain]).std()),
                   "sd_log_after_n4": float(np.log(left[brain]).std())}
            for name, r, left in zip(("t1", "t2"), relative, residual, strict=True)}
    for name, row in scan.items():
        print(f"{name.upper()}: SD of the log bias in the brain {row['sd_log_bias_in_brain']:.4f}, "
              f"after N4 {row['sd_log_after_n4']:.4f}")
    components = []
    for label in sorted(int(v) for v in np.unique(labels.data) if v > 0):
        inside = labels.data == label
        row = {"label": label, "voxels": int(inside.sum())}
        for name, factor, r, left in zip(("t1", "t2"), bias, relative, residual, strict=True):
            row[name] = {"mean_in_component": float(factor[inside].mean()),
                         "brain_median": float(np.median(factor[brain])),
                         "white_matter_p5": float(np.percentile(factor[white], 5)),
                         "brain_min": float(factor[brain].min()),
                         "relative_in_component": float(r[inside].mean()),
                         "relative_after_n4": float(left[inside].mean())}
        components.append(row)
        print(f"component {label} ({row['voxels']} voxels): " + "; ".join(
            f"{n.upper()} bias {row[n]['mean_in_component']:.3f} (brain median "
            f"{row[n]['brain_median']:.3f}, WM 5th percentile {row[n]['white_matter_p5']:.3f}, "
            f"brain min {row[n]['brain_min']:.3f}; relative to the median "
            f"{row[n]['relative_in_component']:.3f}, after N4 {row[n]['relative_after_n4']:.3f})"
            for n in ("t1", "t2")))
    if args.out:
        from SpatialMSMALib.io import write_text_atomically

        write_text_atomically(args.out, json.dumps(
            {"subject": args.subject, "labels": str(args.labels), "scan": scan,
             "components": components},
            indent=1) + "\n")


if __name__ == "__main__":
    main()
