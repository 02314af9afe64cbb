"""Fit-first planning: among the catalog's variants that fit this device's memory, the one with the
best quality whose predicted decode speed meets the target.

Memory is a budget to meet: RAM − OS reserve − KV cache at the planned context − runtime overhead
− safety margin is what the weights may take. Speed comes from a bandwidth model: a decoded token
reads its weights once and the KV cache filled so far, so

    seconds per token = weight_bytes / (efficiency × bandwidth) + kv_penalty × kv_bytes / bandwidth

with one efficiency for dense models, one for mixtures of experts (scattered expert reads), and a
KV penalty shared by both (attention over a long context costs more than streaming its bytes).
The three numbers are fitted by least squares to the published measurements in the catalog, and
the fit reports its own error on them (docs/planner.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from appliance.exitcodes import ApplianceError, ExitCode
from appliance.hardware.bandwidth import load_bandwidth
from appliance.hardware.profiles import Profile, load_profiles, match
from appliance.models.catalog import Variant, load_catalog
from appliance.settings import Settings
from appliance.util import human_bytes

# What the board needs besides the model (Raspberry Pi OS Lite idles at ~0.3 GB; the service's
# Python process, the journal and ssh add the rest), llama.cpp's compute buffers and the service.
OS_RESERVE_BYTES = 800_000_000
RUNTIME_OVERHEAD_BYTES = 350_000_000
SAFETY_MARGIN_FRACTION = 0.05


@dataclass(frozen=True)
class DeviceMeasurement:
    """What this device's last verification measured, and what the plan predicted for it before
    it learned from that measurement."""

    variant_id: str
    tokens_per_second: float
    depth: int
    measured_at: str
    predicted_before_tps: float
    predicted_before_source: str
    conversation: tuple[int, float] | None = None  # (depth, tok/s): reported, not gated


@dataclass(frozen=True)
class Device:
    name: str
    memory_bytes: int
    bandwidth_bytes_per_s: float
    bandwidth_source: str
    free_storage_bytes: int | None = None
    measured: DeviceMeasurement | None = None


@dataclass(frozen=True)
class Budget:
    ram_bytes: int
    os_reserve_bytes: int
    kv_cache_bytes: int
    runtime_overhead_bytes: int
    safety_margin_bytes: int

    @property
    def weights_bytes(self) -> int:
        return (self.ram_bytes - self.os_reserve_bytes - self.kv_cache_bytes
                - self.runtime_overhead_bytes - self.safety_margin_bytes)

    def as_dict(self) -> dict[str, int]:
        return {"ram_bytes": self.ram_bytes, "os_reserve_bytes": self.os_reserve_bytes,
                "kv_cache_bytes": self.kv_cache_bytes,
                "runtime_overhead_bytes": self.runtime_overhead_bytes,
                "safety_margin_bytes": self.safety_margin_bytes,
                "weights_bytes": self.weights_bytes}


def budget_for(memory_bytes: int, kv_cache_bytes: int) -> Budget:
    return Budget(ram_bytes=memory_bytes, os_reserve_bytes=OS_RESERVE_BYTES,
                  kv_cache_bytes=kv_cache_bytes, runtime_overhead_bytes=RUNTIME_OVERHEAD_BYTES,
                  safety_margin_bytes=round(memory_bytes * SAFETY_MARGIN_FRACTION))


# The bandwidth model ---------------------------------------------------------------------------
@dataclass(frozen=True)
class CalibrationPoint:
    variant: str
    kind: str
    device: str
    depth: int
    kv_type: str
    measured_tps: float
    predicted_tps: float
    # Predicted by a fit made without this point: how the model does on data it has not seen.
    held_out_tps: float | None
    source: str

    @property
    def error(self) -> float:
        return self.predicted_tps / self.measured_tps - 1

    @property
    def held_out_error(self) -> float | None:
        return None if self.held_out_tps is None else self.held_out_tps / self.measured_tps - 1


@dataclass(frozen=True)
class Calibration:
    efficiency: dict[str, float]  # by family kind: "dense", "moe"
    kv_penalty: float
    points: tuple[CalibrationPoint, ...] = ()

    def seconds_per_token(self, variant: Variant, bandwidth: float, depth: int,
                          kv_type: str) -> float:
        weights = variant.weight_bytes_per_token / self.efficiency[variant.family.kind]
        kv = self.kv_penalty * variant.family.kv_bytes_per_token(kv_type) * depth
        return (weights + kv) / bandwidth

    def predict(self, variant: Variant, bandwidth: float, depth: int, kv_type: str) -> float:
        return 1 / self.seconds_per_token(variant, bandwidth, depth, kv_type)

    def error_summary(self) -> dict[str, dict[str, float]]:
        """Mean and worst absolute relative error per kind and overall, in the fit and held out."""
        summary = {}
        for group in ("dense", "moe", "all"):
            points = [p for p in self.points if group in (p.kind, "all")]
            if not points:
                continue
            fitted = [abs(p.error) for p in points]
            held_out = [abs(p.held_out_error) for p in points if p.held_out_error is not None]
            summary[group] = {"points": len(points),
                              "mean_abs_error": sum(fitted) / len(fitted),
                              "max_abs_error": max(fitted)}
            if held_out:
                summary[group] |= {"held_out_mean_abs_error": sum(held_out) / len(held_out),
                                   "held_out_max_abs_error": max(held_out)}
        return summary


KINDS = ("dense", "moe")


def _fit(rows: list[list[float]], targets: list[float]) -> Calibration | None:
    """Least squares, weighted so that every point counts by its relative error."""
    import numpy as np  # a dependency of llama-cpp-python

    matrix, goal = np.array(rows), np.array(targets)
    used = matrix.any(axis=0)
    if matrix.shape[0] < used.sum():
        return None
    solution = np.zeros(matrix.shape[1])
    solution[used], *_ = np.linalg.lstsq(matrix[:, used] / goal[:, None], np.ones(len(goal)),
                                         rcond=None)
    if (solution[:len(KINDS)][used[:len(KINDS)]] <= 0).any():
        return None
    efficiency = {kind: float(1 / solution[i]) if used[i] else math.nan
                  for i, kind in enumerate(KINDS)}
    return Calibration(efficiency=efficiency, kv_penalty=float(solution[-1]))


def calibrate(catalog: dict[str, Variant], profiles: dict[str, Profile]) -> Calibration:
    """Fit the bandwidth model to the catalog's published measurements. bandwidth / tps is
    linear in the unknowns 1/efficiency(kind) and kv_penalty: plain least squares, no search.
    Each point is also predicted by a fit that left it out, which is the error to expect on a
    model the catalog has no measurement for."""
    rows, targets, evidence = [], [], []
    for variant in catalog.values():
        for measured in variant.measurements:
            bandwidth = profiles[measured.device].expected_bandwidth_bytes_per_s
            if bandwidth is None:
                continue
            row = [0.0] * len(KINDS) + [
                variant.family.kv_bytes_per_token(measured.kv_type) * measured.depth]
            row[KINDS.index(variant.family.kind)] = variant.weight_bytes_per_token
            rows.append(row)
            targets.append(bandwidth / measured.tokens_per_second)
            evidence.append((variant, measured, bandwidth))
    fitted = _fit(rows, targets) if rows else None
    if fitted is None:
        raise ApplianceError("the catalog's measurements cannot calibrate the planner "
                             "(too few, or contradictory)", ExitCode.INTERNAL)
    points = []
    for index, (variant, measured, bandwidth) in enumerate(evidence):
        without = _fit(rows[:index] + rows[index + 1:], targets[:index] + targets[index + 1:])
        held_out = None
        if without is not None and not math.isnan(without.efficiency[variant.family.kind]):
            held_out = without.predict(variant, bandwidth, measured.depth, measured.kv_type)
        points.append(CalibrationPoint(
            variant=variant.id, kind=variant.family.kind, device=measured.device,
            depth=measured.depth, kv_type=measured.kv_type,
            measured_tps=measured.tokens_per_second,
            predicted_tps=fitted.predict(variant, bandwidth, measured.depth, measured.kv_type),
            held_out_tps=held_out, source=measured.source))
    return Calibration(fitted.efficiency, fitted.kv_penalty, tuple(points))


# The plan --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlanRequest:
    context: int = 4096
    depth: int = 0  # the gated speed, as verification measures it
    conversation_depth: int = 1024  # predicted and shown, not gated
    kv_type: str = "f16"
    target_tps: float = 8.0
    tolerance: float = 0.05

    @property
    def threshold_tps(self) -> float:
        return self.target_tps * (1 - self.tolerance)


def plan_request(settings: Settings) -> PlanRequest:
    """What the appliance's configuration asks of a model: the context it serves, the KV cache
    type, and the speed its verification gates on and reports."""
    verify = settings.verify
    return PlanRequest(context=settings.model.context, depth=verify.depth,
                       conversation_depth=verify.conversation_depth,
                       kv_type=settings.model.kv_cache_type, target_tps=verify.target_tps,
                       tolerance=verify.tolerance)


@dataclass
class Candidate:
    variant: Variant
    memory_bytes: int
    predicted_tps: float
    conversation_tps: float
    fits_memory: bool
    fits_storage: bool
    meets_target: bool
    verdict: str = ""

    @property
    def fits(self) -> bool:
        return self.fits_memory and self.fits_storage

    def as_dict(self) -> dict[str, Any]:
        variant = self.variant
        return {"id": variant.id, "family": variant.family.name, "kind": variant.family.kind,
                "quantization": variant.quantization, "bits_per_weight": variant.bits_per_weight,
                "file_bytes": variant.file_bytes, "sha256": variant.sha256,
                "quality_percent": variant.quality_percent,
                "memory_bytes": self.memory_bytes,
                "predicted_tokens_per_second": round(self.predicted_tps, 2),
                "predicted_conversation_tokens_per_second": round(self.conversation_tps, 2),
                "fits_memory": self.fits_memory, "fits_storage": self.fits_storage,
                "meets_target": self.meets_target, "verdict": self.verdict}


@dataclass
class Plan:
    device: Device
    request: PlanRequest
    calibration: Calibration
    candidates: list[Candidate] = field(default_factory=list)
    choice: Candidate | None = None

    def budget(self, variant: Variant) -> Budget:
        kv = variant.family.kv_bytes_per_token(self.request.kv_type) * self.request.context
        return budget_for(self.device.memory_bytes, round(kv))


def quality_rank(variant: Variant) -> tuple[bool, float, float, float]:
    """Best first by `Variant.quality_score`: the family's published benchmark score × the
    quantizer's measured retention, or the unquantized score where the retention is unpublished
    (an upper bound, the same for a whole family, so more bits per weight then decides: closer to
    the unquantized model). A family without a published score ranks below every family with one,
    by parameters: nothing says it is better."""
    score = variant.quality_score
    return (score is not None, score or 0.0, variant.family.total_params,
            variant.bits_per_weight)


def plan(device: Device, request: PlanRequest, catalog: dict[str, Variant] | None = None,
         calibration: Calibration | None = None) -> Plan:
    catalog = catalog if catalog is not None else load_catalog()
    calibration = calibration or calibrate(catalog, load_profiles())
    result = Plan(device, request, calibration)
    for variant in catalog.values():
        budget = result.budget(variant)
        predicted, conversation = (
            calibration.predict(variant, device.bandwidth_bytes_per_s, min(depth, request.context),
                                request.kv_type)
            for depth in (request.depth, request.conversation_depth))
        result.candidates.append(Candidate(
            variant=variant, memory_bytes=variant.file_bytes + budget.kv_cache_bytes,
            predicted_tps=predicted, conversation_tps=conversation,
            fits_memory=variant.file_bytes <= budget.weights_bytes,
            fits_storage=device.free_storage_bytes is None
            or variant.file_bytes <= device.free_storage_bytes,
            meets_target=predicted >= request.threshold_tps))
    fitting = [c for c in result.candidates if c.fits]
    meeting = [c for c in fitting if c.meets_target]
    if meeting:
        result.choice = max(meeting, key=lambda c: quality_rank(c.variant))
    elif fitting:
        result.choice = max(fitting, key=lambda c: c.predicted_tps)
    for candidate in result.candidates:
        candidate.verdict = _explain(candidate, result)
    result.candidates.sort(key=lambda c: quality_rank(c.variant), reverse=True)
    return result


def _explain(candidate: Candidate, result: Plan) -> str:
    request, choice = result.request, result.choice
    speed = f"predicted {candidate.predicted_tps:.1f} tok/s"
    if candidate is choice:
        if candidate.meets_target:
            return (f"chosen: best quality that fits; {speed} ≥ {request.threshold_tps:.2f}, "
                    f"{candidate.conversation_tps:.1f} at depth {request.conversation_depth}")
        return (f"chosen, BELOW TARGET: nothing that fits reaches {request.threshold_tps:.2f} "
                f"tok/s; this is the fastest that fits ({speed})")
    if not candidate.fits_memory:
        budget = result.budget(candidate.variant)
        return (f"needs {human_bytes(candidate.variant.file_bytes)}, "
                f"budget {human_bytes(budget.weights_bytes)}")
    if not candidate.fits_storage:
        return (f"needs {human_bytes(candidate.variant.file_bytes)} on the model disk, "
                f"{human_bytes(result.device.free_storage_bytes or 0)} free")
    if not candidate.meets_target:
        return f"{speed} < {request.threshold_tps:.2f} (target {request.target_tps:g})"
    return f"fits, {speed}, but lower quality than {choice.variant.id if choice else '?'}"


# The device the plan is for ---------------------------------------------------------------------
def bandwidth_reproducing(calibration: Calibration, variant: Variant, measured_tps: float,
                          depth: int, kv_type: str) -> float:
    """The effective bandwidth at which the model predicts exactly what was measured."""
    return measured_tps * calibration.seconds_per_token(variant, 1.0, depth, kv_type)


def learn_from_verification(device: Device, verification: dict[str, Any] | None,
                            catalog: dict[str, Variant], calibration: Calibration,
                            kv_type: str) -> Device:
    """The device as its own verification measured it: the effective bandwidth that makes the
    model reproduce the measured speed of the model it runs, so that every prediction for this
    device rests on what it did rather than on its profile. Unchanged without a usable
    measurement (none, an error, invalid conditions, or a model outside the catalog)."""
    if not verification or verification.get("measured_tps") is None:
        return device
    if not verification.get("report", {}).get("conditions", {}).get("valid", True):
        return device
    facts = verification.get("model") or {}
    variant = catalog.get(str(facts.get("id"))) or next(
        (v for v in catalog.values() if v.sha256 and v.sha256 == facts.get("sha256")), None)
    if variant is None:
        return device
    measured, depth = float(verification["measured_tps"]), int(verification.get("depth", 0))
    conversation = verification.get("conversation")
    learned = DeviceMeasurement(
        variant_id=variant.id, tokens_per_second=measured, depth=depth,
        measured_at=str(verification.get("timestamp", "")),
        predicted_before_tps=calibration.predict(variant, device.bandwidth_bytes_per_s, depth,
                                                 kv_type),
        predicted_before_source=device.bandwidth_source,
        conversation=(int(conversation["depth"]), float(conversation["measured_tps"]))
        if conversation else None)
    bandwidth = bandwidth_reproducing(calibration, variant, measured, depth, kv_type)
    return replace(device, bandwidth_bytes_per_s=bandwidth, measured=learned,
                   bandwidth_source=f"learned from this device's verification of {variant.id}: "
                                    f"{measured:.2f} tok/s at depth {depth}")


def device_from_profile(profile: Profile, bandwidth_bytes_per_s: float | None = None) -> Device:
    if profile.memory_bytes is None:
        raise ApplianceError(f"profile {profile.key} has no memory size; use --device detect",
                             ExitCode.USAGE)
    bandwidth, source = _bandwidth(profile, bandwidth_bytes_per_s, None)
    return Device(profile.key, profile.memory_bytes, bandwidth, source)


def device_from_detection(report: dict[str, Any], state_dir: Path,
                          bandwidth_bytes_per_s: float | None = None) -> Device:
    profile = match(report)
    limits = [report["board"].get("memory_bytes"), report["memory"].get("cgroup_limit_bytes")]
    known = [value for value in limits if value] or [report["memory"]["usable_bytes"]]
    bandwidth, source = _bandwidth(profile, bandwidth_bytes_per_s, load_bandwidth(state_dir))
    models = report["storage"]["directories"].get("models", {})
    return Device(f"{report['board'].get('model') or profile.key} (detected, profile "
                  f"{profile.key})", min(known), bandwidth, source, models.get("free_bytes"))


def _bandwidth(profile: Profile, given: float | None,
               measured: dict[str, Any] | None) -> tuple[float, str]:
    if given:
        return given, "given on the command line"
    if measured:
        return (measured["read_bytes_per_second"],
                f"measured on this device {measured.get('measured_at', '')}".strip())
    if profile.expected_bandwidth_bytes_per_s:
        return (profile.expected_bandwidth_bytes_per_s,
                f"profile {profile.key}: {profile.source}")
    raise ApplianceError(
        f"profile {profile.key} has no expected memory bandwidth: measure it on the device with "
        "`pi-appliance bench --bandwidth`, or pass --bandwidth GB/s", ExitCode.USAGE)


def faster_alternatives(current: Variant, result: Plan) -> list[Candidate]:
    """Variants that fit and are predicted faster than `current`, best quality first: where the
    fallback after a failed verification goes next."""
    current_tps = result.calibration.predict(current, result.device.bandwidth_bytes_per_s,
                                             min(result.request.depth, result.request.context),
                                             result.request.kv_type)
    faster = [c for c in result.candidates
              if c.fits and c.variant.id != current.id and c.predicted_tps > current_tps]
    return sorted(faster, key=lambda c: quality_rank(c.variant), reverse=True)
