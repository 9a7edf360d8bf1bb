"""The browser viewer end to end: a real `spatial-msma view` server, driven by Debian's
chromium (headless, through Playwright), with the bundled model on the demo scan.

`.ci/run` installs chromium and the Mesa EGL libraries. Outside CI these tests skip when
chromium is missing; on CI (CI=true) a missing browser fails them. Screenshots are saved to
``Testing/artifacts/viewer/`` (or $SPATIAL_MSMA_ARTIFACTS).
"""

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from SpatialMSMALib.viewer import launch

CHROMIUM = os.environ.get("SPATIAL_MSMA_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = launch.CHROMIUM_ARGS
ARTIFACTS = Path(os.environ.get("SPATIAL_MSMA_ARTIFACTS",
                                Path(__file__).parent / "artifacts" / "viewer"))
TOKEN = "test-token-0123456789abcdef"


def _require_browser():
    missing = [what for what, ok in (("chromium", Path(CHROMIUM).exists()),
                                     ("playwright", _has_playwright())) if not ok]
    if missing:
        message = f"browser tests need {', '.join(missing)} (.ci/run installs them)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def _has_playwright():
    try:
        import playwright  # noqa: F401
    except ImportError:
        return False
    return True


def start_viewer(work: Path, *extra: str):
    """The viewer with its own demo-scan cache (the test generates the demo scan once)."""
    env = dict(os.environ, SPATIAL_MSMA_CACHE=str(work / "cache"))
    process, url, _ = launch.start_viewer(work, *extra, env=env)
    return process, url


stop = launch.stop_viewer


@pytest.fixture(scope="module")
def browser():
    _require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def viewer(tmp_path_factory):
    _require_browser()
    work = tmp_path_factory.mktemp("viewer")
    data = work / "data"
    (data / "sub").mkdir(parents=True)
    secret = work / "secret.nii.gz"  # outside the data folder
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), affine), secret)
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), affine), data / "sub" / "a.nii.gz")
    (data / "link.nii.gz").symlink_to(secret)
    process, url = start_viewer(work, "--data-dir", str(data), "--upload-limit-mb", "20")
    yield {"url": url, "work": work, "port": url.rsplit(":", 1)[1].strip("/")}
    stop(process)


def _open(browser, url):
    return launch.ViewerPage.open(browser, url)


def _settled(viewer_page, name, previous=None):
    return viewer_page.settled_shot(previous, save=ARTIFACTS / f"{name}.png")


def test_demo_detect_slider_centre_export(browser, viewer):
    """Demo scan -> Detect; a component click centres the views on its overlay; the FPR
    slider grows the rendered overlay; export equals the CLI's labels.nii.gz, and after the
    slider move equals the heat map thresholded at the new operating point."""
    vp = _open(browser, viewer["url"])
    page = vp.page
    before_load = vp.view_shot(save=ARTIFACTS / "00_empty.png")
    page.click("#demo-button")
    vp.wait_state("s.get('t1_choice') && s.get('t2_choice') && s.get('mask_choice') "
                  "&& !s.get('demo_busy') && s.get('loaded_roles').length === 3",
                  timeout_s=180)
    anatomy = _settled(vp, "01_demo_loaded", previous=before_load)
    assert anatomy.std() > 20, "the demo T1 is not shown in the axial view"
    assert launch.overlay_pixels(anatomy) == 0

    page.click("#detect-button")
    vp.wait_state("s.get('busy')", timeout_s=30)
    vp.wait_state("!s.get('busy')", timeout_s=600)
    assert page.inner_text("#error").strip() == ""
    assert vp.state("has_result")
    detected = _settled(vp, "02_heat_map", previous=anatomy)
    components = vp.state("components")
    assert components, "the demo scan has simulated lesions, but no component was listed"
    # clicking a component centres the views on it: its overlay is in the axial view
    page.locator("#components .v-list-item").nth(0).click()
    first = _settled(vp, "03_component_centred", previous=detected)
    red_first = launch.overlay_pixels(first)
    assert red_first > 50, "no overlay in the axial view through the first component"

    # export at the default operating point: the CLI's own labels file
    runs = sorted((viewer["work"] / f"work_{viewer['port']}").glob("run1_*/out"))
    assert len(runs) == 1
    cli_labels = nib.load(runs[0] / "labels.nii.gz")
    with page.expect_download() as download:
        page.click("#export-nii-gz")
    exported_path = viewer["work"] / "export_default.nii.gz"
    download.value.save_as(exported_path)
    exported = nib.load(exported_path)
    np.testing.assert_array_equal(np.asarray(exported.dataobj), np.asarray(cli_labels.dataobj))
    np.testing.assert_allclose(exported.affine, cli_labels.affine, atol=1e-5)

    # move the threshold slider ten 0.05 steps: voxel FPR x 10^0.5 (the bundled model's
    # 0.5 % -> ~1.6 %; lower threshold, more overlay)
    version = vp.state("result_version")
    start_log10 = vp.state("fpr_log10")
    thumb = page.locator(".v-slider:has(#fpr-slider) .v-slider-thumb")
    thumb.focus()
    for _ in range(10):
        page.keyboard.press("ArrowRight")
    vp.wait_state(f"s.get('result_version') > {version} && "
                  f"Math.abs(s.get('fpr_log10') - ({start_log10} + 0.5)) < 1e-6", timeout_s=30)
    moved = _settled(vp, "04_threshold_moved", previous=first)
    assert launch.views_differ(moved, first)
    assert launch.overlay_pixels(moved) > red_first, (launch.overlay_pixels(moved), red_first)

    with page.expect_download() as download:
        page.click("#export-nii-gz")
    moved_path = viewer["work"] / "export_moved.nii.gz"
    download.value.save_as(moved_path)
    labels_moved = np.asarray(nib.load(moved_path).dataobj)
    labels_default = np.asarray(exported.dataobj)
    heat = np.asarray(nib.load(runs[0] / "heatmap.nii.gz").dataobj)
    threshold = float(page.inner_text("#threshold-text").split("(")[1].split()[0])
    assert (labels_moved > 0).sum() > (labels_default > 0).sum()
    assert np.all(labels_moved[labels_default > 0] > 0), "a lower threshold lost voxels"
    # labelled voxels reach down to the extent threshold (the operating one, or with the
    # model's growth rule the laxer one), never below it; components peak at the threshold
    from SpatialMSMALib.model import AnomalyModel

    calibration = AnomalyModel.load().calibration  # the bundled model the viewer runs
    rate = 10.0 ** (start_log10 + 0.5)
    assert calibration.threshold_for_fpr(rate) == pytest.approx(threshold, abs=1e-3)
    extent, _ = calibration.labelling_thresholds(calibration.threshold_for_fpr(rate))
    assert heat[labels_moved > 0].min() >= extent - 1e-3
    assert all(heat[labels_moved == k].max() >= threshold - 1e-3
               for k in np.unique(labels_moved[labels_moved > 0]))

    # segmentation export: one segment per listed component
    import nrrd

    with page.expect_download() as download:
        page.click("#export-seg-nrrd")
    seg_path = viewer["work"] / "export.seg.nrrd"
    download.value.save_as(seg_path)
    _, header = nrrd.read(str(seg_path))
    segments = {k for k in header if k.startswith("Segment") and k.endswith("_Name")}
    assert len(segments) == len(vp.state("components"))

    # another component: the views move again
    page.locator("#components .v-list-item").nth(1).click()
    centred = _settled(vp, "05_other_component", previous=moved)
    assert launch.views_differ(centred, moved)
    page.screenshot(path=str(ARTIFACTS / "viewer_page.png"))

    # Cancel stops a running detection; the shown result stays
    components = vp.state("components")
    page.click("#detect-button")
    vp.wait_state("s.get('busy')", timeout_s=30)
    page.click("#cancel-button")
    vp.wait_state("!s.get('busy')", timeout_s=30)
    assert vp.state("status") == "Detection cancelled."
    assert vp.state("error") == "" and vp.state("components") == components

    # another T1 clears the result: no heat map over a different scan
    before = vp.view_shot()
    vp.set_state("t1_choice", "data:sub/a.nii.gz")
    vp.wait_state("!s.get('has_result')", timeout_s=30)
    assert vp.state("components") == [] and "Loaded a.nii.gz" in vp.state("status")
    assert launch.overlay_pixels(_settled(vp, "06_new_t1", previous=before)) == 0
    page.close()


def test_path_traversal_and_foreign_files_are_refused(browser, viewer):
    vp = _open(browser, viewer["url"])
    page = vp.page
    choices = [c["value"] for c in vp.state("scan_choices")]
    assert "data:sub/a.nii.gz" in choices
    assert "data:link.nii.gz" not in choices, "a link leading out of the data folder is listed"
    for attack, role in (("data:../../etc/passwd", "t2"), ("data:/etc/passwd", "t2"),
                         ("data:link.nii.gz", "mask"), ("upload:../../secret.nii.gz", "mask"),
                         ("file:/etc/passwd", "t2")):
        vp.set_state(f"{role}_choice", attack)
        vp.wait_state("s.get('error')", timeout_s=15)
        message = page.inner_text("#error")
        assert any(w in message for w in ("inside the allowed", "outside the allowed",
                                          "not a file this server offers")), message
        vp.set_state("error", "")
    page.close()


def test_upload_is_listed_and_size_limit_is_enforced(browser, viewer, tmp_path):
    vp = _open(browser, viewer["url"])
    page = vp.page
    small = tmp_path / "my scan_t1.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((10, 10, 10), np.float32),
                             np.eye(4)), small)
    page.locator("#upload").set_input_files(str(small))
    vp.wait_state("s.get('scan_choices').some(c => c.value === 'upload:my_scan_t1.nii.gz')")
    assert (viewer["work"] / f"work_{viewer['port']}" / "uploads" /
            "my_scan_t1.nii.gz").read_bytes() == small.read_bytes()

    big = tmp_path / "big.nii.gz"
    big.write_bytes(os.urandom(21 * 2**20))  # over the 20 MB limit of this server
    page.locator("#upload").set_input_files(str(big))
    vp.wait_state("s.get('error').includes('larger than the limit')", timeout_s=30)
    assert "upload:big.nii.gz" not in [c["value"] for c in vp.state("scan_choices")]
    page.close()


def test_token_is_required_when_given(browser, tmp_path):
    process, url = start_viewer(tmp_path, "--token", TOKEN)
    try:
        page = browser.new_page()
        page.goto(url)
        page.wait_for_timeout(5000)
        assert page.locator("#detect-button").count() == 0, "the page opened without the token"
        page.goto(url + f"?secret={TOKEN}")
        page.wait_for_selector("#detect-button", timeout=60000)
        page.close()
    finally:
        stop(process)


def test_binding_beyond_loopback_needs_a_token(tmp_path):
    result = subprocess.run([sys.executable, "-m", "SpatialMSMALib.cli", "view", "--host",
                             "0.0.0.0", "--port", str(launch.free_port())],
                            capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, SPATIAL_MSMA_VIEW_TOKEN=""))
    assert result.returncode == 2
    assert "give an access token with --token" in result.stderr
    assert "Traceback" not in result.stderr
