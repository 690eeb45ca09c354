"""Screenshots of the Compare models widget and of a trained UNet++ level by level.

    xvfb-run -a -s "-screen 0 1600x1200x24" .venv/bin/python scripts/zoo_screenshots.py

Opens napari with the sample nuclei (the development image and its 64 labelled nuclei),
docks Compare models, compares every bundled trained variant (one row per depth) and
saves ``docs/images/compare.png``; then shows the bundled UNet++'s instances at L1..L4
side by side over the image (grid view) and saves ``docs/images/unetpp_depths.png``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from screenshots import sample_viewer, settle, until  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WINDOW = (1500, 950)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    viewer = sample_viewer(WINDOW)
    _, w = viewer.window.add_plugin_dock_widget("napari-unet", "Compare models")
    until(lambda: w.model_list.count() > 1, timeout=120)
    w.labels_combo.set_layer(viewer.layers["nuclei labels"])
    w.run()
    until(lambda: w._job is None)
    print(w.status.text())
    w.table.selectRow(0)
    w.show_selected()
    viewer.layers["nuclei labels"].visible = False
    viewer.reset_view()
    settle(1.0)

    def shot(name: str) -> None:
        settle(1.0)
        path = args.out / f"{name}.png"
        viewer.screenshot(str(path), canvas_only=False, flash=False)
        print(f"wrote {path}")

    shot("compare")

    # UNet++ level by level: image + instances per grid cell
    image = viewer.layers["nuclei"]
    rows = {r.output: r for r in w.rows if r.name == "unetpp"}
    for layer in list(viewer.layers):
        if layer is not image:
            viewer.layers.remove(layer)
    image.name = "nuclei L1"
    for level in range(1, 5):
        r = rows[f"L{level}"]
        if level > 1:
            viewer.add_image(image.data, name=f"nuclei L{level}", colormap="gray",
                             contrast_limits=image.contrast_limits)  # fmt: skip
        viewer.add_labels(
            r.labels,
            name=f"UNet++ L{level}: F1 {r.f1:.3f}, {r.seconds:.2f} s, {r.parameters / 1e6:.2f}M",
            opacity=0.5,
        )
    viewer.grid.enabled = True
    viewer.grid.stride = 2
    viewer.grid.shape = (2, 2)
    viewer.reset_view()
    shot("unetpp_depths")
    viewer.close()


if __name__ == "__main__":
    main()
