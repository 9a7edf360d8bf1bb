"""3D Slicer module "Spatial-MSMA anomaly detection": a thin GUI over SpatialMSMALib.

Everything that does not need Qt (MRML nodes <-> arrays, the detection path, heat-map and
segmentation display, re-thresholding, export, scene persistence) is
``SpatialMSMALib.slicer_logic.SpatialMSMALogic``, shared with the browser viewer and tested
headless against real MRML. This file only wires widgets to it, runs detection in a separate
process (``spatial-msma detect``, so Slicer stays responsive and Cancel can stop it), and
installs the Python dependencies on first use after asking.
"""

import json
import logging
import os
import re
import shutil
import sys
import tempfile

import ctk  # noqa: F401 (widgets from the .ui)
import qt
import slicer
import vtk  # noqa: F401
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
# the library ships next to the module (see CMakeLists.txt), or is pip-installed
LIBRARY_DIRS = [os.path.join(MODULE_DIR, "SpatialMSMALib_bundle"), os.path.dirname(MODULE_DIR)]
PIP_REQUIREMENTS = ["nibabel>=5.2", "pynrrd>=1.0", "SimpleITK>=2.3", "nilearn>=0.10.3",
                    "scikit-learn>=1.4", "scikit-image>=0.22", "tqdm>=4.66", "nflows==0.14",
                    "pandas>=2.1"]


def ensure_library(ask=True):
    """Import SpatialMSMALib, installing its dependencies after asking the user. torch comes
    from the PyTorch extension (``EXTENSION_DEPENDS PyTorch``), which picks the right CUDA
    build for the machine."""
    for folder in LIBRARY_DIRS:
        if os.path.isdir(os.path.join(folder, "SpatialMSMALib")) and folder not in sys.path:
            sys.path.insert(0, folder)
    missing = []
    for module in ("torch", "nibabel", "nrrd", "SimpleITK", "nilearn", "sklearn", "skimage",
                   "tqdm", "nflows", "pandas"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        if ask and not slicer.util.confirmOkCancelDisplay(
                "Spatial-MSMA needs these Python packages: " + ", ".join(missing)
                + ".\nInstall them now (a few minutes, once)?", "Install dependencies"):
            raise RuntimeError("the Python dependencies are not installed")
        if "torch" in missing:
            import PyTorchUtils  # the PyTorch extension

            PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False)
        slicer.util.pip_install(PIP_REQUIREMENTS)
    import SpatialMSMALib  # noqa: F401

    return True


class SpatialMSMA(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Spatial-MSMA anomaly detection"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["SpatialMSMA developers"]
        self.parent.helpText = (
            "Unsupervised localisation of anomalies in brain MRI (T1, optionally T2) with "
            "multiscale score matching and a conditional normalizing flow, trained only on "
            "healthy scans. Research software: the bundled model was trained on synthetic "
            "variations of a few public templates and is not for clinical use.")
        self.parent.acknowledgementText = (
            "Spatial-MSMA (arXiv 2407.00148) and MSMA (ICLR 2021) describe the methods.")
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """A one-click demo scan in the Sample Data module: a 1 mm T1 + T2 built from the MNI
    template with simulated lesions (generated locally; nothing is downloaded)."""
    import SampleData

    def make_demo(*_args, **_kwargs):
        ensure_library()

        from SpatialMSMALib.demo import cached_sample

        paths = cached_sample()
        return [slicer.util.loadVolume(str(paths[key]), {"name": f"SpatialMSMA demo {key}"})
                for key in ("t1", "t2")]

    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="SpatialMSMA",
        sampleName="SpatialMSMADemo",
        thumbnailFileName=os.path.join(MODULE_DIR, "Resources", "Icons", "SpatialMSMA.png"),
        uris=None, fileNames=None, nodeNames=None,
        customDownloader=make_demo)


class SpatialMSMAWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.process = None
        self.outputDir = None
        self._updating = False

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SpatialMSMA.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.ui.detectButton.connect("clicked(bool)", self.onDetect)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.opacitySlider.connect("valueChanged(double)", self.onOpacity)
        self.ui.fprSlider.connect("valueChanged(double)", self.onFpr)
        self.ui.thresholdSlider.connect("valueChanged(double)", self.onThreshold)
        self.ui.minSizeSlider.connect("valueChanged(double)", self.onMinSize)
        self.ui.componentsTable.connect("cellClicked(int, int)", self.onComponentClicked)
        self.ui.exportButton.connect("clicked(bool)", self.onExport)
        self.ui.t1Selector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateButtons)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndImportEvent, self.onSceneLoaded)
        self.fillModels()
        self.updateButtons()

    def cleanup(self):
        self.removeObservers()
        self.onCancel()

    # -- models --------------------------------------------------------------------------
    def fillModels(self):
        self.ui.modelComboBox.clear()
        candidates = [os.path.join(folder, "Resources", "Models", "registry.json")
                      for folder in LIBRARY_DIRS]
        registry = next((c for c in candidates if os.path.exists(c)), candidates[0])
        self.ui.modelComboBox.addItem(
            "bundled (matches the inputs: channels, with or without a brain mask)", "")
        if os.path.exists(registry):
            with open(registry) as f:
                for entry in json.load(f).get("models", []):
                    cost = entry.get("expected_time", {})
                    # the registry holds benchmarks/detect_cost.py's result
                    cpu = cost.get("median_wall_s")
                    cpu = f"{cpu:.0f}" if isinstance(cpu, (int, float)) else "?"
                    gpu = cost.get("gpu", "?")
                    gpu = f"{gpu} s" if isinstance(gpu, (int, float)) else "not measured"
                    masks = ("scans without a brain mask"
                             if entry.get("brain_masks") == "atlas" else "scans with a brain mask")
                    label = (f"{entry['file']} ({'+'.join(entry['channels'])}, {masks}; 1 mm "
                             f"scan: CPU (2 cores) ~{cpu} s, GPU {gpu})")
                    self.ui.modelComboBox.addItem(
                        label, os.path.join(os.path.dirname(registry), entry["file"]))
        self.ui.modelComboBox.addItem("other model file...", "browse")

    def selectedModelPath(self):
        path = self.ui.modelComboBox.currentData
        if path == "browse":
            path = qt.QFileDialog.getOpenFileName(self.parent, "Model file", "",
                                                  "Model (*.pt)")
        return path or None

    # -- state ---------------------------------------------------------------------------
    def updateButtons(self, *_):
        running = self.process is not None
        self.ui.detectButton.enabled = self.ui.t1Selector.currentNode() is not None and not running
        self.ui.cancelButton.enabled = running
        hasResult = self.logic is not None and self.logic.detection is not None
        self.ui.exportButton.enabled = hasResult and not running
        self.ui.resultsCollapsibleButton.enabled = hasResult

    def getLogic(self):
        ensure_library()
        if self.logic is None:
            from SpatialMSMALib.slicer_logic import SpatialMSMALogic

            self.logic = SpatialMSMALogic(slicer.mrmlScene)
        return self.logic

    # -- detection in a separate process -------------------------------------------------
    def onDetect(self):
        try:
            logic = self.getLogic()
            t1 = self.ui.t1Selector.currentNode()
            t2 = self.ui.t2Selector.currentNode()
            mask = self.ui.maskSelector.currentNode()
            modelPath = self.selectedModelPath()
            logic.load_model(modelPath, has_t2=t2 is not None, has_mask=mask is not None)
            self.outputDir = tempfile.mkdtemp(prefix="SpatialMSMA_")
            paths = {}
            for role, node in (("t1", t1), ("t2", t2), ("mask", mask)):
                if node is not None:
                    path = os.path.join(self.outputDir, f"{role}.nrrd")
                    if not slicer.util.saveNode(node, path):
                        raise RuntimeError(f"could not write '{node.GetName()}' to {path}")
                    paths[role] = path
            from SpatialMSMALib.slicer_logic import detect_command

            args = detect_command(os.path.join(self.outputDir, "out"), paths.get("t1"),
                                  paths.get("t2"), paths.get("mask"), model=modelPath,
                                  device=self.ui.deviceComboBox.currentText)
        except Exception as e:  # shown to the user, not a traceback
            slicer.util.errorDisplay(f"Cannot start detection: {e}")
            return
        self.process = qt.QProcess()
        environment = qt.QProcessEnvironment.systemEnvironment()
        environment.insert("PYTHONPATH", os.pathsep.join(p for p in sys.path if p))
        self.process.setProcessEnvironment(environment)
        self.process.connect("readyReadStandardError()", self.onProcessOutput)
        self.process.connect("finished(int)", self.onProcessFinished)
        self.ui.progressBar.value = 0
        self.ui.statusLabel.text = "Starting detection..."
        self.process.start(shutil.which("PythonSlicer") or sys.executable, args)
        self.updateButtons()

    def onProcessOutput(self):
        from SpatialMSMALib.slicer_logic import parse_cli_progress

        text = bytes(self.process.readAllStandardError()).decode(errors="replace")
        percent, line = parse_cli_progress(text)
        if percent is not None:
            self.ui.progressBar.value = percent
        if line:
            self.ui.statusLabel.text = line[-120:]

    def onProcessFinished(self, exitCode):
        process, self.process = self.process, None
        output = bytes(process.readAllStandardOutput()).decode(errors="replace")
        errors = bytes(process.readAllStandardError()).decode(errors="replace")
        self.updateButtons()
        if exitCode != 0:
            from SpatialMSMALib.slicer_logic import cli_error_message

            self.ui.statusLabel.text = "Detection failed or was cancelled."
            if exitCode not in (15, -15):
                slicer.util.errorDisplay(cli_error_message(errors), windowTitle="Spatial-MSMA")
            return
        try:
            detection = self.logic.load_outputs(
                os.path.join(self.outputDir, "out"),
                reference_node=self.ui.t1Selector.currentNode(),
                min_component_ml=None)
        except Exception as e:
            slicer.util.errorDisplay(f"Could not show the results: {e}")
            return
        self.ui.progressBar.value = 100
        summary = output.strip().splitlines()[0] if output.strip() else ""
        self.ui.statusLabel.text = (f"{len(detection.components)} components at voxel "
                                    f"false-positive rate {detection.fpr:.2g}. {summary}")
        self.showResult()
        if detection.warnings:
            slicer.util.warningDisplay("\n\n".join(detection.warnings),
                                       windowTitle="Spatial-MSMA")

    def onCancel(self):
        if self.process is not None:
            self.process.terminate()
            if not self.process.waitForFinished(3000):
                self.process.kill()
            self.ui.statusLabel.text = "Cancelled."

    # -- results -------------------------------------------------------------------------
    def showResult(self):
        detection = self.logic.detection
        self._updating = True
        try:
            import math

            self.ui.fprSlider.value = math.log10(max(detection.fpr, 1e-5))
            self.ui.thresholdSlider.value = detection.threshold
            self.ui.minSizeSlider.value = float(
                self.logic.parameter_node.GetParameter("min_component_ml"))
        finally:
            self._updating = False
        table = self.ui.componentsTable
        headers = ["Label", "Volume (mL)", "Peak score", "R, A, S (mm)"]
        table.setColumnCount(len(headers))
        table.setHorizontalHeaderLabels(headers)
        table.setRowCount(len(detection.components))
        for row, c in enumerate(detection.components):
            values = [str(c.label), f"{c.volume_ml:.2f}", f"{c.peak_score:.2f}",
                      ", ".join(f"{v:.0f}" for v in c.centroid_ras_mm)]
            for column, value in enumerate(values):
                table.setItem(row, column, qt.QTableWidgetItem(value))
        self.updateButtons()

    def onOpacity(self, value):
        if self.logic is not None:
            self.logic.set_heat_opacity(value)

    def _rethreshold(self, **kwargs):
        if self._updating or self.logic is None or self.logic.detection is None:
            return
        self.logic.rethreshold(**kwargs)
        self.showResult()

    def onFpr(self, value):
        self._rethreshold(fpr=10.0**value)

    def onThreshold(self, value):
        self._rethreshold(threshold=value)

    def onMinSize(self, value):
        self._rethreshold(min_component_ml=value)

    def onComponentClicked(self, row, _column):
        self.logic.component_centre(self.logic.detection.components[row].label)

    def onExport(self):
        path = qt.QFileDialog.getSaveFileName(
            self.parent, "Export segmentation", "anomalies.seg.nrrd",
            "Segmentation (*.seg.nrrd);;Label volume (*.nii.gz)")
        if not path:
            return
        overwrite = False
        if os.path.exists(path):
            overwrite = slicer.util.confirmYesNoDisplay(f"'{path}' exists. Replace it?")
            if not overwrite:
                return
        try:
            written = [self.logic.export_segmentation(path, overwrite=overwrite)]
            if self.ui.exportHeatMapCheckBox.checked:
                heat = re.sub(r"(\.seg\.nrrd|\.nii\.gz|\.nii|\.nrrd)$", "", path)
                heat += "_heatmap.nii.gz"
                if not os.path.exists(heat) or slicer.util.confirmYesNoDisplay(
                        f"'{heat}' exists. Replace it?"):
                    written.append(self.logic.export_heat_map(heat, overwrite=True))
            self.ui.statusLabel.text = "Wrote " + ", ".join(str(p) for p in written)
        except Exception as e:
            slicer.util.errorDisplay(f"Export failed: {e}")

    def onSceneLoaded(self, *_):
        """A saved scene with a result: restore it so the sliders work again."""
        if slicer.mrmlScene.GetFirstNodeByName("SpatialMSMA") is None:
            return
        try:
            self.getLogic().restore()
            self.showResult()
        except Exception as e:
            logging.warning(f"SpatialMSMA: could not restore the saved result: {e}")


class SpatialMSMALogic(ScriptedLoadableModuleLogic):
    """Slicer-side entry point: the Qt-free logic on the application's scene."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        ensure_library(ask=False)
        from SpatialMSMALib.slicer_logic import SpatialMSMALogic as Logic

        self.logic = Logic(slicer.mrmlScene)


class SpatialMSMATest(ScriptedLoadableModuleTest):
    """Slicer's own test runner: the demo scan end to end inside Slicer."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_demo_end_to_end()

    def test_demo_end_to_end(self):
        self.delayDisplay("Building the demo scan")
        ensure_library(ask=False)
        from pathlib import Path

        from SpatialMSMALib.demo import make_sample
        from SpatialMSMALib.slicer_logic import SpatialMSMALogic as Logic

        folder = tempfile.mkdtemp(prefix="SpatialMSMATest_")
        paths = make_sample(Path(folder))["paths"]
        t1 = slicer.util.loadVolume(str(paths["t1"]))
        t2 = slicer.util.loadVolume(str(paths["t2"]))
        logic = Logic(slicer.mrmlScene)
        self.delayDisplay("Detecting anomalies")
        detection = logic.detect(t1, t2, device="cpu")
        self.assertGreater(len(detection.components), 0)
        segments = logic.segmentation_node.GetSegmentation()
        self.assertEqual(segments.GetNumberOfSegments(), len(detection.components))
        strict = logic.rethreshold(fpr=1e-4)
        self.assertLessEqual(sum(c.volume_ml for c in strict.components),
                             sum(c.volume_ml for c in detection.components))
        exported = logic.export_segmentation(os.path.join(folder, "anomalies.seg.nrrd"))
        self.assertTrue(os.path.exists(exported))
        self.delayDisplay("Test passed")
