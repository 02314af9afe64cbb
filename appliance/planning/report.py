"""A plan as people and programs read it: the table with every variant's verdict, its JSON, the
calibration's fit, and the plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from appliance.exitcodes import ApplianceError, ExitCode
from appliance.planning.planner import Calibration, Candidate, Plan, budget_for
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


def format_plan(result: Plan) -> str:
    device, request = result.device, result.request
    lines = [
        f"device   {device.name}: {human_bytes(device.memory_bytes)} RAM, "
        f"{device.bandwidth_bytes_per_s / 1e9:.1f} GB/s ({device.bandwidth_source})"
        + (f", {human_bytes(device.free_storage_bytes)} free for models"
           if device.free_storage_bytes is not None else ""),
        f"request  context {request.context} tokens ({request.kv_type} KV cache); speed at "
        f"depth {min(request.depth, request.context)}; target {request.target_tps:g} tok/s "
        f"(pass at ≥ {request.threshold_tps:.2f})",
        f"model    {describe_calibration(result.calibration)}",
    ]
    if result.choice:
        flag = "" if result.choice.meets_target else "  [BELOW TARGET]"
        lines += [f"choice   {result.choice.variant.id}{flag}",
                  f"budget   {_budget_line(result, result.choice)}"]
    else:
        lines.append("choice   none: no variant in the catalog fits this device")
    lines += ["", f"{'variant':<36} {'quant':<14} {'file':>8} {'memory':>8} {'tok/s':>6} "
                  f"{'quality':>7}  verdict"]
    for candidate in result.candidates:
        variant = candidate.variant
        quality = f"{variant.quality_percent:.1f}%" if variant.quality_percent else "-"
        lines.append(f"{variant.id:<36} {variant.quantization.split()[0]:<14} "
                     f"{human_bytes(variant.file_bytes):>8} "
                     f"{human_bytes(candidate.memory_bytes):>8} "
                     f"{candidate.predicted_tps:>6.1f} {quality:>7}  {candidate.verdict}")
    return "\n".join(lines)


def plan_as_dict(result: Plan) -> dict[str, Any]:
    device = result.device
    return {
        "device": {"name": device.name, "memory_bytes": device.memory_bytes,
                   "bandwidth_bytes_per_second": device.bandwidth_bytes_per_s,
                   "bandwidth_source": device.bandwidth_source,
                   "free_storage_bytes": device.free_storage_bytes},
        "request": {"context": result.request.context, "depth": result.request.depth,
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


def draw(result: Plan, path: Path) -> None:
    """Predicted speed against model size, what fits and what does not, the target and budget."""
    try:
        import matplotlib
    except ImportError:
        raise ApplianceError("--plot needs matplotlib: pip install 'pi-llm-appliance[plot]'",
                             ExitCode.UNREACHABLE) from None
    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(9, 5.5))
    for candidate in result.candidates:
        colour = ("tab:green" if candidate is result.choice else
                  "tab:blue" if candidate.fits else "lightgrey")
        x = candidate.memory_bytes / 1e9
        axes.scatter(x, candidate.predicted_tps, s=20 + 12 * candidate.variant.family.total_params
                     / 1e9, color=colour, edgecolors="black", linewidths=0.5, zorder=3)
        axes.annotate(candidate.variant.id, (x, candidate.predicted_tps), fontsize=7,
                      xytext=(4, 3), textcoords="offset points")
    # Without the KV cache, which the candidates' memory already includes.
    room = budget_for(result.device.memory_bytes, 0).weights_bytes / 1e9
    axes.axvline(room, color="tab:red", linestyle="--", label=f"memory budget {room:.1f} GB")
    axes.axhline(result.request.threshold_tps, color="tab:orange", linestyle=":",
                 label=f"target {result.request.target_tps:g} tok/s "
                       f"(pass ≥ {result.request.threshold_tps:.2f})")
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("memory needed: weights + KV cache at the planned context (GB)")
    axes.set_ylabel(f"predicted decode tok/s at depth {result.request.depth}")
    axes.set_title(f"{result.device.name}: green = chosen, blue = fits, grey = does not fit; "
                   "marker size = parameters", fontsize=9)
    axes.legend(fontsize=8)
    axes.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)


def calibration_as_dict(calibration: Calibration) -> dict[str, Any]:
    return {"efficiency": calibration.efficiency, "kv_penalty": calibration.kv_penalty,
            "error": calibration.error_summary(),
            "points": [point.__dict__ | {"error": point.error,
                                         "held_out_error": point.held_out_error}
                       for point in calibration.points]}
