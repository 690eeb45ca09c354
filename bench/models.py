"""Benchmark: size, compute and CPU speed of every registered network and UNet++ level.

Rows: every variant in :func:`napari_unet.models.list_models` with its default config
(``in_channels=1``, ``num_classes=2``), plus the default UNet++ pruned to levels L1..L4
(``model(x, level=L)``, which computes only the nodes ``X[i][j]`` with ``i + j ≤ L``).
For each row it measures

* parameters (``model.info.parameters``; ``level_parameters(L)`` for a pruned level:
  the nodes it computes plus its one head);
* FLOPs of one forward at ``--size``² in eval mode, counted by
  :class:`torch.utils.flop_counter.FlopCounterMode` (2 per multiply-add; convolutions,
  transposed convolutions and matrix products — element-wise ops, norms and softmax
  are not counted) and divided by the input's megapixels (GFLOP/MP). A network whose
  ``size_divisor`` does not divide ``--size`` pads internally (Swin-UNet: 512 → 672),
  and that padded work is charged to the input's megapixels;
* CPU latency of batch 1 at ``--size``² in eval mode under ``torch.inference_mode()``:
  one warm-up run, then the median and minimum of ``--repeats`` timed runs. The timed
  runs of a group (the variants; the UNet++ levels) go round-robin, one run of each
  network per round, so load from other processes on a shared CPU hits them alike;
  on a busy machine the minimum is the better estimate of the unloaded speed;
* peak memory of one forward at ``--size``² under ``torch.inference_mode()`` (Linux):
  in a fresh interpreter (glibc ``MALLOC_MMAP_THRESHOLD_=65536``, so freed tensors go
  back to the system) after a small warm-up forward, the peak RSS (``VmHWM``, reset
  through ``/proc/self/clear_refs`` just before the call) minus the RSS before it, in
  MiB — activations and workspace, not the weights;
* halo, size divisor, receptive-field radius and number of deep-supervision outputs
  from ``model.info``. For a pruned level L the receptive field is that of the pruned
  sub-network (measured on the equivalent ``depth=L`` UNet++, which has exactly that
  graph) and it has one output; halo and divisor are the full model's (its forward
  still pads to the full model's divisor).

It prints a table, the UNet++ ratios L4/L1, L4/L2, L4/L3 (latency and FLOPs), and
writes ``bench/results/models.json`` (one record per row, the ratios and the
environment: torch version, thread count, CPU model, date, load average before and
after).

    .venv/bin/python bench/models.py [--size 512] [--repeats 5] [--quick] [--threads N]

``--quick`` uses 2 timed repeats (every row is still measured). UNet 3+ (≈1.6 TFLOP at
512²) and U²-Net are the slowest rows; the whole run takes ~10 minutes on 2 busy cores.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from _env import cpu_model
from napari_unet.models import SegmentationModel, build_model, list_models
from napari_unet.models.base import measure_receptive_field
from napari_unet.models.summary import align_columns

RESULTS = Path(__file__).resolve().parent / "results" / "models.json"
UNETPP = "unetpp"


@dataclass
class Row:
    """One benchmarked network (a variant or a pruned UNet++ level)."""

    name: str
    level: int | None
    parameters: int
    gflops: float
    """GFLOP of one forward at ``input_size``²."""
    gflop_per_mp: float
    latency_median_s: float
    latency_min_s: float
    latency_all_s: list[float]
    peak_mib: float | None
    """Peak RSS above the resting process during one forward (None off Linux)."""
    input_size: int
    compute_size: int
    """Side actually computed on (the input padded up to the size divisor)."""
    halo: int
    size_divisor: int
    receptive_field: int
    deep_supervision_outputs: int
    tile_exact: bool


def environment() -> dict[str, object]:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def count_flops(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> int:
    """Total FLOPs of ``forward(x)`` as counted by ``FlopCounterMode``."""
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        forward(x)
    return int(counter.get_total_flops())


def time_interleaved(
    forwards: dict[str, Callable[[torch.Tensor], torch.Tensor]], x: torch.Tensor, repeats: int
) -> dict[str, list[float]]:
    """Wall times (s) of ``repeats`` calls of each forward, after one untimed warm-up each.

    The timed calls go round-robin (one call of every forward per round), so a change in
    the machine's load hits every network alike and the ratios stay meaningful on a
    shared CPU.
    """
    times: dict[str, list[float]] = {key: [] for key in forwards}
    with torch.inference_mode():
        for forward in forwards.values():
            forward(x)
        for _ in range(repeats):
            for key, forward in forwards.items():
                t = time.perf_counter()
                forward(x)
                times[key].append(time.perf_counter() - t)
    return times


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def peak_memory(name: str, level: int | None, size: int) -> float | None:
    """Peak RSS (MiB) above the resting process during one forward at ``size``².

    Measured in a fresh interpreter (``bench/models.py --peak``) so that memory freed
    by earlier forwards and kept by the allocator cannot hide the peak; None off Linux.
    """
    cmd = [sys.executable, __file__, "--peak", name, str(level or 0), str(size)]
    # glibc's adaptive mmap threshold keeps freed tensors in the heap, which makes the
    # peak depend on fragmentation (±50% between runs); a fixed threshold maps every
    # tensor on its own and the figure repeats to <1 MiB
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    return float(done.stdout.split()[-1]) if done.returncode == 0 and done.stdout else None


def _peak_here(name: str, level: int, size: int) -> float:
    """The ``--peak`` child: one forward of ``name`` (pruned to ``level`` if > 0)."""
    model = build_model(name, 1, 2).eval()
    x = torch.randn(1, 1, size, size)
    kwargs = {"level": level} if level else {}
    with torch.inference_mode():
        model(x[..., :64, :64] if model.info.size_divisor <= 64 else x, **kwargs)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets VmHWM to the current RSS
    base = _status_mib("VmRSS")
    with torch.inference_mode():
        model(x, **kwargs)
    return _status_mib("VmHWM") - base


@dataclass
class Case:
    """A network to benchmark: ``forward`` is a call of ``model`` (maybe with a level);
    ``None`` fields fall back to ``model.info``."""

    name: str
    model: SegmentationModel
    forward: Callable[[torch.Tensor], torch.Tensor]
    level: int | None = None
    parameters: int | None = None
    receptive_field: int | None = None
    outputs: int | None = None


def variant_cases() -> list[Case]:
    """Every registered variant with its default config."""
    cases = []
    for name in list_models():
        model = build_model(name, 1, 2).eval()
        cases.append(Case(name, model, model))
    return cases


def unetpp_level_cases() -> list[Case]:
    """The default UNet++ pruned to each level (one shared model, ``model(x, level=L)``)."""
    model = build_model(UNETPP, 1, 2).eval()
    cases = []
    for level in range(1, model.depth + 1):
        # The pruned level-L graph is exactly a depth-L UNet++; probe that for its RF.
        pruned_rf = measure_receptive_field(build_model(UNETPP, 1, 2, depth=level))
        cases.append(
            Case(
                f"{UNETPP} L{level}",
                model,
                lambda x, level=level: model(x, level=level),
                level=level,
                parameters=model.level_parameters(level),
                receptive_field=pruned_rf,
                outputs=1,
            )
        )
    return cases


def measure(cases: list[Case], size: int, repeats: int) -> list[Row]:
    """FLOPs (one counted forward each), interleaved latencies and ``info`` of ``cases``."""
    x = torch.randn(1, 1, size, size)
    flops = {}
    for case in cases:
        flops[case.name] = count_flops(case.forward, x)
        print(f"  {case.name}: {flops[case.name] / 1e9:.1f} GFLOP", flush=True)
    times = time_interleaved({c.name: c.forward for c in cases}, x, repeats)
    peaks = {case.name: peak_memory(case.model.name, case.level, size) for case in cases}
    rows = []
    for case in cases:
        info = case.model.info
        t = times[case.name]
        rows.append(
            Row(
                name=case.name,
                level=case.level,
                parameters=info.parameters if case.parameters is None else case.parameters,
                gflops=flops[case.name] / 1e9,
                gflop_per_mp=flops[case.name] / 1e9 / (size * size / 1e6),
                latency_median_s=statistics.median(t),
                latency_min_s=min(t),
                latency_all_s=t,
                peak_mib=peaks[case.name],
                input_size=size,
                compute_size=case.model.legal_size(size),
                border=info.border,
                size_divisor=info.size_divisor,
                receptive_field=(
                    info.receptive_field if case.receptive_field is None else case.receptive_field
                ),
                deep_supervision_outputs=(
                    info.deep_supervision_outputs if case.outputs is None else case.outputs
                ),
                tile_exact=info.tile_exact,
            )
        )
    return rows


def unetpp_ratios(levels: list[Row]) -> dict[str, dict[str, float]]:
    """``{"L4/L1": {"latency_median": ..., "latency_min": ..., "flops": ...}, ...}``."""
    deepest = levels[-1]
    return {
        f"L{deepest.level}/L{row.level}": {
            "latency_median": deepest.latency_median_s / row.latency_median_s,
            "latency_min": deepest.latency_min_s / row.latency_min_s,
            "flops": deepest.gflops / row.gflops,
            "parameters": deepest.parameters / row.parameters,
        }
        for row in levels[:-1]
    }


def format_table(rows: list[Row]) -> str:
    header = (
        "network",
        "params",
        "GFLOP/MP",
        "median s",
        "min s",
        "peak MiB",
        "computed",
        "halo",
        "divisor",
        "RF radius",
        "outputs",
    )
    lines = [
        (
            r.name,
            f"{r.parameters / 1e6:.2f}M",
            f"{r.gflop_per_mp:.1f}",
            f"{r.latency_median_s:.3f}",
            f"{r.latency_min_s:.3f}",
            "n/a" if r.peak_mib is None else f"{r.peak_mib:.0f}",
            f"{r.compute_size}²" + (" (padded)" if r.compute_size != r.input_size else ""),
            str(r.border),
            str(r.size_divisor),
            str(r.receptive_field),
            str(r.deep_supervision_outputs),
        )
        for r in rows
    ]
    return align_columns(header, lines)


def format_ratios(ratios: dict[str, dict[str, float]]) -> str:
    lines = ["UNet++ speed ratios (deepest level / pruned level):"]
    for key, r in ratios.items():
        lines.append(
            f"  {key}: latency {r['latency_median']:.2f}× (median), "
            f"{r['latency_min']:.2f}× (min); FLOPs {r['flops']:.2f}×; "
            f"parameters {r['parameters']:.2f}×"
        )
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--peak":
        print(_peak_here(sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="input side (px), batch 1")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs after one warm-up")
    parser.add_argument("--quick", action="store_true", help="2 timed repeats")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    repeats = 2 if args.quick else args.repeats
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    env = environment()
    print(
        f"torch {env['torch']}, {env['threads']} thread(s), {env['cpu']}; "
        f"{args.size}×{args.size}, batch 1, {repeats} repeat(s)",
        flush=True,
    )
    load_before = os.getloadavg()
    print("variants:", flush=True)
    rows = measure(variant_cases(), args.size, repeats)
    print("UNet++ levels:", flush=True)
    levels = measure(unetpp_level_cases(), args.size, repeats)
    env["loadavg_before"] = load_before
    env["loadavg_after"] = os.getloadavg()
    ratios = unetpp_ratios(levels)

    print()
    print(format_table(rows + levels))
    padded = [r for r in rows if r.compute_size != r.input_size]
    for r in padded:
        print(
            f"note: {r.name} pads {r.input_size}² to {r.compute_size}² (size divisor "
            f"{r.size_divisor}); its FLOPs and latency include the padding."
        )
    print(
        "note: UNet++ Lk rows are the default unetpp pruned to level k (params of the "
        "computed nodes + one head; RF of the pruned sub-network)."
    )
    print()
    print(format_ratios(ratios))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "environment": env,
        "settings": {"size": args.size, "batch": 1, "repeats": repeats, "warmup": 1},
        "rows": [asdict(r) for r in rows + levels],
        "unetpp_ratios": ratios,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
