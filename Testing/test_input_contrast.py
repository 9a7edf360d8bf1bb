"""The contrast check on model-space channels (``inference.contrast_problems``)."""

import types

import numpy as np

from SpatialMSMALib.inference import contrast_problems
from SpatialMSMALib.template import template_on_grid

SHAPE = (48, 56, 48)  # the 4 mm model grid


def test_contrast_check_passes_t1_t2_and_names_swaps_and_flair():
    model = types.SimpleNamespace(spacing_mm=4.0, shape=SHAPE, channel_names=["T1", "T2"])
    template = template_on_grid(4.0, SHAPE)
    t1, brain, wm = template.t1, template.brain_mask, template.white_matter
    t2 = 1 - t1  # CSF bright, white matter dark
    assert contrast_problems(model, np.stack([t1, t2]), brain) == []

    swapped = contrast_problems(model, np.stack([t2, t1]), brain,
                                names={"t1": "a.nii.gz", "t2": "b.nii.gz"})
    assert [p.split(" does not")[0] for p in swapped] == ["T1 'a.nii.gz'", "T2 'b.nii.gz'"]
    assert "wrong way round" in swapped[1]

    # FLAIR-like: CSF (the darkest T1) dark, grey matter brightest, white matter in between
    grey_level = np.percentile(t1[brain], 40)
    grey = np.exp(-(((t1 - grey_level) / 0.1) ** 2)) * (1 - wm)
    flair = np.where(brain, 0.2 + 0.8 * grey + 0.5 * wm, 0).astype(np.float32)
    problems = contrast_problems(model, np.stack([t1, flair]), brain)
    assert len(problems) == 1 and problems[0].startswith("T2 does not look T2-weighted")
    assert "Is it a FLAIR (dark CSF)" in problems[0]
