"""The model catalog (data in `data/catalog.toml`): what each variant is, how big it is, how good it
is relative to its unquantized model, where to get it, and what has been measured with it."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

from appliance.exitcodes import ApplianceError, ExitCode

# Bytes one cache element takes, by llama.cpp's KV cache type (q8_0/q4_0 carry a scale per 32).
KV_ELEMENT_BYTES = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}


@dataclass(frozen=True)
class Family:
    key: str
    name: str
    kind: Literal["dense", "moe"]
    total_params: float
    active_params: float
    # Parameters a token does not read: an input embedding table not tied to the output head is
    # looked up one row at a time (a tied one is read whole, as the output projection).
    unread_params: float
    layers: int
    kv_heads: int
    head_dim: int
    license: str
    source: str
    # The unquantized model's score on the catalog's one benchmark, as its maker published it;
    # None where none was published (the source then says what was looked for).
    benchmark: str
    benchmark_score: float | None
    benchmark_source: str

    def kv_bytes_per_token(self, kv_type: str = "f16") -> float:
        return 2 * self.layers * self.kv_heads * self.head_dim * KV_ELEMENT_BYTES[kv_type]


@dataclass(frozen=True)
class Measurement:
    """A published decode speed: evidence to calibrate and check the planner, never its answer."""
    device: str
    tokens_per_second: float
    depth: int
    kv_type: str
    tool: str
    source: str


@dataclass(frozen=True)
class Variant:
    id: str
    family: Family
    quantization: str
    bits_per_weight: float
    file_bytes: int
    sha256: str | None
    urls: tuple[str, ...]
    # A Python package that ships the file: "module/file.gguf" or "module:function" (assembles it).
    python_source: str | None
    # Retained quality in % of the unquantized model, where the quantizer measured it.
    quality_percent: float | None
    quality_source: str
    measurements: tuple[Measurement, ...]

    @property
    def quality_score(self) -> float | None:
        """The family's benchmark score × the measured retention. Without a measured retention
        it is the unquantized model's score: an upper bound, not a measurement of this file."""
        score = self.family.benchmark_score
        if score is None or self.quality_percent is None:
            return score
        return score * self.quality_percent / 100

    @property
    def weight_bytes_per_token(self) -> float:
        """Bytes of weights one decoded token reads: all of a dense model's, the routed experts'
        and shared tensors' share of a mixture of experts; an untied embedding table is not read."""
        read_params = self.family.active_params - self.family.unread_params
        return self.file_bytes * read_params / self.family.total_params


def load_catalog() -> dict[str, Variant]:
    data: dict[str, Any] = tomllib.loads(
        (resources.files("appliance") / "data" / "catalog.toml").read_text())
    families = {key: Family(key=key, benchmark=data["benchmark"],
                            **{"benchmark_score": None, **entry})
                for key, entry in data["family"].items()}
    variants = {}
    for key, entry in data["variant"].items():
        entry = dict(entry)
        measurements = tuple(Measurement(**{"kv_type": "f16", **item})
                             for item in entry.pop("measured", ()))
        variants[key] = Variant(
            id=key, family=families[entry.pop("family")], measurements=measurements,
            urls=tuple(entry.pop("urls", ())), sha256=entry.pop("sha256", None),
            python_source=entry.pop("python_source", None),
            quality_percent=entry.pop("quality_percent", None),
            quality_source=entry.pop("quality_source", ""), **entry)
    return variants


def get_variant(variant_id: str, catalog: dict[str, Variant] | None = None) -> Variant:
    catalog = catalog if catalog is not None else load_catalog()
    try:
        return catalog[variant_id]
    except KeyError:
        raise ApplianceError(f"{variant_id!r} is not in the model catalog; `pi-appliance plan` "
                             "lists the ids", ExitCode.USAGE) from None
