"""Decode is bound by memory bandwidth: every generated token reads the weights it uses and the
KV cache so far. This module turns the machine's read bandwidth (hardware.bandwidth) into the
ceiling a model's decode speed cannot exceed, so a measured tokens/s reads as a fraction of it."""

from __future__ import annotations

from typing import Any


def kv_bytes_per_token(metadata: dict[str, str], element_bytes: int = 2) -> int | None:
    """Bytes of K and V one context token occupies (f16 cache by default), from GGUF metadata."""
    arch = metadata.get("general.architecture")
    try:
        layers = int(metadata[f"{arch}.block_count"])
        heads = int(metadata[f"{arch}.attention.head_count"])
        kv_heads = int(metadata.get(f"{arch}.attention.head_count_kv", heads))
        head_dim = int(metadata.get(f"{arch}.attention.key_length")
                       or int(metadata[f"{arch}.embedding_length"]) // heads)
    except (KeyError, ValueError, ZeroDivisionError):
        return None
    return 2 * layers * kv_heads * head_dim * element_bytes


def ceiling(bandwidth: float, weight_bytes: int, metadata: dict[str, str],
            depth: int) -> dict[str, Any] | None:
    """Tokens/s if every token only had to read its weights and the KV cache at `depth`."""
    per_token_kv = kv_bytes_per_token(metadata)
    if per_token_kv is None:
        return None
    bytes_per_token = weight_bytes + per_token_kv * depth
    return {"bandwidth_gb_per_second": bandwidth / 1e9, "bytes_per_token": bytes_per_token,
            "depth": depth, "ceiling_tokens_per_second": bandwidth / bytes_per_token}
