"""`pi-appliance plan`: the budget, the bandwidth model against published figures, the choice for
each board, and an explanation for every variant not chosen."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.cli import main
from appliance.hardware.bandwidth import save_bandwidth
from appliance.hardware.profiles import load_profiles
from appliance.models.catalog import load_catalog
from appliance.planning.planner import (
    OS_RESERVE_BYTES,
    RUNTIME_OVERHEAD_BYTES,
    PlanRequest,
    budget_for,
    calibrate,
    device_from_profile,
    plan,
    quality_rank,
)
from appliance.planning.report import draw
from appliance.util import human_bytes
from tests.helpers import GIB, write_config

QWEN_30B = "qwen3-30b-a3b-2507-q3_k_s-2.70bpw"
QWEN_06B = "qwen3-0.6b-q8_0"
LLAMA_1B = "llama-3.2-1b-instruct-q4_k_m"


@pytest.fixture(scope="module")
def catalog():
    return load_catalog()


@pytest.fixture(scope="module")
def calibration(catalog):
    return calibrate(catalog, load_profiles())


def plan_for(profile: str, calibration, **request):
    device = device_from_profile(load_profiles()[profile])
    return plan(device, PlanRequest(**request), calibration=calibration)


def verdicts(result) -> dict[str, str]:
    return {candidate.variant.id: candidate.verdict for candidate in result.candidates}


def run(capsys, *args: str) -> tuple[int, str]:
    code = main(["plan", *args])
    return code, capsys.readouterr().out


def test_the_catalog_has_the_required_variants_with_their_checksums(catalog):
    assert catalog[QWEN_30B].family.kind == "moe" and catalog[QWEN_30B].quality_percent == 94.18
    assert catalog[QWEN_30B].file_bytes == pytest.approx(9.58 * GIB, rel=1e-3)
    families = {variant.family.name for variant in catalog.values()}
    assert {"Qwen3-4B-Instruct-2507", "Qwen3-0.6B", "Qwen3-1.7B", "Llama-3.2-1B-Instruct",
            "Llama-3.2-3B-Instruct"} <= families
    assert catalog["smollm2-135m-instruct-q4_1"].sha256.startswith("b179c952")
    assert catalog["gemma-3-270m-q4_k_m"].sha256.startswith("a5fd3b62")
    for variant in catalog.values():
        assert variant.urls or variant.python_source, f"{variant.id} has no source"
        assert variant.family.license


def test_every_variant_has_a_quality_figure_with_its_source_or_says_why_not(catalog):
    # One benchmark for every family, or the scores would not compare.
    assert {variant.family.benchmark for variant in catalog.values()} == {"MMLU"}
    for variant in catalog.values():
        family = variant.family
        assert family.benchmark_source, f"{family.key}: no source for its score, or its absence"
        assert variant.quality_source, f"{variant.id}: no source for its retention, or its absence"
        assert variant.quality_percent is None or 0 < variant.quality_percent <= 100
    # ByteShape's measured 94.18 % of BF16 on Qwen's published 81.38.
    assert catalog[QWEN_30B].quality_score == pytest.approx(81.38 * 0.9418)
    # Unmeasured: the unquantized model's score, an upper bound; unpublished: none.
    assert catalog[LLAMA_1B].quality_score == 49.3
    assert catalog["gemma-3-270m-q4_k_m"].quality_score is None


def test_quality_ranks_by_published_scores_then_bits_and_unscored_models_last(catalog):
    ranked = sorted(catalog.values(), key=quality_rank, reverse=True)
    # The 30B at 2.70 bits keeps 76.6 of its 81.4: still above the 4B's unquantized 73.0.
    assert [variant.id for variant in ranked][:4] == [
        "qwen3-30b-a3b-2507-iq4_xs-3.63bpw", "qwen3-30b-a3b-2507-q3_k_s-3.25bpw", QWEN_30B,
        "qwen3-4b-2507-q4_k_s-3.87bpw"]
    # Qwen3-0.6B's MMLU (52.81) is above Llama 3.2 1B's (49.3), whatever their sizes.
    assert ranked.index(catalog[QWEN_06B]) < ranked.index(catalog[LLAMA_1B])
    assert [variant.id for variant in ranked][-2:] == ["gemma-3-270m-q4_k_m",
                                                       "smollm2-135m-instruct-q4_1"]
    # Within a family more bits rank higher: what a missing retention is estimated by.
    for family in {variant.family.key for variant in ranked}:
        bits = [variant.bits_per_weight for variant in ranked if variant.family.key == family]
        assert bits == sorted(bits, reverse=True), family


def test_the_table_shows_each_quality_figure_and_marks_the_estimates(capsys):
    _, out = run(capsys, "--device", "raspberry-pi-5-16gb", "--depth", "0")
    rows = {line.split()[0]: line for line in out.splitlines() if line[:1].isalpha()}
    assert " 76.6  chosen" in rows[QWEN_30B]
    assert " ≤52.8 est  fits" in rows[QWEN_06B]
    assert "  -  fits" in rows["gemma-3-270m-q4_k_m"]
    assert "quality  MMLU (the maker's figure) × the quantizer's measured retention" in out


def test_kv_cache_and_weights_read_per_token_follow_the_architecture(catalog):
    qwen = catalog[QWEN_30B]
    assert qwen.family.kv_bytes_per_token("f16") == 96 * 1024  # llm-on-pi5.md: 96 KiB/token
    assert qwen.family.kv_bytes_per_token("q8_0") == 48 * 1024 * 34 / 32
    # A token of the mixture of experts reads ~10 % of the file; of a dense model, all of it.
    assert qwen.weight_bytes_per_token == pytest.approx(1.01e9, rel=0.01)
    llama = catalog[LLAMA_1B]
    assert llama.weight_bytes_per_token == llama.file_bytes


def test_the_budget_is_ram_minus_reserve_kv_runtime_and_margin():
    budget = budget_for(16 * GIB, kv_cache_bytes=402_653_184)
    assert budget.weights_bytes == (16 * GIB - OS_RESERVE_BYTES - 402_653_184
                                    - RUNTIME_OVERHEAD_BYTES - round(16 * GIB * 0.05))


def test_the_bandwidth_model_reproduces_the_published_measurements(calibration):
    errors = calibration.error_summary()
    assert errors["all"]["points"] >= 10 and {"dense", "moe"} <= set(errors)
    # The figures docs/planner.md states: a fit within 10 % of every published point, and
    # within 10 % when each point is left out of the fit.
    assert errors["all"]["max_abs_error"] < 0.10
    assert errors["all"]["held_out_max_abs_error"] < 0.10
    assert 0.4 < calibration.efficiency["moe"] < calibration.efficiency["dense"] < 1
    # A fuller context is slower: the fit sees the 30B fall from 8.5 to 2.6 tok/s.
    deep = [point for point in calibration.points if point.depth > 20_000]
    assert deep and all(point.predicted_tps < 3 for point in deep)


def test_a_pi5_16gb_fits_the_30b_which_reaches_8_only_at_an_empty_context(calibration):
    empty = plan_for("raspberry-pi-5-16gb", calibration, depth=0)
    assert empty.choice.variant.id == QWEN_30B and empty.choice.meets_target
    assert verdicts(empty)["qwen3-30b-a3b-2507-q3_k_s-3.25bpw"].startswith("predicted 7.")

    conversation = plan_for("raspberry-pi-5-16gb", calibration, depth=1024)
    assert conversation.choice.variant.id == QWEN_06B
    assert verdicts(conversation)[QWEN_30B] == "predicted 7.2 tok/s < 7.60 (target 8)"
    # A lower target brings the 30B back: fit first, then speed, then quality.
    relaxed = plan_for("raspberry-pi-5-16gb", calibration, depth=1024, target_tps=7)
    assert relaxed.choice.variant.id == QWEN_30B


def test_a_pi5_8gb_cannot_hold_the_30b(calibration):
    result = plan_for("raspberry-pi-5-8gb", calibration)
    assert verdicts(result)[QWEN_30B] == "needs 10.29 GB, budget 6.61 GB"
    assert result.choice.variant.id == QWEN_06B
    assert verdicts(result)[LLAMA_1B].endswith(f"but lower quality than {QWEN_06B}")
    assert verdicts(result)["qwen3-4b-2507-q4_k_s-3.87bpw"].endswith("< 7.60 (target 8)")


def test_a_pi5_4gb_and_2gb_plan_within_their_memory(calibration):
    four = plan_for("raspberry-pi-5-4gb", calibration)
    assert four.choice.variant.id == QWEN_06B
    assert verdicts(four)["qwen3-30b-a3b-2507-q3_k_s-3.25bpw"].startswith("needs 12.42 GB")
    two = plan_for("raspberry-pi-5-2gb", calibration)
    assert two.choice.variant.id == "gemma-3-270m-q4_k_m"
    assert verdicts(two)[LLAMA_1B].startswith("needs 0.81 GB, budget 0.")
    assert verdicts(two)["smollm2-135m-instruct-q4_1"].endswith(
        "but lower quality than gemma-3-270m-q4_k_m")


def test_when_nothing_meets_the_target_the_fastest_that_fits_is_flagged(capsys):
    code, out = run(capsys, "--device", "raspberry-pi-5-8gb", "--target-tps", "200")
    assert code == 1
    assert "choice   smollm2-135m-instruct-q4_1  [BELOW TARGET]" in out
    assert "chosen, BELOW TARGET: nothing that fits reaches 190.00 tok/s" in out


def test_a_pi4_without_a_bandwidth_figure_is_told_to_measure_it(capsys, pi4, tmp_path):
    code = main(["plan", "--device", "raspberry-pi-4-4gb"])
    assert code == 64  # EX_USAGE: the command line must say more
    assert "pi-appliance bench --bandwidth" in capsys.readouterr().err
    # Measured on the device and stored, it is used: a Pi 4 detected from its fixture files.
    save_bandwidth(tmp_path, 4.0e9, 4)
    code, out = run(capsys, "--root", str(pi4), "--state-dir", str(tmp_path))
    assert "4.0 GB/s (measured on this device" in out
    assert "Raspberry Pi 4 Model B Rev 1.4 (detected, profile raspberry-pi-4-4gb)" in out
    assert "qwen3-4b-2507-q4_k_s-3.87bpw" in out and "needs" in out


def test_a_detected_pi5_plans_with_its_cgroup_limit(capsys, pi5_16gb):
    code, out = run(capsys, "--root", str(pi5_16gb), "--json", "--depth", "0")
    result = json.loads(out)
    assert result["device"]["memory_bytes"] == 12 * GIB  # MemoryMax=, not the board's 16
    assert result["choice"] == QWEN_30B and code == 0
    assert result["budget"]["kv_cache_bytes"] == 96 * 1024 * 4096


def test_one_model_is_predicted_and_checked_on_its_own(capsys):
    code, out = run(capsys, "--device", "raspberry-pi-5-16gb", "--model", QWEN_30B, "--json",
                    "--depth", "0", "--context", "8192")
    result = json.loads(out)
    [candidate] = result["candidates"]
    assert candidate["fits_memory"] and candidate["meets_target"] and code == 0
    assert candidate["memory_bytes"] == 10_286_446_674 + 96 * 1024 * 8192
    assert 7.6 < candidate["predicted_tokens_per_second"] < 9
    assert main(["plan", "--device", "raspberry-pi-5-16gb", "--model", "gpt-5"]) == 64
    assert "not in the model catalog" in capsys.readouterr().err


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--tolerance", "1", "less than 1"),  # would pass at 0 tok/s: everything "meets" the target
    ("--context", "-5", "greater than or equal to 128"),
    ("--depth", "-1", "greater than or equal to 0"),
])
def test_out_of_range_options_are_refused_as_the_config_would_be(capsys, option, value, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "--device", "raspberry-pi-5-8gb", option, value])
    assert exit_info.value.code == 64  # EX_USAGE, not argparse's 2
    assert f"argument {option}: '{value}': Input should be {message}" in capsys.readouterr().err


def test_unknown_devices_are_refused_with_the_list(capsys):
    assert main(["plan", "--device", "raspberry-pi-6"]) == 64
    assert "raspberry-pi-5-16gb" in capsys.readouterr().err


def test_the_calibration_table_names_its_sources(capsys):
    code, out = run(capsys, "--calibration")
    assert code == 0 and "geerlingguy/ai-benchmarks#47" in out and "held out" in out


def test_the_plot_is_a_png(capsys, tmp_path: Path):
    pytest.importorskip("matplotlib")
    target = tmp_path / "plan.png"
    code, _ = run(capsys, "--device", "raspberry-pi-5-16gb", "--plot", str(target))
    assert code == 0
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and target.stat().st_size > 20_000


def test_the_plot_reads_like_the_table(calibration, tmp_path: Path):
    pytest.importorskip("matplotlib")
    result = plan_for("raspberry-pi-5-16gb", calibration, depth=0)
    figure = draw(result, tmp_path / "plan.png")
    assert (tmp_path / "plan.png").read_bytes()[:4] == b"\x89PNG"
    texts = [text.get_text() for text in figure.findobj(lambda artist: hasattr(artist, "get_text"))]
    # Plain numbers on the log axes, not matplotlib's 10ⁿ and 6×10¹.
    ticks = [label.get_text() for axes in figure.axes for label in axes.get_xticklabels()]
    assert "10" in ticks and "0.5" in ticks
    assert not [text for text in texts if "10^" in text or "×10" in text or "$" in text]
    # The budget line is where the table's budget puts it: the choice's weights budget plus
    # its KV cache, which the bars include; its legend entry names the table's figure.
    budget = result.budget(result.choice.variant)
    [line] = [line for axes in figure.axes for line in axes.lines if line.get_gid() == "budget"]
    assert line.get_xdata()[0] == (budget.weights_bytes + budget.kv_cache_bytes) / 1e9
    assert f"the choice: {human_bytes(budget.weights_bytes)} for the weights" in line.get_label()
    legend = [text.get_text() for text in figure.legends[0].get_texts()]
    assert {"chosen", "fits, too slow", "does not fit"} <= set(legend)
    assert any(text.startswith("target 8 tok/s") for text in legend)
    assert f"raspberry-pi-5-16gb: {QWEN_30B}, the best quality that fits" in " ".join(texts)


def test_the_plan_is_for_the_appliances_own_configuration(capsys, tmp_path, model_path):
    # On an appliance the planner asks what the service serves and how it is verified, so the
    # roles never restate those values.
    config = write_config(tmp_path / "appliance.toml", {
        "model": {"path": str(model_path), "context": 2048},
        "verify": {"depth": 64, "target_tps": 1.5, "n_prompt": 16, "n_gen": 16},
        "paths": {"state_dir": str(tmp_path), "models_dir": str(tmp_path / "models")}})
    code, out = run(capsys, "--device", "raspberry-pi-5-8gb", "--config", str(config), "--json")
    assert code in (0, 1)  # a plan either way: 1 says the choice is below target
    request = json.loads(out)["request"]
    assert (request["context"], request["depth"], request["target_tps"]) == (2048, 64, 1.5)
    # A flag still wins over the file.
    _, out = run(capsys, "--device", "raspberry-pi-5-8gb", "--config", str(config), "--json",
                 "--depth", "0")
    assert json.loads(out)["request"]["depth"] == 0


def test_by_default_the_16gb_plan_gates_like_the_benchmarks_and_says_what_depth_costs(capsys):
    """The published 8 tok/s are tg128 at depth 0: the default plan gates there, chooses the 30B,
    and shows its prediction in a conversation beside it."""
    code, out = run(capsys, "--device", "raspberry-pi-5-16gb")
    assert code == 0
    assert "choice   qwen3-30b-a3b-2507-q3_k_s-2.70bpw\n" in out
    assert "also predicted at depth 1024, not gated" in out
    row = next(line for line in out.splitlines() if line.startswith(QWEN_30B))
    assert row.split()[6:8] == ["8.5", "7.2"]  # tok/s at depth 0, at depth 1024
    assert "≥ 7.60, 7.2 at depth 1024" in row


def test_the_plan_on_a_device_learns_from_its_own_verification(capsys, tmp_path, model_path,
                                                               pi5_16gb):
    config = write_config(tmp_path / "appliance.toml", {
        "model": {"path": str(model_path)},
        "paths": {"state_dir": str(tmp_path), "models_dir": str(tmp_path / "models")}})
    planned = ("--root", str(pi5_16gb), "--config", str(config), "--json")
    before = json.loads(run(capsys, *planned)[1])
    assert before["choice"] == QWEN_30B and before["device"]["measured"] is None
    # This device ran the 30B slower than its profile predicts (a hot case, a slow card).
    verdict = {"result": "fail", "measured_tps": 6.0, "depth": 0, "model": {"id": QWEN_30B},
               "conversation": {"depth": 1024, "measured_tps": 5.1},
               "timestamp": "2026-12-02T10:00:00Z", "report": {"conditions": {"valid": True}}}
    (tmp_path / "verify.json").write_text(json.dumps(verdict))
    code, out = run(capsys, *planned)
    after = json.loads(out)
    measured = after["device"]["measured"]
    assert measured["tokens_per_second"] == 6.0 and measured["conversation"] == [1024, 5.1]
    assert measured["predicted_before_tps"] == pytest.approx(8.5, abs=0.1)
    thirty = next(c for c in after["candidates"] if c["id"] == QWEN_30B)
    assert thirty["predicted_tokens_per_second"] == 6.0  # its next prediction is what it did
    assert after["choice"] != QWEN_30B and code == 0  # another model reaches the target
    assert "learned from this device's verification" in after["device"]["bandwidth_source"]
    table = run(capsys, "--root", str(pi5_16gb), "--config", str(config))[1]
    assert (f"measured {QWEN_30B} ran 6.00 tok/s at depth 0 (5.10 at depth 1024) in this "
            "device's verification 2026-12-02T10:00:00Z; predicted 8.49 (+41.4%)") in table
    # A measurement taken under invalid conditions (throttled, busy) teaches nothing.
    verdict["report"]["conditions"]["valid"] = False
    (tmp_path / "verify.json").write_text(json.dumps(verdict))
    assert json.loads(run(capsys, *planned)[1])["choice"] == QWEN_30B
