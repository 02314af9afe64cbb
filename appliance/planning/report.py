"""A plan as people and programs read it: the table with every variant's verdict, its JSON, the
calibration's fit, and the plot."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from appliance.exitcodes import ApplianceError, ExitCode
from appliance.models.catalog import Variant
from appliance.planning.planner import (
    Calibration,
    Candidate,
    DeviceMeasurement,
    Plan,
    budget_for,
)
from appliance.util import human_bytes


def _percent(value: float) -> str:
    return f"{value * 100:.1f} %"


def describe_calibration(calibration: Calibration) -> str:
    errors = calibration.error_summary()["all"]
    return (f"bandwidth model: efficiency dense {calibration.efficiency['dense']:.2f}, "
            f"moe {calibration.efficiency['moe']:.2f}, KV read ×{calibration.kv_penalty:.2f}; "
            f"error on {errors['points']} published measurements: mean "
            f"{_percent(errors['mean_abs_error'])}, max {_percent(errors['max_abs_error'])} "
            f"(each left out of the fit: mean {_percent(errors['held_out_mean_abs_error'])}, "
            f"max {_percent(errors['held_out_max_abs_error'])})")


def format_calibration(calibration: Calibration) -> str:
    lines = [describe_calibration(calibration), "",
             f"{'variant':<36} {'device':<20} {'depth':>6} {'KV':<5} {'measured':>8} "
             f"{'fitted':>7} {'error':>7} {'held out':>8}  source"]
    for point in calibration.points:
        held = f"{point.held_out_error:+.1%}" if point.held_out_error is not None else "-"
        lines.append(f"{point.variant:<36} {point.device:<20} {point.depth:>6} "
                     f"{point.kv_type:<5} {point.measured_tps:>8.2f} {point.predicted_tps:>7.2f} "
                     f"{point.error:>+7.1%} {held:>8}  {point.source}")
    return "\n".join(lines)


def _budget_line(result: Plan, candidate: Candidate) -> str:
    budget = result.budget(candidate.variant)
    parts = [("RAM", budget.ram_bytes), ("OS", budget.os_reserve_bytes),
             ("KV cache", budget.kv_cache_bytes), ("runtime", budget.runtime_overhead_bytes),
             ("margin", budget.safety_margin_bytes)]
    terms = " − ".join(f"{name} {human_bytes(size)}" for name, size in parts)
    return f"{terms} = {human_bytes(budget.weights_bytes)} for the weights"


def _quality(variant: Variant) -> str:
    score = variant.quality_score
    if score is None:
        return "-"
    return f"{score:.1f}" if variant.quality_percent is not None else f"≤{score:.1f} est"


def format_plan(result: Plan) -> str:
    device, request = result.device, result.request
    lines = [
        f"device   {device.name}: {human_bytes(device.memory_bytes)} RAM, "
        f"{device.bandwidth_bytes_per_s / 1e9:.1f} GB/s ({device.bandwidth_source})"
        + (f", {human_bytes(device.free_storage_bytes)} free for models"
           if device.free_storage_bytes is not None else ""),
        f"request  context {request.context} tokens ({request.kv_type} KV cache); speed at "
        f"depth {min(request.depth, request.context)}; target {request.target_tps:g} tok/s "
        f"(pass at ≥ {request.threshold_tps:.2f}); also predicted at depth "
        f"{request.conversation_depth}, not gated",
        f"model    {describe_calibration(result.calibration)}",
    ]
    if device.measured:
        lines.append(f"measured {_measured_line(device.measured)}")
    if result.choice:
        flag = "" if result.choice.meets_target else "  [BELOW TARGET]"
        lines += [f"choice   {result.choice.variant.id}{flag}",
                  f"budget   {_budget_line(result, result.choice)}"]
    else:
        lines.append("choice   none: no variant in the catalog fits this device")
    deeper = f"@{request.conversation_depth}"
    lines += ["", f"{'variant':<36} {'quant':<14} {'file':>8} {'memory':>8} {'tok/s':>6} "
                  f"{deeper:>6}  {'quality':>9}  verdict"]
    for candidate in result.candidates:
        variant = candidate.variant
        lines.append(f"{variant.id:<36} {variant.quantization.split()[0]:<14} "
                     f"{human_bytes(variant.file_bytes):>8} "
                     f"{human_bytes(candidate.memory_bytes):>8} "
                     f"{candidate.predicted_tps:>6.1f} {candidate.conversation_tps:>6.1f}  "
                     f"{_quality(variant):>9}  "
                     f"{candidate.verdict}")
    if result.candidates:
        lines += ["", f"quality  {result.candidates[0].variant.family.benchmark} (the maker's "
                      "figure) × the quantizer's measured retention; ≤… est = the unquantized "
                      "model's score, this file's loss unpublished; - = none published, ranked "
                      "last"]
    return "\n".join(lines)


def _measured_line(measured: DeviceMeasurement) -> str:
    """Predicted against measured on this device; the predictions above now start from it."""
    error = measured.predicted_before_tps / measured.tokens_per_second - 1
    deeper = (f" ({measured.conversation[1]:.2f} at depth {measured.conversation[0]})"
              if measured.conversation else "")
    return (f"{measured.variant_id} ran {measured.tokens_per_second:.2f} tok/s at depth "
            f"{measured.depth}{deeper} in this device's verification {measured.measured_at}; "
            f"predicted {measured.predicted_before_tps:.2f} ({error:+.1%}) from "
            f"{measured.predicted_before_source}; the predictions here start from the measurement")


def plan_as_dict(result: Plan) -> dict[str, Any]:
    device = result.device
    return {
        "device": {"name": device.name, "memory_bytes": device.memory_bytes,
                   "bandwidth_bytes_per_second": device.bandwidth_bytes_per_s,
                   "bandwidth_source": device.bandwidth_source,
                   "free_storage_bytes": device.free_storage_bytes,
                   "measured": asdict(device.measured) if device.measured else None},
        "request": {"context": result.request.context, "depth": result.request.depth,
                    "conversation_depth": result.request.conversation_depth,
                    "kv_type": result.request.kv_type, "target_tps": result.request.target_tps,
                    "threshold_tps": result.request.threshold_tps},
        "calibration": {"efficiency": result.calibration.efficiency,
                        "kv_penalty": result.calibration.kv_penalty,
                        "error": result.calibration.error_summary()},
        "choice": result.choice.variant.id if result.choice else None,
        "meets_target": bool(result.choice and result.choice.meets_target),
        "budget": result.budget(result.choice.variant).as_dict() if result.choice else None,
        "candidates": [candidate.as_dict() for candidate in result.candidates],
    }


# How the plot draws a variant, by what the plan made of it (legend order).
_STATUS_COLOURS = {"chosen": "tab:green", "fits, meets the target, lower quality": "tab:blue",
                   "fits, too slow": "tab:orange", "does not fit": "silver"}
_STATUS_HATCHES = {"fits, too slow": "//"}  # told apart without colour too


# A bar's value beside it, readable where the budget or target line crosses it.
_VALUE = {"va": "center", "fontsize": 7, "bbox": {"facecolor": "white", "edgecolor": "none",
                                                  "pad": 0.5}}


def _status(candidate: Candidate, result: Plan) -> str:
    if candidate is result.choice:
        return "chosen"
    if not candidate.fits:
        return "does not fit"
    return "fits, meets the target, lower quality" if candidate.meets_target else "fits, too slow"


def draw(result: Plan, path: Path) -> Any:
    """One row per variant, best quality at the top: its quality, the memory it needs against the
    budget, its predicted speed against the target. The choice is the first row that fits and is
    fast enough, so the picture shows why it is the choice. Returns the (closed) figure."""
    try:
        import matplotlib
    except ImportError:
        raise ApplianceError("--plot needs matplotlib: pip install 'pi-llm-appliance[plot]'",
                             ExitCode.UNREACHABLE) from None
    matplotlib.use("Agg")
    from matplotlib import pyplot
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    device, request, choice, rows = result.device, result.request, result.choice, result.candidates
    depth = min(request.depth, request.context)
    # The bars are weights + KV cache, so the line is the budget before the KV cache: the same
    # number as each row's weights budget in the table plus that row's KV cache.
    room = budget_for(device.memory_bytes, 0)
    statuses = [_status(candidate, result) for candidate in rows]
    colours = [_STATUS_COLOURS[status] for status in statuses]
    figure, (quality_axes, memory_axes, speed_axes) = pyplot.subplots(
        1, 3, sharey=True, figsize=(15, 2.2 + 0.36 * len(rows)), layout="constrained",
        gridspec_kw={"width_ratios": (1, 1.4, 1.4)})
    quality_axes.invert_yaxis()  # shared: best quality at the top

    benchmark = rows[0].variant.family.benchmark if rows else ""
    for row, (candidate, colour) in enumerate(zip(rows, colours, strict=True)):
        score = candidate.variant.quality_score
        if score is None:
            quality_axes.text(1, row, "none published", va="center", fontsize=7, color="dimgrey",
                              style="italic")
            continue
        measured = candidate.variant.quality_percent is not None
        quality_axes.barh(row, score, color=colour, alpha=1 if measured else 0.35,
                          edgecolor=colour)
        quality_axes.text(score + 1, row, _quality(candidate.variant), va="center", fontsize=7)
    quality_axes.set_xlim(0, 100)
    quality_axes.set_xlabel(f"{benchmark}, the maker's figure × measured retention")
    quality_axes.set_title("quality (faint: unquantized score, loss unpublished)", fontsize=9)
    quality_axes.set_yticks(range(len(rows)), [candidate.variant.id for candidate in rows],
                            fontsize=8)

    weights = [candidate.variant.file_bytes / 1e9 for candidate in rows]
    kv = [result.budget(candidate.variant).kv_cache_bytes / 1e9 for candidate in rows]
    memory = [w + k for w, k in zip(weights, kv, strict=True)]
    low, high = min(weights) / 2, max(max(memory), room.weights_bytes / 1e9) * 3
    memory_axes.barh(range(len(rows)), [w - low for w in weights], left=low, color=colours)
    memory_axes.barh(range(len(rows)), kv, left=weights, color=colours, alpha=0.4)
    for row, needed in enumerate(memory):
        memory_axes.text(needed * 1.08, row, f"{needed:.2f}", **_VALUE)
    budget_label = f"memory budget {human_bytes(room.weights_bytes)} = RAM − OS − runtime − margin"
    if choice:
        chosen = result.budget(choice.variant)
        budget_label += (f" (the choice: {human_bytes(chosen.weights_bytes)} for the weights + "
                         f"{human_bytes(chosen.kv_cache_bytes)} KV cache)")
    budget_line = memory_axes.axvline(room.weights_bytes / 1e9, color="tab:red", linestyle="--",
                                      gid="budget", label=budget_label)
    memory_axes.axvspan(room.weights_bytes / 1e9, high, color="tab:red", alpha=0.06)
    memory_axes.set_xlim(low, high)
    memory_axes.set_xlabel(f"GB: weights + KV cache (faint) at {request.context} tokens")
    memory_axes.set_title(f"memory: fits left of the budget, {human_bytes(room.weights_bytes)}",
                          fontsize=9)

    speeds = [candidate.predicted_tps for candidate in rows]
    low = min(1.0, min(speeds) / 2)
    bars = speed_axes.barh(range(len(rows)), [speed - low for speed in speeds], left=low,
                           color=colours)
    for bar, status in zip(bars, statuses, strict=True):
        bar.set_hatch(_STATUS_HATCHES.get(status, ""))
    for row, speed in enumerate(speeds):
        speed_axes.text(speed * 1.08, row, f"{speed:.1f}", **_VALUE)
    target_line = speed_axes.axvline(
        request.threshold_tps, color="black", linestyle=":", gid="target",
        label=f"target {request.target_tps:g} tok/s (pass ≥ {request.threshold_tps:.2f})")
    speed_axes.axvspan(low, request.threshold_tps, color="tab:orange", alpha=0.06)
    speed_axes.set_xlim(low, max(speeds) * 3)
    speed_axes.set_xlabel(f"predicted decode tok/s at depth {depth}")
    speed_axes.set_title(f"speed: fast enough right of {request.threshold_tps:.2f} tok/s",
                         fontsize=9)

    for axes in (memory_axes, speed_axes):
        axes.set_xscale("log")
        # Plain 1-2-5 ticks: matplotlib writes 10ⁿ and n×10ᵐ on log axes otherwise.
        axes.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        axes.xaxis.set_minor_formatter(NullFormatter())
    for axes in (quality_axes, memory_axes, speed_axes):
        axes.grid(True, axis="x", alpha=0.3)
        axes.tick_params(axis="y", length=0)
        if choice:
            axes.axhspan(rows.index(choice) - 0.5, rows.index(choice) + 0.5, color="tab:green",
                         alpha=0.08, zorder=0)
    if choice:
        quality_axes.get_yticklabels()[rows.index(choice)].set_fontweight("bold")

    if choice is None:
        verdict = "nothing in the catalog fits"
    elif choice.meets_target:
        verdict = (f"{choice.variant.id}, the best quality that fits and reaches "
                   f"{request.target_tps:g} tok/s")
    else:
        verdict = f"{choice.variant.id}, BELOW TARGET: the fastest that fits"
    figure.suptitle(f"{device.name}: {verdict}", fontsize=12, fontweight="bold")
    figure.legend(handles=[Patch(color=colour, label=status, hatch=_STATUS_HATCHES.get(status))
                           for status, colour in _STATUS_COLOURS.items()]
                  + [budget_line, target_line], loc="outside lower center", ncol=3, fontsize=8,
                  frameon=False, title_fontsize=8, title=(
                      f"{human_bytes(device.memory_bytes)} RAM, "
                      f"{device.bandwidth_bytes_per_s / 1e9:.1f} GB/s; context {request.context} "
                      f"tokens ({request.kv_type} KV cache), speed at depth {depth}. Rows in "
                      "quality order: the choice is the first that fits and is fast enough."))
    figure.savefig(path, dpi=120)
    pyplot.close(figure)
    return figure


def calibration_as_dict(calibration: Calibration) -> dict[str, Any]:
    return {"efficiency": calibration.efficiency, "kv_penalty": calibration.kv_penalty,
            "error": calibration.error_summary(),
            "points": [point.__dict__ | {"error": point.error,
                                         "held_out_error": point.held_out_error}
                       for point in calibration.points]}
