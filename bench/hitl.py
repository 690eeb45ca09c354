"""Human-in-the-loop benchmark: training speed under load, bf16 vs fp32, the correction loop.

One run, three parts; A/B configurations alternate (order reversed every other round) so
that drifting background load hits both sides:

1. **threads** — training steps/s of the bundled U-Net (batch 4 × 128², fp32) on the
   development image, each configuration in a fresh process (OpenMP reads its wait policy at
   start-up): torch threads 1 / 2, OpenMP waiting as libgomp's default (spin, then sleep) or
   passive (``OMP_WAIT_POLICY=PASSIVE``), the machine "idle" (no load of ours) and with a
   competing load of 2 single-threaded processes spinning numpy, each in its own session
   (own scheduler autogroup, like two other programs). Goal: busy ≥ 0.7 × idle.
2. **precision** — steps/s and CPU seconds per step of fp32 vs bf16 autocast (no load of
   ours, the napari thread policy).
3. **loop** — the correction loop on ``nuclei_dev_image.tif``: predict with the bundled
   model, replace its prediction by the true labels inside the two separate 96×96
   rectangles where it makes the most object errors, fine-tune a fixed number of steps on
   both rectangles (fp32 and bf16 from the same start and seed), score object F1 at IoU 0.5
   on the nuclei outside both rectangles. Goals: ≥ bundled + 0.03; bf16 within 0.01 of fp32
   and ≥ 1.4× its steps/s.

Every measurement stores the machine's load: ``os.getloadavg`` before it and the CPU
(in cores) used during it by processes that are not part of the benchmark.

    .venv/bin/python bench/hitl.py [--parts threads,precision,loop] [--steps 10]
                                   [--rounds 2] [--loop-steps 100]

Prints a table and writes ``bench/results/hitl.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
HERE = Path(__file__).resolve()
SPIN = (
    "import numpy as np\n"
    "x = np.random.rand(1 << 18)\n"
    "while True:\n"
    "    np.sqrt(x * x + 1.0, out=x)\n"
)
TRAIN_ROI = (0, 256, 0, 256)


# ------------------------------------------------------------------ load bookkeeping
class Monitor:
    """Samples the CPU used by processes outside ``ours`` (cores busy, mean over the run)."""

    def __init__(self, ours: set[int]):
        import psutil

        self.psutil = psutil
        self.ours = ours
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _others(self) -> dict[int, float]:
        out = {}
        for p in self.psutil.process_iter(["pid"]):
            if p.pid in self.ours or p.pid == os.getpid():
                continue
            try:
                t = p.cpu_times()
                out[p.pid] = t.user + t.system
            except (self.psutil.NoSuchProcess, self.psutil.AccessDenied):
                pass
        return out

    def _run(self) -> None:
        before, t0 = self._others(), time.perf_counter()
        while not self._stop.wait(1.0):
            after, t1 = self._others(), time.perf_counter()
            used = sum(v - before[k] for k, v in after.items() if k in before)
            self.samples.append(used / (t1 - t0))
            before, t0 = after, t1

    def __enter__(self) -> Monitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def other_cores(self) -> float | None:
        return round(sum(self.samples) / len(self.samples), 2) if self.samples else None


class CompetingLoad:
    """``n`` single-threaded processes spinning numpy (started and ended by pid)."""

    def __init__(self, n: int):
        self.n = n
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> CompetingLoad:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
        self.procs = [
            subprocess.Popen([sys.executable, "-c", SPIN], env=env, start_new_session=True)
            for _ in range(self.n)
        ]
        time.sleep(1.0)
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.wait(timeout=10)

    @property
    def pids(self) -> set[int]:
        return {p.pid for p in self.procs}


# ----------------------------------------------------------------------- the child
class StepTimer:
    """Training callback recording when each step ended."""

    def __init__(self) -> None:
        self.times: list[float] = []

        self.cpu: list[float] = []

    def __call__(self, ev: dict) -> None:
        if ev["kind"] == "step":
            self.times.append(time.perf_counter())
            self.cpu.append(time.process_time())

    def cpu_per_step(self, warmup: int) -> float:
        """CPU seconds (all threads of this process) per step after ``warmup`` steps."""
        c = self.cpu[warmup - 1 :] if warmup else self.cpu
        return (c[-1] - c[0]) / max(1, len(c) - 1)

    def intervals(self, warmup: int) -> list[float]:
        """Step durations after the first ``warmup`` steps."""
        t = self.times[warmup - 1 :] if warmup else self.times
        return [b - a for a, b in zip(t, t[1:])]


def child(cfg: dict) -> None:
    """Measure training steps/s in this (fresh) process and print one JSON line."""
    from napari_unet._sample_data import nuclei_image, nuclei_labels
    from napari_unet.checkpoint import load_default_model
    from napari_unet.training import train

    model = load_default_model()
    image, labels = nuclei_image(), nuclei_labels()
    timer = StepTimer()
    warm = cfg.get("warmup", 2)
    history = train(
        model,
        image,
        labels,
        roi=TRAIN_ROI,
        steps=warm + cfg["steps"],
        batch_size=4,
        patch_size=128,
        validation="none",
        precision=cfg["precision"],
        threads=cfg["threads"],
        callback=timer,
        seed=0,
    )
    dts = timer.intervals(warm)
    print(
        json.dumps(
            {
                "steps_per_s": len(dts) / sum(dts),
                "step_s": [round(d, 3) for d in dts],
                "cpu_s_per_step": round(timer.cpu_per_step(warm), 3),
                "torch_threads": history.settings["threads"],
                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)"),
            }
        )
    )


def run_child(cfg: dict, load: CompetingLoad | None) -> dict:
    env = {**os.environ}
    env.pop("OMP_NUM_THREADS", None)
    env.pop("NAPARI_UNET_THREADS", None)
    if cfg["wait"] == "passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    else:
        env.pop("OMP_WAIT_POLICY", None)
    ours = set(load.pids) if load else set()
    la = os.getloadavg()[0]
    proc = subprocess.Popen(
        [sys.executable, str(HERE), "--child", json.dumps(cfg)],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    ours.add(proc.pid)
    with Monitor(ours) as mon:
        out, _ = proc.communicate(timeout=900)
    if proc.returncode:
        raise RuntimeError(f"child {cfg} failed ({proc.returncode})")
    res = json.loads(out.strip().splitlines()[-1])
    return {
        **cfg,
        **res,
        "load": "busy" if load else "idle",
        "loadavg_1min_before": round(la, 2),
        "other_processes_cores": mon.other_cores,
    }


# ----------------------------------------------------------------------- the parts
def part_threads(steps: int, rounds: int, policy_threads: int) -> list[dict]:
    configs = [
        {"threads": t, "wait": w, "precision": "fp32", "steps": steps}
        for t in sorted({1, 2, policy_threads})
        for w in ("default", "passive")
    ]
    rows = []
    for r in range(rounds):
        for load_on in (False, True) if r % 2 == 0 else (True, False):
            order = configs if r % 2 == 0 else configs[::-1]
            if load_on:
                with CompetingLoad(2) as load:
                    rows += [run_child(c, load) | {"round": r} for c in order]
            else:
                rows += [run_child(c, None) | {"round": r} for c in order]
            print(f"  threads round {r} {'busy' if load_on else 'idle'} done", file=sys.stderr)
    return rows


def part_precision(steps: int, rounds: int, threads: int) -> list[dict]:
    rows = []
    for r in range(rounds):
        for prec in ("fp32", "bf16") if r % 2 == 0 else ("bf16", "fp32"):
            cfg = {"threads": threads, "wait": "passive", "precision": prec, "steps": steps}
            rows.append(run_child(cfg, None) | {"round": r})
    return rows


def worst_rectangles(gt, pred, size: int = 96, stride: int = 16):
    """Two non-overlapping size² windows with the most object errors (FP + FN) of ``pred``."""
    import numpy as np

    from napari_unet.metrics import object_metrics

    h, w = gt.shape
    scored = []
    for y in range(0, h - size + 1, stride):
        for x in range(0, w - size + 1, stride):
            m = object_metrics(gt[y : y + size, x : x + size], pred[y : y + size, x : x + size])
            scored.append((m["fp"] + m["fn"], -y, -x))
    scored.sort(reverse=True)
    first = (-scored[0][1], -scored[0][2])
    for _, ny, nx in scored[1:]:
        y, x = -ny, -nx
        if abs(y - first[0]) >= size or abs(x - first[1]) >= size:  # separate
            second = (y, x)
            break
    rects = [(y, y + size, x, x + size) for y, x in (first, second)]
    assert np.all(np.array(rects) >= 0)
    return rects


def part_loop(steps: int, threads: int) -> dict:
    import numpy as np

    from napari_unet._sample_data import nuclei_image, nuclei_labels
    from napari_unet.checkpoint import load_default_model
    from napari_unet.inference.predict import predict
    from napari_unet.metrics import object_metrics
    from napari_unet.postprocess import segment
    from napari_unet.runtime import torch_threads
    from napari_unet.training import TrainingEntry, train

    image, gt = nuclei_image(), nuclei_labels()
    bundled = load_default_model()

    def labels_of(model):
        # one thread: the same labels on every run (fp32 sums depend on the thread count,
        # and the rectangles are chosen from these labels)
        with torch_threads(1):
            return segment(predict(model, image, device="cpu"), class_names=model.class_names)

    before = labels_of(bundled)
    rects = worst_rectangles(gt, before)
    corrected = before.astype(np.int64).copy()
    corrected[corrected > 0] += int(gt.max())  # keep ids distinct from the true labels
    inside = np.zeros(gt.shape, bool)
    for y0, y1, x0, x1 in rects:
        inside[y0:y1, x0:x1] = True
    corrected[inside] = gt[inside]
    exclude = inside
    base = object_metrics(gt, before, exclude=exclude)
    out = {
        "rectangles": rects,
        "objects_in_rectangles": int(np.unique(gt[inside & (gt > 0)]).size),
        "scored_objects": base["n_gt"],
        "bundled_f1": base["f1"],
        "steps": steps,
        "runs": {},
    }
    for prec in ("fp32", "bf16"):
        model = load_default_model()
        timer = StepTimer()
        la = os.getloadavg()[0]
        with Monitor(set()) as mon:
            history = train(
                model,
                TrainingEntry(image, corrected, rects, name="nuclei"),
                steps=steps,
                validation="none",
                precision=prec,
                threads=threads,
                seed=0,
                callback=timer,
            )
        after = labels_of(model)
        m = object_metrics(gt, after, exclude=exclude)
        dts = timer.intervals(2)
        out["runs"][prec] = {
            "f1": m["f1"],
            "precision_obj": m["precision"],
            "recall": m["recall"],
            "steps_per_s": len(dts) / sum(dts),
            "cpu_s_per_step": round(timer.cpu_per_step(2), 3),
            "train_seconds": history.seconds,
            "summary": history.data.describe(),
            "final_loss": history.losses[-1],
            "loadavg_1min_before": round(la, 2),
            "other_processes_cores": mon.other_cores,
        }
        print(f"  loop {prec}: F1 {m['f1']:.3f}", file=sys.stderr)
    return out


# ------------------------------------------------------------------------ summary
def _mean(rows: list[dict], key: str = "steps_per_s", **match) -> float | None:
    vals = [r[key] for r in rows if all(r.get(k) == v for k, v in match.items())]
    return sum(vals) / len(vals) if vals else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--parts", default="threads,precision,loop")
    parser.add_argument("--steps", type=int, default=10, help="measured steps per speed run")
    parser.add_argument("--rounds", type=int, default=2, help="A/B rounds per speed part")
    parser.add_argument("--loop-steps", type=int, default=100, help="fine-tuning steps (loop)")
    parser.add_argument("--out", default=str(RESULTS / "hitl.json"))
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return

    sys.path.insert(0, str(HERE.parent))
    from _env import cpu_model
    from napari_unet.runtime import choose_threads, cpu_has_bf16, physical_cores

    parts = args.parts.split(",")
    policy_gui = choose_threads(gui=True, environ={})
    policy_headless = choose_threads(gui=False, environ={})
    result: dict = {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "physical_cores": physical_cores(),
        "bf16_units": cpu_has_bf16(),
        "python": platform.python_version(),
        "policy_threads": {"napari": policy_gui, "headless": policy_headless},
        "model": "bundled U-Net (3 classes, base 16, depth 3), batch 4 x 128^2, ce_dice",
        "competing_load": "2 processes spinning numpy (np.sqrt on 2^18 doubles, 1 thread each)",
        "loadavg_start": os.getloadavg(),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE.parent
        ).stdout.strip(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    if "threads" in parts:
        result["threads"] = part_threads(args.steps, args.rounds, policy_headless)
    if "precision" in parts:
        result["precision"] = part_precision(args.steps, args.rounds, policy_gui)
    if "loop" in parts:
        result["loop"] = part_loop(args.loop_steps, policy_gui)
    result["loadavg_end"] = os.getloadavg()

    lines = []
    if "threads" in result:
        rows = result["threads"]
        lines.append("training steps/s (fp32)   idle   busy   busy/idle   other procs (cores)")
        for t in sorted({r["threads"] for r in rows}):
            for w in ("default", "passive"):
                i, b = (
                    _mean(rows, threads=t, wait=w, load="idle"),
                    _mean(rows, threads=t, wait=w, load="busy"),
                )
                oth = [
                    r["other_processes_cores"]
                    for r in rows
                    if r["threads"] == t and r["wait"] == w and r["other_processes_cores"]
                ]
                lines.append(
                    f"  {t} thread(s), {w:8s}    {i:5.2f}  {b:5.2f}   {b / i:5.2f}×"
                    f"      {sum(oth) / max(1, len(oth)):.2f}"
                )
        best_idle = max(_mean(rows, threads=t, load="idle") for t in {r["threads"] for r in rows})
        result["threads_summary"] = {
            f"{t}_{w}_{ld}": _mean(rows, threads=t, wait=w, load=ld)
            for t in sorted({r["threads"] for r in rows})
            for w in ("default", "passive")
            for ld in ("idle", "busy")
        }
        result["threads_summary"]["best_idle"] = best_idle
    if "precision" in result:
        rows = result["precision"]
        f, b = _mean(rows, precision="fp32"), _mean(rows, precision="bf16")
        cf = _mean(rows, "cpu_s_per_step", precision="fp32")
        cb = _mean(rows, "cpu_s_per_step", precision="bf16")
        lines.append(
            f"precision ({rows[0]['threads']} thread(s)): steps/s fp32 {f:.2f}, bf16 {b:.2f} "
            f"({b / f:.2f}×); CPU s/step fp32 {cf:.3f}, bf16 {cb:.3f} ({cf / cb:.2f}×)"
        )
        result["precision_summary"] = {
            "fp32_steps_per_s": f,
            "bf16_steps_per_s": b,
            "speedup": b / f,
            "fp32_cpu_s_per_step": cf,
            "bf16_cpu_s_per_step": cb,
            "cpu_speedup": cf / cb,
        }
    if "loop" in result:
        lp = result["loop"]
        lines.append(
            f"correction loop ({lp['steps']} steps, {lp['scored_objects']} nuclei scored outside "
            f"{len(lp['rectangles'])} rectangles with {lp['objects_in_rectangles']} nuclei): "
            f"bundled F1 {lp['bundled_f1']:.3f}"
        )
        for prec, run in lp["runs"].items():
            lines.append(
                f"  {prec}: F1 {run['f1']:.3f} ({run['f1'] - lp['bundled_f1']:+.3f}), "
                f"{run['steps_per_s']:.2f} steps/s, {run['cpu_s_per_step']:.3f} CPU s/step, "
                f"{run['train_seconds']:.0f} s"
            )
    lines.append(
        f"load: loadavg start {result['loadavg_start'][0]:.2f}, end {result['loadavg_end'][0]:.2f}"
    )
    result["table"] = lines
    print("\n".join(lines))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
