"""The human-in-the-loop cycle, scripted on the real widgets in a real viewer (issue #10).

    xvfb-run -a -s "-screen 0 1600x1200x24" .venv/bin/python scripts/journey.py

A 1600×1000 napari window, the sample nuclei, Plugins → napari-unet → "All tools (one
panel)". Then, as a user would: predict with the bundled model, "Use as annotation",
correct the copy inside two rectangles (here: with the true labels), train on both
rectangles (a step budget, held-out validation), predict again (a new layer), compare
before/after side by side, and look at the model list. Saves to ``docs/images/``:

* ``panel.png`` — the one panel in the 1600×1000 window;
* ``correction.png`` — the correction loop: corrected annotation, two rectangles, the
  Train tab with its summary and plot;
* ``results.png`` — the bundled model's result and the fine-tuned one side by side;
* ``models.png`` — the model list (bundled, trained here with its summary, built);
* ``inspect.png`` — the border weight map of the corrected annotation.

Prints the window's minimum size with every tool open and the F1@0.5 of both results
outside the rectangles.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from screenshots import sample_viewer, settle, until, wait  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WINDOW = (1600, 1000)
RECTANGLES = [(16, 112, 24, 120), (128, 224, 300, 396)]  # two 96×96 corrections


def rectangle(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    return np.array([[y0, x0], [y0, x1], [y1, x1], [y1, x0]], float)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    parser.add_argument("--steps", type=int, default=60, help="training steps")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from qtpy.QtWidgets import QDockWidget

    from napari_unet._widgets import get_state
    from napari_unet.metrics import object_metrics

    viewer = sample_viewer(WINDOW)
    window = viewer.window._qt_window
    truth = viewer.layers["nuclei labels"].data.copy()
    viewer.layers["nuclei labels"].visible = False
    _, panel = viewer.window.add_plugin_dock_widget("napari-unet", "All tools (one panel)")
    state = get_state(viewer)
    until(lambda: state.model is not None, timeout=300)

    def shot(name: str) -> None:
        from napari._qt.dialogs.qt_notification import NapariQtNotification

        for popup in window.findChildren(NapariQtNotification):
            popup.close()
        settle(1.0)
        path = args.out / f"{name}.png"
        viewer.screenshot(str(path), canvas_only=False, flash=False)
        print(f"wrote {path} ({window.width()}×{window.height()})")

    def outside_f1(labels: np.ndarray) -> float:
        ignore = np.zeros(truth.shape, bool)
        for y0, y1, x0, x1 in RECTANGLES:
            ignore[y0:y1, x0:x1] = True
        return object_metrics(truth, labels, exclude=ignore)["f1"]

    # 1. predict with the bundled model: a new layer "nuclei [unet #1]"
    predict = panel.show_tab("Predict")
    predict.image.set_layer(viewer.layers["nuclei"])
    wait(predict.run())
    first = predict.last_layers["labels"]
    print(predict.status.text())
    viewer.reset_view()
    shot("panel")

    # 2. use it as an annotation and correct it inside two rectangles
    annotation = predict.use_as_annotation()
    corrected = annotation.data.copy()
    for y0, y1, x0, x1 in RECTANGLES:
        corrected[y0:y1, x0:x1] = truth[y0:y1, x0:x1] + np.where(
            truth[y0:y1, x0:x1] > 0, corrected.max() + 1, 0
        ).astype(corrected.dtype)
    annotation.data = corrected
    annotation.mode = "pan_zoom"
    regions = viewer.add_shapes(
        [rectangle(*r) for r in RECTANGLES],
        shape_type="rectangle",
        edge_color="yellow",
        face_color="transparent",
        edge_width=3,
        name="corrected regions",
    )

    # 3. train on both rectangles (steps, held-out validation); it predicts when done
    train = panel.show_tab("Train")
    train.image.set_layer(viewer.layers["nuclei"])
    train.labels.set_layer(annotation)
    train.region.set_layer(regions)
    train.validation.setCurrentText("held-out objects")
    train.budget_kind.setCurrentText("steps")
    train.budget.setValue(args.steps)
    wait(train.run(), timeout=1800)
    print(train.status.text())
    second = train.last_layers["labels"]
    first.visible = False
    second.visible = False
    annotation.visible = True
    annotation.opacity = 0.6
    viewer.layers.selection.active = regions
    viewer.reset_view()
    shot("correction")
    scores = (
        f"F1@0.5 on the nuclei outside both rectangles: bundled {outside_f1(first.data):.3f} "
        f"→ fine-tuned {outside_f1(second.data):.3f}"
    )
    print(scores)

    # 4. before / after side by side (grid: image + result per cell)
    for layer in viewer.layers:
        layer.visible = False
    twin = viewer.add_image(
        viewer.layers["nuclei"].data, name="nuclei (view 2)", colormap="gray", visible=True
    )
    order = [viewer.layers["nuclei"], first, twin, second]
    for i, layer in enumerate(order):
        viewer.layers.move(viewer.layers.index(layer), i)
        layer.visible = True
    grid = viewer.canvas.grid if hasattr(viewer, "canvas") else viewer.grid
    grid.stride = 2
    grid.shape = (1, 2)
    grid.enabled = True
    overlays = getattr(getattr(viewer, "canvas", None), "overlays", None)
    text = overlays.text if overlays is not None else viewer.text_overlay
    text.text = (
        f"left: {first.name} (bundled)\nright: {second.name} (fine-tuned)\n"
        + scores.replace(": bundled", ":\nbundled")
    )
    text.position = "top_left"
    text.font_size = 11
    text.visible = True
    viewer.layers.selection.active = second
    panel.show_tab("Predict")
    viewer.reset_view()
    shot("results")
    grid.enabled = False
    text.visible = False
    viewer.layers.remove(twin)

    # 5. the model list: bundled, trained here (summary), and a network built here
    model_tab = panel.show_tab("Model")
    until(lambda: model_tab.variant.count() > 0)
    model_tab.variant.setCurrentText("unetpp")
    wait(model_tab.build())
    model_tab.models.setCurrentRow(
        next(i for i, e in enumerate(state.entries) if e.kind == "trained")
    )
    until(lambda: model_tab.info["training"].text() not in ("—", ""))
    for layer in viewer.layers:
        layer.visible = layer.name in ("nuclei", second.name)
    viewer.reset_view()
    shot("models")
    print("models:", "; ".join(e.describe() for e in state.entries))

    # 6. Inspect: the border weight map of the corrected annotation (live while painting)
    inspect = panel.show_tab("Inspect")
    inspect.labels.set_layer(annotation)
    wait(inspect.show_weight_map())
    inspect.image.set_layer(viewer.layers["nuclei"])
    wait(inspect.show_side_outputs())
    for layer in viewer.layers:
        layer.visible = layer is inspect.weight_layer
    viewer.layers.selection.active = inspect.weight_layer
    viewer.reset_view()
    shot("inspect")

    # window fit: every tool open from the Plugins menu
    for name in ("Model", "Predict", "Inspect", "Train", "Compare models"):
        viewer.window.add_plugin_dock_widget("napari-unet", name)
    settle(0.5)
    hint = window.minimumSizeHint()
    docks = len(window.findChildren(QDockWidget))
    print(
        f"minimum window size with every tool open ({docks} docks): {hint.width()}×{hint.height()}"
    )
    viewer.close()


if __name__ == "__main__":
    main()
