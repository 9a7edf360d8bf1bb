"""Static checks of the Slicer extension: the .ui file, CMake listings, and the Qt-free core."""

from __future__ import annotations

import ast
import re
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "SpatialMSMA"


def _ui_widget_names() -> set[str]:
    tree = ET.parse(MODULE / "Resources" / "UI" / "SpatialMSMA.ui")
    return {w.get("name") for w in tree.iter("widget")}


def test_every_widget_the_module_uses_exists_in_the_ui_file():
    names = _ui_widget_names()
    assert {"t1Selector", "t2Selector", "detectButton", "fprSlider"} <= names
    source = (MODULE / "SpatialMSMA.py").read_text()
    used = set(re.findall(r"self\.ui\.(\w+)", source))
    assert used, "the module uses no widgets?"
    assert used - names == set(), f"used in SpatialMSMA.py, not in the .ui: {used - names}"


def test_the_module_parses_and_follows_slicer_conventions():
    tree = ast.parse((MODULE / "SpatialMSMA.py").read_text())
    classes = {node.name: [b.id for b in node.bases if isinstance(b, ast.Name)]
               for node in tree.body if isinstance(node, ast.ClassDef)}
    assert classes["SpatialMSMA"] == ["ScriptedLoadableModule"]
    assert "ScriptedLoadableModuleWidget" in classes["SpatialMSMAWidget"]
    assert classes["SpatialMSMALogic"] == ["ScriptedLoadableModuleLogic"]
    assert classes["SpatialMSMATest"] == ["ScriptedLoadableModuleTest"]
    # the library is imported lazily (after the dependency check), never at module level
    top_imports = {alias.name.split(".")[0] for node in tree.body
                   if isinstance(node, ast.Import) for alias in node.names}
    top_imports |= {node.module.split(".")[0] for node in tree.body
                    if isinstance(node, ast.ImportFrom) and node.module}
    assert "SpatialMSMALib" not in top_imports


def test_every_file_in_the_module_folder_is_listed_in_its_cmakelists():
    cmake = (MODULE / "CMakeLists.txt").read_text().replace("${MODULE_NAME}", "SpatialMSMA")
    listed = set(re.findall(r"^\s+([\w/.-]+\.(?:py|ui|png|svg|json))\s*$", cmake, re.M))
    files = {p.relative_to(MODULE).as_posix() for p in MODULE.rglob("*")
             if p.is_file() and "__pycache__" not in p.parts
             and p.name not in ("CMakeLists.txt", "README.md")}
    assert files == listed, (f"not listed: {sorted(files - listed)}; listed but missing: "
                             f"{sorted(listed - files)}")


def test_extension_cmakelists_has_the_metadata_slicer_needs():
    cmake = (ROOT / "CMakeLists.txt").read_text()
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS",
                "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        assert re.search(rf'set\({key} "[^"]+"\)', cmake), key
    assert re.search(r'set\(EXTENSION_DEPENDS "PyTorch"\)', cmake)
    assert "add_subdirectory(SpatialMSMA)" in cmake
    assert "find_package(Slicer REQUIRED)" in cmake


def test_the_core_library_imports_no_qt():
    banned = {"qt", "ctk", "PythonQt", "slicer.ScriptedLoadableModule", "PyQt5", "PySide2"}
    offenders = []
    for path in (ROOT / "SpatialMSMALib").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names
                          if n in banned or n.split(".")[0] in {"qt", "ctk", "PyQt5"}]
    assert offenders == []
