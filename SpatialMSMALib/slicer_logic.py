"""Qt-free logic of the 3D Slicer module and the browser viewer, on plain MRML.

Everything here works on a ``vtkMRMLScene`` from Slicer or from the slicer-core wheel
(``trame-slicer[standalone]``); it imports no Qt and never needs ``slicer.app``, so the tests
run it headless. The GUIs only wire widgets to these methods.

- MRML volume nodes <-> :class:`~SpatialMSMALib.io.Volume` (array ``(I, J, K)`` and the
  voxel -> RAS affine from the node's IJKToRAS matrix; VTK stores voxels K-major, so arrays are
  transposed on the way in and out).
- ``detect``: the project's one detection path (:func:`SpatialMSMALib.detection.detect`), or
  ``load_outputs`` for the files ``spatial-msma detect`` wrote (what the Slicer module does after
  running the CLI in a separate process); either way the result is shown the same way:
  a heat-map scalar volume with its own colour table (foreground in every slice view), a
  segmentation node with one named, coloured segment per component, and a table of components.
- ``rethreshold``: new operating point (voxel false-positive rate or raw score) and minimum
  component size from the stored heat map, without running any network.
- ``export_segmentation`` (.seg.nrrd, .nii.gz, .nii, .nrrd) and ``export_heat_map``: never
  overwrite unless asked; the NIfTI label volume is byte-identical to the CLI's ``labels.nii.gz``
  for the same input and operating point.
- Parameters and result node references live on a ``vtkMRMLScriptedModuleNode`` named
  ``SpatialMSMA``, so they persist when the scene is saved; ``restore`` rebuilds the state from
  such a scene.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError
from .io import Volume

PARAMETER_NODE_NAME = "SpatialMSMA"
HEAT_COLOR_NAME = "SpatialMSMA heat"
SEGMENT_COLORS = [(0.9, 0.1, 0.1), (0.1, 0.6, 0.95), (0.95, 0.75, 0.1), (0.3, 0.85, 0.3),
                  (0.8, 0.3, 0.9), (1.0, 0.5, 0.0), (0.0, 0.8, 0.8), (0.6, 0.4, 0.2)]


def _vtk():
    import vtk  # noqa: PLC0415 (only where MRML is available)

    return vtk


def matrix_to_numpy(matrix) -> np.ndarray:
    return np.array([[matrix.GetElement(i, j) for j in range(4)] for i in range(4)], float)


def numpy_to_matrix(array: np.ndarray):
    matrix = _vtk().vtkMatrix4x4()
    for i in range(4):
        for j in range(4):
            matrix.SetElement(i, j, float(array[i, j]))
    return matrix


def volume_from_node(node, what: str = "volume") -> Volume:
    """A scalar volume node as a :class:`Volume` (array ``(I, J, K)``, IJK -> RAS affine).

    Refuses a missing node, a node without voxels, a 2D image, a multi-component image and an
    image with no non-zero voxel, naming the node."""
    from vtk.util import numpy_support

    if node is None:
        raise InputError(f"no {what} selected")
    name = f"{what} '{node.GetName()}'"
    image = node.GetImageData()
    if image is None or image.GetNumberOfPoints() == 0:
        raise InputError(f"{name} has no voxels")
    dims = image.GetDimensions()
    if min(dims) < 2:
        raise InputError(f"{name} is 2D ({dims[0]} x {dims[1]} x {dims[2]} voxels); a 3D "
                         "volume is needed")
    scalars = image.GetPointData().GetScalars()
    if scalars.GetNumberOfComponents() != 1:
        raise InputError(f"{name} has {scalars.GetNumberOfComponents()} components per voxel; "
                         "a scalar volume is needed")
    data = numpy_support.vtk_to_numpy(scalars).reshape(dims[::-1]).transpose(2, 1, 0)
    if not np.any(data):
        raise InputError(f"{name} is empty (every voxel is 0)")
    matrix = _vtk().vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return Volume(np.ascontiguousarray(data), matrix_to_numpy(matrix))


def update_volume_node(node, data: np.ndarray, affine: np.ndarray) -> None:
    """Put ``data (I, J, K)`` with voxel -> RAS ``affine`` into a volume node."""
    from vtk.util import numpy_support

    data = np.asarray(data)
    image = _vtk().vtkImageData()
    image.SetDimensions(*data.shape)
    flat = np.ascontiguousarray(data.transpose(2, 1, 0)).ravel()
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(flat, deep=True))
    node.SetAndObserveImageData(image)
    node.SetIJKToRASMatrix(numpy_to_matrix(np.asarray(affine, float)))
    node.Modified()


def add_volume_node(scene, volume: Volume, name: str, *, labelmap: bool = False):
    """A new scalar (or label map) volume node holding ``volume`` (array ``(I, J, K)``, RAS
    affine); how the browser viewer puts files read with :func:`SpatialMSMALib.io.load_volume`
    into its scene (slicer-core has no NIfTI reader registered)."""
    kind = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
    node = scene.AddNewNodeByClass(kind, name)
    data = volume.data
    if not labelmap and data.dtype not in (np.float32, np.int16, np.uint8, np.uint16):
        data = data.astype(np.float32)
    update_volume_node(node, data, volume.affine)
    node.CreateDefaultDisplayNodes()
    return node


# -- the detection CLI as a separate process (Slicer module and browser viewer) ------------
def detect_command(out_dir: str | Path, t1: str | Path, t2: str | Path | None = None,
                   mask: str | Path | None = None, *, model: str | Path | None = None,
                   device: str = "cpu") -> list[str]:
    """Arguments after the Python interpreter that run ``spatial-msma detect`` on files.

    Both GUIs run detection as ``python -m SpatialMSMALib.cli detect ...`` in a child process,
    so the GUI stays responsive and Cancel can stop it; they read progress from its stderr
    with :func:`parse_cli_progress` and the result with :meth:`SpatialMSMALogic.load_outputs`.
    """
    if not t1:
        raise InputError("no T1 scan selected")
    args = ["-m", "SpatialMSMALib.cli", "detect", "--out", str(out_dir), "--device", device,
            "--t1", str(t1)]
    for flag, path in (("--t2", t2), ("--mask", mask), ("--model", model)):
        if path:
            args += [flag, str(path)]
    return args


_PERCENT = re.compile(r"(\d+)%\|")


def parse_cli_progress(text: str) -> tuple[int | None, str | None]:
    """The last progress percentage and the last non-empty line in a chunk of the CLI's stderr
    (tqdm redraws its bar with carriage returns): ``(percent or None, line or None)``."""
    percents = _PERCENT.findall(text)
    lines = [line.strip() for line in re.split(r"[\r\n]", text) if line.strip()]
    return (int(percents[-1]) if percents else None), (lines[-1] if lines else None)


def cli_error_message(stderr: str) -> str:
    """The message the CLI printed for bad input (``error: ...``), else the end of stderr."""
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    if errors:
        return errors[-1][len("error:"):].strip()
    tail = stderr.strip().splitlines()[-3:]
    return " ".join(tail) if tail else "detection stopped without a message"


@dataclass
class Operating:
    """The current operating point (what the sliders show)."""

    fpr: float
    threshold: float
    min_component_ml: float


class SpatialMSMALogic:
    """Detection, display, re-thresholding and export on one MRML scene.

    Args:
        scene: a ``vtkMRMLScene``.
    """

    def __init__(self, scene):
        import slicer  # noqa: PLC0415

        self.slicer = slicer
        self.scene = scene
        self.model = None
        self.model_path: str | None = None
        self.detection = None

    # -- parameter node ----------------------------------------------------------------
    @property
    def parameter_node(self):
        node = self.scene.GetFirstNodeByName(PARAMETER_NODE_NAME)
        if node is None or not node.IsA("vtkMRMLScriptedModuleNode"):
            node = self.scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", PARAMETER_NODE_NAME)
            node.SetSingletonTag(PARAMETER_NODE_NAME)
        return node

    def _reference(self, role: str):
        return self.parameter_node.GetNodeReference(role)

    def _set_reference(self, role: str, node) -> None:
        self.parameter_node.SetNodeReferenceID(role, node.GetID() if node else None)

    @property
    def heat_node(self):
        return self._reference("heat")

    @property
    def segmentation_node(self):
        return self._reference("segmentation")

    @property
    def table_node(self):
        return self._reference("components")

    @property
    def operating(self) -> Operating | None:
        if self.detection is None:
            return None
        p = self.parameter_node
        return Operating(self.detection.fpr, self.detection.threshold,
                         float(p.GetParameter("min_component_ml")))

    # -- model ---------------------------------------------------------------------------
    def load_model(self, path: str | Path | None = None, has_t2: bool = True,
                   has_mask: bool = True):
        """The model file ``path`` or the bundled model matching the inputs (channels, and
        with or without a brain mask: ``model.resolve_model``, as ``detect`` picks it)."""
        from .model import resolve_model

        self.model = resolve_model(path, has_t2=has_t2, has_mask=has_mask)
        self.model_path = str(path) if path else ""
        self.parameter_node.SetParameter("model", self.model_path)
        self.parameter_node.SetParameter("has_mask", "1" if has_mask else "0")
        return self.model

    # -- detection -----------------------------------------------------------------------
    def detect(self, t1_node, t2_node=None, mask_node=None, *, model_path=None, fpr=None,
               threshold=None, min_component_ml=None, device="cpu", progress=None):
        """Run the shared detection path on MRML volume nodes and show the result."""
        from .detection import detect

        t1 = volume_from_node(t1_node, "T1")
        t2 = volume_from_node(t2_node, "T2") if t2_node is not None else None
        mask = volume_from_node(mask_node, "brain mask") if mask_node is not None else None
        if self.model is None or model_path is not None or not self.model_path:
            self.load_model(model_path, has_t2=t2 is not None, has_mask=mask is not None)
        names = {"t1": t1_node.GetName(), "t2": t2_node.GetName() if t2_node else None,
                 "mask": mask_node.GetName() if mask_node else None}
        detection = detect(self.model, t1, t2, mask, fpr=fpr, threshold=threshold,
                           device=device, names=names, progress=progress)
        self._set_reference("t1", t1_node)
        self._set_reference("t2", t2_node)
        return self._show(detection, min_component_ml, reference=t1_node)

    def load_outputs(self, out_dir: str | Path, *, model_path=None, has_t2: bool = True,
                     has_mask: bool = True, reference_node=None, min_component_ml=None):
        """Show what ``spatial-msma detect --out out_dir`` wrote (heat map, brain mask and the
        report's operating point); the Slicer module runs the CLI in a separate process and
        then calls this."""
        import json

        from .detection import OUTPUT_NAMES, Detection, relabel
        from .io import load_volume

        out_dir = Path(out_dir)
        report = json.loads((out_dir / OUTPUT_NAMES["report"]).read_text())
        heat = load_volume(out_dir / OUTPUT_NAMES["heat"], what="heat map")
        brain = load_volume(out_dir / OUTPUT_NAMES["brain_mask"], what="brain mask")
        if self.model is None or model_path is not None:
            self.load_model(model_path, has_t2=has_t2, has_mask=has_mask)
        detection = Detection(heat.data.astype(np.float32), brain.data > 0,
                              np.zeros(heat.shape, np.int16), heat.affine,
                              report["threshold"], report["voxel_false_positive_rate"],
                              float(self.model.calibration.scores[-1]), [], None, None, None,
                              typicality=report.get("typicality"),
                              warnings=report.get("warnings", []),
                              timings=report.get("timings_s", {}),
                              heat_units=self.model.heat_units)
        detection = relabel(detection, self.model, threshold=report["threshold"],
                            min_component_ml=min_component_ml)
        return self._show(detection, min_component_ml, reference=reference_node)

    # -- display -------------------------------------------------------------------------
    def _heat_color_node(self):
        node = self.scene.GetFirstNodeByName(HEAT_COLOR_NAME)
        if node is not None:
            return node
        node = self.scene.AddNewNodeByClass("vtkMRMLColorTableNode", HEAT_COLOR_NAME)
        node.SetTypeToUser()
        node.SetNumberOfColors(256)
        for i in range(256):
            t = i / 255.0
            # transparent-to-hot ramp: dark red -> red -> yellow -> white
            rgb = (min(1.0, 0.3 + 1.4 * t), max(0.0, min(1.0, 2.0 * t - 0.5)),
                   max(0.0, 3.0 * t - 2.0))
            node.SetColor(i, f"{i}", *rgb, 0.0 if i == 0 else 1.0)
        return node

    def _show(self, detection, min_component_ml, reference=None):
        self.detection = detection
        p = self.parameter_node
        if min_component_ml is None:
            min_component_ml = self.model.calibration.min_component_ml
        p.SetParameter("min_component_ml", repr(float(min_component_ml)))
        p.SetParameter("threshold", repr(float(detection.threshold)))
        p.SetParameter("fpr", repr(float(detection.fpr)))
        heat = self.heat_node
        if heat is None:
            heat = self.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Anomaly heat map")
            self._set_reference("heat", heat)
        update_volume_node(heat, detection.heat, detection.affine)
        if heat.GetDisplayNode() is None:
            heat.CreateDefaultDisplayNodes()
        display = heat.GetDisplayNode()
        display.SetAndObserveColorNodeID(self._heat_color_node().GetID())
        display.SetAutoWindowLevel(False)
        low, high = detection.threshold, max(float(detection.heat.max()),
                                             detection.threshold + 1e-3)
        display.SetWindowLevelMinMax(low, high)
        brain = self._reference("brain_mask")
        if brain is None:
            brain = self.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode",
                                                 "Anomaly brain mask")
            brain.SetHideFromEditors(True)
            self._set_reference("brain_mask", brain)
        update_volume_node(brain, detection.brain_mask.astype(np.uint8), detection.affine)
        for composite in self._nodes("vtkMRMLSliceCompositeNode"):
            if reference is not None:
                composite.SetBackgroundVolumeID(reference.GetID())
            composite.SetForegroundVolumeID(heat.GetID())
            composite.SetForegroundOpacity(float(p.GetParameter("opacity") or 0.5))
        self._update_segmentation(reference)
        return detection

    def _nodes(self, class_name: str) -> list:
        collection = self.scene.GetNodesByClass(class_name)
        return [collection.GetItemAsObject(i) for i in range(collection.GetNumberOfItems())]

    def set_heat_opacity(self, opacity: float) -> None:
        self.parameter_node.SetParameter("opacity", repr(float(opacity)))
        for composite in self._nodes("vtkMRMLSliceCompositeNode"):
            composite.SetForegroundOpacity(float(opacity))

    def _update_segmentation(self, reference=None) -> None:
        slicer = self.slicer
        detection = self.detection
        segmentation = self.segmentation_node
        if segmentation is None:
            segmentation = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                                        "Anomalies")
            segmentation.CreateDefaultDisplayNodes()
            self._set_reference("segmentation", segmentation)
        heat = self.heat_node
        if heat is not None:  # full-grid geometry, so cropped imports keep their place
            segmentation.SetReferenceImageGeometryParameterFromVolumeNode(heat)
        segmentation.GetSegmentation().RemoveAllSegments()
        if detection.components:
            # import only the labelled voxels' bounding box (not a full 1 mm grid) as an
            # oriented image, without adding a temporary node to the scene
            from .spatial import bounding_box

            box = bounding_box(detection.labels > 0)
            start = np.array([b.start for b in box])
            crop = np.ascontiguousarray(detection.labels[box].astype(np.int16))
            affine = np.array(detection.affine, float)
            affine[:3, 3] = affine[:3, :3] @ start + affine[:3, 3]
            image = slicer.vtkOrientedImageData()
            image.SetDimensions(*crop.shape)
            from vtk.util import numpy_support

            image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(
                crop.transpose(2, 1, 0).ravel(), deep=True))
            image.SetImageToWorldMatrix(numpy_to_matrix(affine))
            if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
                    image, segmentation):
                raise RuntimeError("MRML could not import the anomaly labels")
            segments = segmentation.GetSegmentation()
            for index, component in enumerate(detection.components):
                segment = segments.GetNthSegment(index)
                segment.SetName(f"Anomaly {component.label} ({component.volume_ml:.2f} mL)")
                segment.SetColor(*SEGMENT_COLORS[index % len(SEGMENT_COLORS)])
        self._update_table()

    def _update_table(self) -> None:
        table = self.table_node
        if table is None:
            table = self.scene.AddNewNodeByClass("vtkMRMLTableNode", "Anomaly components")
            self._set_reference("components", table)
        vtk = _vtk()
        data = vtk.vtkTable()
        columns = [("Label", vtk.vtkIntArray), ("Volume (mL)", vtk.vtkDoubleArray),
                   ("Peak score", vtk.vtkDoubleArray), ("Peak voxel FPR", vtk.vtkDoubleArray),
                   ("R (mm)", vtk.vtkDoubleArray), ("A (mm)", vtk.vtkDoubleArray),
                   ("S (mm)", vtk.vtkDoubleArray)]
        arrays = []
        for name, kind in columns:
            array = kind()
            array.SetName(name)
            data.AddColumn(array)
            arrays.append(array)
        for c in self.detection.components:
            values = [c.label, c.volume_ml, c.peak_score, c.peak_voxel_fpr, *c.centroid_ras_mm]
            for array, value in zip(arrays, values, strict=True):
                array.InsertNextValue(value)
        table.SetAndObserveTable(data)

    def clear_result(self) -> None:
        """Remove the shown result (heat map, brain mask, segmentation, table) from the scene
        and the slice views, e.g. when the user picks another scan."""
        for composite in self._nodes("vtkMRMLSliceCompositeNode"):
            heat = self.heat_node
            if heat is not None and composite.GetForegroundVolumeID() == heat.GetID():
                composite.SetForegroundVolumeID(None)
        for role in ("heat", "brain_mask", "segmentation", "components"):
            node = self._reference(role)
            if node is not None:
                self.scene.RemoveNode(node)
            self._set_reference(role, None)
        self.detection = None

    # -- sliders -------------------------------------------------------------------------
    def rethreshold(self, *, fpr=None, threshold=None, min_component_ml=None):
        """New labels, segments and table at a new operating point from the stored heat map
        (no network runs). Give either ``fpr`` or ``threshold`` (or neither: keep the current
        one) and optionally ``min_component_ml``."""
        from .detection import relabel

        if self.detection is None:
            raise InputError("run detection first")
        if fpr is None and threshold is None:
            threshold = self.detection.threshold
        if min_component_ml is None:
            min_component_ml = float(self.parameter_node.GetParameter("min_component_ml"))
        self.detection = relabel(self.detection, self.model, fpr=fpr, threshold=threshold,
                                 min_component_ml=min_component_ml)
        p = self.parameter_node
        p.SetParameter("min_component_ml", repr(float(min_component_ml)))
        p.SetParameter("threshold", repr(float(self.detection.threshold)))
        p.SetParameter("fpr", repr(float(self.detection.fpr)))
        self._update_segmentation()
        heat_display = self.heat_node.GetDisplayNode()
        if heat_display is not None:
            high = max(float(self.detection.heat.max()), self.detection.threshold + 1e-3)
            heat_display.SetWindowLevelMinMax(self.detection.threshold, high)
        return self.detection

    def component_centre(self, label: int) -> list[float]:
        """RAS (mm) centroid of component ``label``; moves every slice view there."""
        for c in self.detection.components:
            if c.label == label:
                self.slicer.vtkMRMLSliceNode.JumpAllSlices(self.scene, *c.centroid_ras_mm)
                return list(c.centroid_ras_mm)
        raise InputError(f"there is no component {label}")

    # -- export --------------------------------------------------------------------------
    def export_segmentation(self, path: str | Path, overwrite: bool = False) -> Path:
        """The current segmentation as .seg.nrrd (MRML segmentation file), or the label
        volume as .nii.gz / .nii / .nrrd (components 1..n on the T1 grid, as the CLI writes)."""
        from .io import check_output_file, save_volume

        if self.detection is None:
            raise InputError("run detection first")
        path = check_output_file(path, "export file")
        if path.exists() and not overwrite:
            raise FileExistsError(f"'{path}' already exists; refusing to overwrite")
        name = path.name.lower()
        if name.endswith(".seg.nrrd"):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name[:-9]}.partial.seg.nrrd")
            storage = self.scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
            try:
                storage.SetFileName(str(tmp))
                if not storage.WriteData(self.segmentation_node):
                    raise InputError(f"could not write '{path}'")
            finally:
                self.scene.RemoveNode(storage)
            tmp.replace(path)
            return path
        if name.endswith((".nii.gz", ".nii", ".nrrd")):
            return save_volume(path, self.detection.labels, self.detection.affine,
                               overwrite=overwrite)
        raise InputError(f"'{path}': export as .seg.nrrd, .nii.gz, .nii or .nrrd")

    def export_heat_map(self, path: str | Path, overwrite: bool = False) -> Path:
        from .io import check_output_file, save_volume

        if self.detection is None:
            raise InputError("run detection first")
        return save_volume(check_output_file(path, "export file"), self.detection.heat,
                           self.detection.affine, overwrite=overwrite)

    # -- scene persistence ---------------------------------------------------------------
    def restore(self):
        """Rebuild the detection state from a loaded scene (heat map, brain mask and
        parameters saved with it), so the sliders work again without recomputation."""
        from .detection import Detection, relabel

        p = self.parameter_node
        heat, brain = self.heat_node, self._reference("brain_mask")
        if heat is None or brain is None:
            raise InputError("this scene holds no SpatialMSMA result")
        if self.model is None:
            self.load_model(p.GetParameter("model") or None,
                            has_t2=self._reference("t2") is not None,
                            has_mask=p.GetParameter("has_mask") != "0")
        heat_volume = volume_from_node(heat, "heat map")
        brain_volume = volume_from_node(brain, "brain mask")
        detection = Detection(heat_volume.data.astype(np.float32), brain_volume.data > 0,
                              np.zeros(heat_volume.shape, np.int16), heat_volume.affine,
                              float(p.GetParameter("threshold")), 0.0,
                              float(self.model.calibration.scores[-1]), [], None, None, None,
                              heat_units=self.model.heat_units)
        self.detection = relabel(detection, self.model,
                                 threshold=float(p.GetParameter("threshold")),
                                 min_component_ml=float(p.GetParameter("min_component_ml")))
        return self.detection
