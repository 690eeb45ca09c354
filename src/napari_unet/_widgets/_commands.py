"""Menu command: Layers ▸ Segment ▸ "Segment with napari-unet" (instance labels)."""

from typing import Any

import napari
from napari.utils.notifications import show_info, show_warning

from ._geometry import make_request
from ._jobs import Job, error_text, start_job
from ._prediction import run_prediction, write_results
from ._state import get_state, load_default_or_fallback


def segment_image_layer(viewer: napari.viewer.Viewer) -> Job | None:
    """Instance labels of the selected image layer with the viewer's current model."""
    layer = viewer.layers.selection.active
    if layer is None or type(layer).__name__ != "Image":
        images = [lyr for lyr in viewer.layers.selection if type(lyr).__name__ == "Image"]
        layer = images[0] if images else None
    if layer is None:
        show_warning("napari-unet: select an image layer to segment")
        return None
    state = get_state(viewer)
    model = state.model
    device = state.device
    try:
        request = make_request(viewer, layer, model.in_channels if model is not None else 1)
    except ValueError as exc:
        show_warning(f"napari-unet: {exc}")
        return None

    def work(report: Any, cancel: Any) -> tuple[Any, dict, tuple | None]:
        m, loaded = model, None
        if m is None:
            loaded = load_default_or_fallback()
            m = loaded[0]
        result = run_prediction(
            m, request, labels_mode="instance", probabilities=False, device=device, cancel=cancel
        )
        return m, result, loaded

    def done(res: tuple[Any, dict, tuple | None]) -> None:
        m, result, loaded = res
        if loaded is not None and state.model is None:
            state.set_model(loaded[0], loaded[1], untrained=loaded[2])
        if layer not in viewer.layers:
            return
        entry = state.entry_of(m)
        write_results(
            viewer,
            request,
            m,
            result,
            "instance",
            label=entry.label if entry is not None else m.name,
        )
        warn = " (untrained model!)" if state.untrained and state.model is m else ""
        show_info(
            f"napari-unet: {result['n_labels']} objects in {layer.name!r} with {m.name}{warn}"
        )

    def failed(exc: BaseException) -> None:
        show_warning(f"napari-unet: segmentation failed: {error_text(exc)}")

    show_info(f"napari-unet: segmenting {layer.name!r}…")
    return start_job(work, viewer=viewer, on_done=done, on_error=failed, name="segment")
