"""Embeddings (POST /v1/embeddings): a text's vector, pooled by llama.cpp from the model's hidden
states, in a context of its own beside the generating one (which keeps its KV cache).

A model can embed when its pooling is known: embedding models declare theirs in the GGUF file
(`<architecture>.pooling_type`), and `model.embedding_pooling` pools a generative model's states
(as llama-server's `--embeddings --pooling`). Vectors are scaled to length 1, as OpenAI's are, so
that a dot product is their cosine similarity.
"""

from __future__ import annotations

import math
from typing import Any

# llama.cpp's pooling types by name (enum llama_pooling_type).
POOLING = {"none": 0, "mean": 1, "cls": 2, "last": 3}


class CannotEmbed(Exception):
    """The model has no pooling: its hidden states are not one vector per text."""


def declared_pooling(llama: Any) -> str | None:
    """The pooling the GGUF file declares (embedding models do), if any but none."""
    architecture = llama.metadata.get("general.architecture", "")
    declared = llama.metadata.get(f"{architecture}.pooling_type")
    names = {number: name for name, number in POOLING.items()}
    name = names.get(int(declared)) if declared is not None else None
    return None if name in (None, "none") else name


class Embedder:
    """An embeddings context on a loaded model: at most `tokens` tokens a text."""

    def __init__(self, llama: Any, pooling: str, tokens: int, threads: int):
        from llama_cpp import _internals, llama_cpp

        self._llama = llama
        self.pooling = pooling
        self.tokens = min(tokens, llama.n_ctx())
        params = llama_cpp.llama_context_default_params()
        # A text is decoded in one batch: pooling (and a non-causal model) sees all of it.
        params.n_ctx = params.n_batch = params.n_ubatch = self.tokens
        params.n_seq_max = 1
        params.embeddings = True
        params.pooling_type = POOLING[pooling]
        params.n_threads = params.n_threads_batch = threads
        self._context = _internals.LlamaContext(model=llama._model, params=params,
                                                verbose=False)
        self._batch = _internals.LlamaBatch(n_tokens=self.tokens, embd=0, n_seq_max=1,
                                            verbose=False)
        self.dimensions = llama.n_embd()

    def embed(self, tokens: list[int]) -> list[float]:
        """The unit vector of one text's tokens (at most `self.tokens` of them)."""
        from llama_cpp import llama_cpp

        assert 0 < len(tokens) <= self.tokens
        llama_cpp.llama_memory_clear(self._context.memory, True)
        self._batch.reset()
        self._batch.add_sequence(tokens, 0, True)
        self._context.decode(self._batch)
        pointer = llama_cpp.llama_get_embeddings_seq(self._context.ctx, 0)
        vector = [float(pointer[index]) for index in range(self.dimensions)]
        length = math.sqrt(sum(value * value for value in vector)) or 1.0
        return [value / length for value in vector]

    def close(self) -> None:
        self._batch.close()
        self._context.close()
