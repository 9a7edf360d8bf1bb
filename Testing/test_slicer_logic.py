"""The Qt-free Slicer logic against real MRML (the slicer-core wheel), headless."""

from __future__ import annotations

import os

import numpy as np
import pytest

if os.environ.get("CI"):
    import slicer  # CI installs the dev extra: a missing wheel must fail, not skip
else:
    slicer = pytest.importorskip("slicer", reason="needs the slicer-core wheel (pip install "
                                 "-e '.[dev]' installs trame-slicer[standalone])")

from conftest import remembered_registrations  # noqa: E402

from SpatialMSMALib.errors import InputError  # noqa: E402
from SpatialMSMALib.io import load_volume, save_volume  # noqa: E402
from SpatialMSMALib.slicer_logic import (  # noqa: E402
    SpatialMSMALogic,
    add_volume_node,
    update_volume_node,
    volume_from_node,
)

OBLIQUE = np.array([[0.0, -2.0, 0.0, 50.0],
                    [1.9, 0.0, 0.6, -30.0],
                    [0.0, 0.4, 2.0, 10.0],
                    [0.0, 0.0, 0.0, 1.0]])


def _read_with_mrml(scene, path, name):
    """Load a file with Slicer's own reader (storage node), as Slicer does."""
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    return node


def test_slicer_reads_our_nrrd_with_the_same_oblique_geometry(tmp_path):
    """NRRD is LPS on disk: Slicer's reader and ours agree on every voxel and the affine."""
    scene = slicer.vtkMRMLScene()
    data = np.random.default_rng(0).random((10, 12, 14)).astype(np.float32)
    path = save_volume(tmp_path / "v.nrrd", data, OBLIQUE)
    node = _read_with_mrml(scene, path, "v")
    volume = volume_from_node(node)
    np.testing.assert_allclose(volume.affine, OBLIQUE, atol=1e-6)
    np.testing.assert_array_equal(volume.data, data)
    # and back: array -> node -> array keeps the axis order and geometry
    other = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "w")
    update_volume_node(other, data[:, ::-1], OBLIQUE)
    back = volume_from_node(other)
    np.testing.assert_array_equal(back.data, data[:, ::-1])


def test_bad_volume_nodes_get_clear_errors():
    scene = slicer.vtkMRMLScene()
    flat = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "flat")
    update_volume_node(flat, np.ones((10, 12, 1), np.float32), np.eye(4))
    with pytest.raises(InputError, match="T1 'flat' is 2D"):
        volume_from_node(flat, "T1")
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "zeros")
    update_volume_node(empty, np.zeros((10, 12, 14), np.float32), np.eye(4))
    with pytest.raises(InputError, match="T2 'zeros' is empty"):
        volume_from_node(empty, "T2")
    blank = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "blank")
    with pytest.raises(InputError, match="has no voxels"):
        volume_from_node(blank, "T1")
    with pytest.raises(InputError, match="no T1 selected"):
        volume_from_node(None, "T1")


@pytest.fixture(scope="module")
def shown(detection_setup, tmp_path_factory):
    """Detection through the logic on nodes read by Slicer's NRRD reader."""
    folder = tmp_path_factory.mktemp("slicer")
    scene = slicer.vtkMRMLScene()
    for _ in range(3):  # the three slice views of a default layout
        scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
    nodes = {}
    for name in ("t1", "t2"):
        native = load_volume(detection_setup["paths"][name])
        path = save_volume(folder / f"{name}.nrrd", native.data, native.affine)
        nodes[name] = _read_with_mrml(scene, path, name.upper())
    logic = SpatialMSMALogic(scene)
    with remembered_registrations():
        detection = logic.detect(nodes["t1"], nodes["t2"], model_path=detection_setup["path"],
                                 device="cpu")
    return {"scene": scene, "logic": logic, "nodes": nodes, "detection": detection,
            "folder": folder}


def _segment_voxels(segmentation_node) -> list[int]:
    """Voxel count of each segment's binary labelmap (shared labelmaps: by label value)."""
    from vtk.util import numpy_support

    counts = []
    segments = segmentation_node.GetSegmentation()
    name = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    for i in range(segments.GetNumberOfSegments()):
        segment = segments.GetNthSegment(i)
        labelmap = segment.GetRepresentation(name)
        scalars = numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars())
        counts.append(int((scalars == segment.GetLabelValue()).sum()))
    return counts


def test_heat_map_and_segments_land_on_the_lesion_in_ras(shown, detection_setup):
    logic, detection = shown["logic"], shown["detection"]
    heat = volume_from_node(logic.heat_node, "heat map")
    t1 = volume_from_node(shown["nodes"]["t1"])
    np.testing.assert_allclose(heat.affine, t1.affine, atol=1e-5)
    assert heat.shape == t1.shape
    # the component at the simulated lesion's centre (RAS) is the top one
    centre = np.r_[detection_setup["centre_ras"], 1.0]
    ijk = np.rint(np.linalg.solve(heat.affine, centre)[:3]).astype(int)
    assert detection.labels[tuple(ijk)] == 1
    assert heat.data[tuple(ijk)] > detection.threshold
    # one named segment per component, with the component's voxel count
    segments = logic.segmentation_node.GetSegmentation()
    assert segments.GetNumberOfSegments() == len(detection.components) >= 1
    assert segments.GetNthSegment(0).GetName().startswith("Anomaly 1 (")
    expected = [int((detection.labels == c.label).sum()) for c in detection.components]
    assert _segment_voxels(logic.segmentation_node) == expected
    # the table lists the components; the heat map is the foreground of every slice view
    table = logic.table_node.GetTable()
    assert table.GetNumberOfRows() == len(detection.components)
    assert table.GetValueByName(0, "Volume (mL)").ToDouble() == pytest.approx(
        detection.components[0].volume_ml)
    composites = logic._nodes("vtkMRMLSliceCompositeNode")
    assert {c.GetForegroundVolumeID() for c in composites} == {logic.heat_node.GetID()}
    assert logic.component_centre(1) == pytest.approx(detection.components[0].centroid_ras_mm)


def test_rethresholding_changes_segments_without_recomputing(shown):
    logic = shown["logic"]
    heat_before = logic.detection.heat
    default = logic.detection
    total = sum(c.volume_ml for c in default.components)
    strict = logic.rethreshold(fpr=1e-4)
    assert strict.heat is heat_before  # the stored heat map, no network ran
    assert strict.threshold > default.threshold
    assert sum(c.volume_ml for c in strict.components) < total
    assert logic.segmentation_node.GetSegmentation().GetNumberOfSegments() == len(
        strict.components)
    huge = logic.rethreshold(fpr=default.fpr, min_component_ml=1e6)
    assert huge.components == []
    assert logic.segmentation_node.GetSegmentation().GetNumberOfSegments() == 0
    back = logic.rethreshold(fpr=default.fpr, min_component_ml=0.2)
    np.testing.assert_array_equal(back.labels, default.labels)
    assert logic.parameter_node.GetParameter("fpr") == repr(float(default.fpr))


@pytest.mark.usefixtures("reuse_registrations")
def test_export_matches_the_cli_and_never_overwrites(shown, detection_setup, tmp_path):
    from SpatialMSMALib.cli import main

    paths = detection_setup["paths"]
    out = tmp_path / "cli"
    assert main(["detect", "--t1", str(paths["t1"]), "--t2", str(paths["t2"]), "--model",
                 str(detection_setup["path"]), "--out", str(out), "--device", "cpu"]) == 0
    # the Slicer module's path: the CLI ran in another process, the logic shows its files
    # (in a scene of its own: the shared scene keeps the in-process result for later tests)
    logic = SpatialMSMALogic(slicer.vtkMRMLScene())
    logic.load_outputs(out, model_path=detection_setup["path"])
    exported = logic.export_segmentation(tmp_path / "labels.nii.gz")
    assert exported.read_bytes() == (out / "labels.nii.gz").read_bytes()
    with pytest.raises(FileExistsError):
        logic.export_segmentation(exported)
    # the in-process run agrees with the CLI's labels (up to voxels at the threshold)
    cli_labels = load_volume(out / "labels.nii.gz", allow_empty=True).data
    assert (shown["detection"].labels == cli_labels).mean() > 0.999
    seg = logic.export_segmentation(tmp_path / "anomalies.seg.nrrd")
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(seg))
    assert storage.ReadData(node)
    assert node.GetSegmentation().GetNumberOfSegments() == len(logic.detection.components)
    heat = logic.export_heat_map(tmp_path / "heat.nii.gz")
    np.testing.assert_array_equal(load_volume(heat).data,
                                  load_volume(out / "heatmap.nii.gz").data)
    with pytest.raises(InputError, match="export as"):
        logic.export_segmentation(tmp_path / "labels.png")
    # a folder where the file should go is refused, even with overwrite, and kept
    (tmp_path / "taken.seg.nrrd").mkdir()
    (tmp_path / "taken.seg.nrrd" / "keep.txt").write_text("kept")
    for export in (logic.export_segmentation, logic.export_heat_map):
        with pytest.raises(InputError, match="export file '.*taken.seg.nrrd' is an existing "
                                             "folder"):
            export(tmp_path / "taken.seg.nrrd", overwrite=True)
    assert (tmp_path / "taken.seg.nrrd" / "keep.txt").read_text() == "kept"


def test_state_is_restored_from_the_scene(shown):
    """A new logic on the same scene (as after reloading a saved scene) finds the results
    and the parameters, and its sliders work without recomputation."""
    logic = shown["logic"]
    logic.rethreshold(fpr=1e-3)
    # the run had no brain mask: the scene remembers it, so a restore without a model file
    # picks the bundled model for scans without one (model.resolve_model)
    assert logic.parameter_node.GetParameter("has_mask") == "0"
    fresh = SpatialMSMALogic(shown["scene"])
    fresh.load_model(logic.model_path or None)
    restored = fresh.restore()
    np.testing.assert_array_equal(restored.labels, logic.detection.labels)
    assert restored.threshold == logic.detection.threshold


def test_result_survives_saving_and_reloading_the_scene(shown, tmp_path):
    """Save the scene as Slicer does (a storage node per storable node, then the MRML file),
    load it into a new scene: the parameters and the result come back and the sliders work."""
    logic = shown["logic"]
    logic.rethreshold(fpr=3e-3)
    scene = shown["scene"]
    storable = [scene.GetNthNodeByClass(i, "vtkMRMLStorableNode")
                for i in range(scene.GetNumberOfNodesByClass("vtkMRMLStorableNode"))]
    for index, node in enumerate(storable):
        if node.GetStorageNode() is None:
            node.AddDefaultStorageNode()
        storage = node.GetStorageNode()
        if storage is None:
            continue
        extension = storage.GetDefaultWriteFileExtension()
        storage.SetFileName(str(tmp_path / f"node{index}.{extension}"))
        assert storage.WriteData(node), node.GetName()
    scene.SetURL(str(tmp_path / "scene.mrml"))
    assert scene.Commit()
    reloaded = slicer.vtkMRMLScene()
    reloaded.SetURL(str(tmp_path / "scene.mrml"))
    assert reloaded.Connect()
    fresh = SpatialMSMALogic(reloaded)
    restored = fresh.restore()
    assert fresh.parameter_node.GetParameter("fpr") == repr(float(logic.detection.fpr))
    np.testing.assert_array_equal(restored.labels, logic.detection.labels)
    moved = fresh.rethreshold(fpr=1e-4)
    assert moved.threshold > restored.threshold


def test_mismatched_t2_is_refused_with_a_clear_message(shown, detection_setup):
    scene = shown["scene"]
    t1 = shown["nodes"]["t1"]
    far = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "T2 elsewhere")
    volume = volume_from_node(shown["nodes"]["t2"])
    shifted = volume.affine.copy()
    shifted[:3, 3] += 500.0
    update_volume_node(far, volume.data, shifted)
    logic = SpatialMSMALogic(scene)
    with pytest.raises(InputError, match="does not overlap the T1"):
        logic.detect(t1, far, model_path=detection_setup["path"])


def test_clear_result_removes_the_result_and_detection_works_again(detection_setup):
    scene = slicer.vtkMRMLScene()
    composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
    t1 = add_volume_node(scene, load_volume(detection_setup["paths"]["t1"]), "T1")
    t2 = add_volume_node(scene, load_volume(detection_setup["paths"]["t2"]), "T2")
    logic = SpatialMSMALogic(scene)
    first = logic.detect(t1, t2, model_path=detection_setup["path"], device="cpu")
    shown_nodes = [logic.heat_node, logic.segmentation_node, logic.table_node]
    assert all(n is not None for n in shown_nodes)
    assert composite.GetForegroundVolumeID() == logic.heat_node.GetID()
    logic.clear_result()
    assert logic.detection is None and logic.heat_node is None
    assert logic.segmentation_node is None and logic.table_node is None
    assert all(scene.GetNodeByID(n.GetID()) is None for n in shown_nodes)
    assert composite.GetForegroundVolumeID() is None
    assert scene.GetNodeByID(t1.GetID()) is t1  # the inputs stay
    with pytest.raises(InputError, match="run detection first"):
        logic.rethreshold(fpr=0.01)
    again = logic.detect(t1, t2, model_path=detection_setup["path"], device="cpu")
    # a second run of the same detection gives the same result, bit for bit (seeded metric
    # sampling, single-threaded ITK registration, deterministic CPU inference)
    np.testing.assert_array_equal(again.heat, first.heat)
    np.testing.assert_array_equal(again.labels, first.labels)
    assert composite.GetForegroundVolumeID() == logic.heat_node.GetID()
