"""Open an exported neural map's QGIS project with PyQGIS, check it, and render it to a PNG.

Run by tests/test_geo_export.py with the system interpreter that has PyQGIS (QGIS 3.22 from Debian):
    QT_QPA_PLATFORM=offscreen /usr/bin/python3 tests/qgis_check.py MAP.qgs OUT.png [KEY=E,N ...]
Prints one JSON object (layers, CRS, extents, class labels, rendered-image statistics, the rendered
colour at each probe point KEY given in map coordinates) on its last line; the calling test asserts on it. Exit status 0 when the project loaded, 2 when it did not.
No neuralmaps import: this runs outside the project's virtual environment.
"""

from __future__ import annotations

import json
import sys


def _rat_classes(path: str) -> list[str] | None:
    """The `Class` column of the raster attribute table GDAL (QGIS's) reads for band 1, if any."""
    from osgeo import gdal

    ds = gdal.Open(path)
    rat = ds.GetRasterBand(1).GetDefaultRAT() if ds is not None else None
    if rat is None:
        return None
    col = [rat.GetNameOfCol(i) for i in range(rat.GetColumnCount())].index("Class")
    return [rat.GetValueAsString(i, col) for i in range(rat.GetRowCount())]


def main(qgs: str, png: str, probes: dict[str, tuple[float, float]], size: int = 600) -> int:
    from qgis.core import (QgsApplication, QgsMapRendererParallelJob, QgsMapSettings, QgsProject,
                           QgsRasterLayer, QgsVectorLayer)
    from qgis.PyQt.QtCore import QSize
    from qgis.PyQt.QtGui import QColor

    app = QgsApplication([], False)
    app.initQgis()
    try:
        project = QgsProject.instance()
        ok = project.read(qgs)
        out: dict = {"read": bool(ok), "project_crs": project.crs().authid(), "layers": {}}
        for layer in project.mapLayers().values():
            e = layer.extent()
            info = {
                "valid": layer.isValid(), "crs": layer.crs().authid(), "source": layer.source(),
                "extent": [e.xMinimum(), e.yMinimum(), e.xMaximum(), e.yMaximum()],
                "renderer": None, "labels": [], "colors": [],
            }
            if isinstance(layer, QgsRasterLayer) and layer.renderer() is not None:
                r = layer.renderer()
                info["renderer"] = r.type()
                info["band_count"] = layer.bandCount()
                if r.type() == "paletted":
                    info["labels"] = [c.label for c in r.classes()]
                    info["colors"] = [c.color.name() for c in r.classes()]
                    info["values"] = [c.value for c in r.classes()]
                    info["rat_classes"] = _rat_classes(layer.source())
                # the legend QGIS shows in the layers panel
                info["legend"] = [t for t, _ in r.legendSymbologyItems()]
            elif isinstance(layer, QgsVectorLayer):
                r = layer.renderer()
                info["renderer"] = r.type() if r else None
                info["feature_count"] = layer.featureCount()
                if r is not None and r.type() == "categorizedSymbol":
                    info["labels"] = [c.label() for c in r.categories()]
                    info["colors"] = [c.symbol().color().name() for c in r.categories()]
            out["layers"][layer.name()] = info
        root = project.layerTreeRoot()
        visible = root.checkedLayers()
        out["visible"] = [l.name() for l in visible]
        settings = QgsMapSettings()
        settings.setLayers(visible)
        settings.setDestinationCrs(project.crs())
        extent = None
        for l in project.mapLayers().values():
            if extent is None:
                extent = l.extent()
            else:
                extent.combineExtentWith(l.extent())
        out["project_extent"] = [extent.xMinimum(), extent.yMinimum(), extent.xMaximum(), extent.yMaximum()]
        settings.setExtent(extent)
        settings.setOutputSize(QSize(size, size))
        settings.setBackgroundColor(QColor(255, 255, 255))
        job = QgsMapRendererParallelJob(settings)
        job.start()
        job.waitForFinished()
        img = job.renderedImage()
        img.save(png, "PNG")
        colors: dict = {}
        step = max(1, size // 150)
        for yy in range(0, img.height(), step):
            for xx in range(0, img.width(), step):
                c = img.pixel(xx, yy) & 0xFFFFFF
                colors[c] = colors.get(c, 0) + 1
        total = sum(colors.values())
        out["render"] = {"width": img.width(), "height": img.height(), "distinct_colors": len(colors),
                         "white_fraction": colors.get(0xFFFFFF, 0) / max(total, 1),
                         "errors": [f"{e.layerID}: {e.message}" for e in job.errors()]}
        m2p = settings.mapToPixel()
        out["probes"] = {}
        for key, (x, y) in probes.items():
            pt = m2p.transform(x, y)
            out["probes"][key] = QColor(img.pixel(int(pt.x()), int(pt.y()))).name()
        print(json.dumps(out))
        return 0 if ok else 2
    finally:
        QgsProject.instance().clear()
        app.exitQgis()


if __name__ == "__main__":
    pts = {}
    for arg in sys.argv[3:]:  # KEY=EASTING,NORTHING: report the rendered colour there
        key, xy = arg.split("=")
        x, y = xy.split(",")
        pts[key] = (float(x), float(y))
    sys.exit(main(sys.argv[1], sys.argv[2], pts))
