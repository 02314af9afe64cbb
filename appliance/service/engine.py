"""The inference engine: one llama.cpp model, one generation at a time, a bounded queue.

A `Llama` object is not thread-safe, so every use of it happens while holding a `Lease`.
Requests beyond the one running wait in a queue of bounded length; past that they are
refused at once (the API answers 429), so a burst cannot pile up unbounded work.

The token loop is our own rather than llama-cpp-python's `create_completion`, which
re-detokenizes the whole completion on every token (quadratic in its length): here text is
decoded incrementally, stop sequences are matched on the undelivered tail only, and every
token refreshes the heartbeat that health and the systemd watchdog trust.

Prompts are evaluated in chunks for the same reason: a 2,000-token document takes minutes on a
Pi 5 with a 30B model, and each chunk is progress that health can show and a point at which a
client that went away, or a shutdown, stops the work.
"""

from __future__ import annotations

import codecs
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from appliance.exitcodes import ApplianceError, ExitCode, ModelFileError
from appliance.hardware.sysfs import physical_core_count
from appliance.models.checksums import verify_sha256
from appliance.models.gguf import quantization_name, read_gguf_header
from appliance.models.store import catalog_id_of
from appliance.service import tuning
from appliance.service.embeddings import CannotEmbed, Embedder, declared_pooling
from appliance.service.grammars import GRAMMARS_KEPT, grammar_prefixed
from appliance.service.loading import (
    LOAD_FLOOR_SECONDS,
    TrialLoad,
    llama_arguments,
    load_time_bound,
    passed_trial,
)
from appliance.service.prompts import PromptBuilder, PromptTooLong
from appliance.settings import LimitsSettings, ModelSettings

log = logging.getLogger(__name__)


class EngineState(StrEnum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    STOPPING = "stopping"


class NotReady(Exception):
    """The engine cannot take work now (still loading, failed, or shutting down)."""


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"the request queue is full; retry after {retry_after} s")
        self.retry_after = retry_after


class ClientGone(Exception):
    """The client hung up while its request waited in the queue."""


class QueueTimeout(Exception):
    def __init__(self, waited: float, retry_after: int):
        super().__init__(f"waited {waited:.0f} s in the queue without being served")
        self.retry_after = retry_after


# A prompt chunk is sized to take about this long at the speed measured so far, and holds at
# least PROMPT_CHUNK_MIN_TOKENS (fewer tokens per call would waste llama.cpp's batching).
PROMPT_CHUNK_SECONDS = 2.0
PROMPT_CHUNK_MIN_TOKENS = 32
# With limits.stall_seconds unset, a request is stalled after this many times its longest step
# at the measured speeds (a prompt chunk or a token), and never sooner than the floor; before
# anything is measured, after STALL_UNMEASURED_SECONDS.
STALL_STEPS = 10
STALL_FLOOR_SECONDS = 60.0
STALL_UNMEASURED_SECONDS = 120.0
# Weight of the newest measurement in the speeds' moving averages.
SPEED_SMOOTHING = 0.3
# How often a request waiting in the queue looks whether its client is still there.
CLIENT_CHECK_SECONDS = 0.25


@dataclass(frozen=True)
class PromptProgress:
    """The prompt evaluation running now."""

    evaluated: int
    total: int


@dataclass(frozen=True)
class ModelFacts:
    """What /health and the benchmarks report about the loaded model."""

    id: str
    path: str
    sha256: str
    size_bytes: int
    quantization: str | None
    parameters: int
    context: int
    context_trained: int
    threads: int
    # How the count was chosen: set, or measured (now or at an earlier start), with the figures.
    threads_choice: dict[str, Any]
    flash_attention: bool
    kv_cache_type: str
    embedding_pooling: str | None  # None: the model does not embed
    load_seconds: float
    system_info: str

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters, already validated and bounded by the API layer."""

    max_tokens: int
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    grammar: str | None = None  # GBNF the text must match (response_format, tool calls)
    # With a grammar: it applies from where this text first appears (a tool call's opening,
    # when the model may also answer in words); the grammar begins with it.
    grammar_trigger: str | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()  # added to a token's logit before sampling
    top_logprobs: int | None = None  # None: no logprobs; else this many alternatives each


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token, its log-probability, and the likeliest tokens at its place."""

    text: bytes
    logprob: float
    top: tuple[tuple[bytes, float], ...]


class _Observer:
    """Between llama.cpp's logits and its sampler: adds the request's logit bias and keeps the
    distribution the next token is drawn from, for its log-probability."""

    def __init__(self, sampling: Sampling):
        self._bias = sampling.logit_bias
        self._keep = sampling.top_logprobs is not None
        self._top = sampling.top_logprobs or 0
        self._logits: Any = None

    def __call__(self, _input_ids: Any, logits: Any) -> Any:
        for token, bias in self._bias:
            logits[token] += bias
        if self._keep:
            self._logits = logits.copy()
        return logits

    def logprob(self, token: int, text: bytes,
                detokenize: Callable[[list[int]], bytes]) -> TokenLogprob:
        import numpy as np

        logits = self._logits
        peak = logits.max()
        normaliser = peak + np.log(np.exp(logits - peak).sum())
        top = np.argpartition(-logits, self._top)[:self._top] if self._top else []
        ranked = sorted(top, key=lambda candidate: -logits[candidate])
        return TokenLogprob(text, float(logits[token] - normaliser),
                            tuple((detokenize([int(candidate)]),
                                   float(logits[candidate] - normaliser))
                                  for candidate in ranked))


@dataclass
class GenerationStats:
    prompt_tokens: int
    completion_tokens: int = 0
    finish_reason: str = "length"
    time_to_first_token: float | None = None
    decode_seconds: float = 0.0
    # From the end of prompt evaluation to the last token: the time all completion tokens took,
    # so that tokens / seconds summed over requests is the throughput (the metrics' counters).
    generation_seconds: float = 0.0
    # With Sampling.top_logprobs: one entry per completion token, in order (TokenLogprob).
    logprobs: list[TokenLogprob] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def decode_tokens_per_second(self) -> float | None:
        # The first token's time belongs to prompt processing, so it is not counted here.
        if self.completion_tokens < 2 or self.decode_seconds <= 0:
            return None
        return (self.completion_tokens - 1) / self.decode_seconds


@dataclass
class Lease:
    """The right to use the model; release it exactly once (idempotent)."""

    engine: Engine
    released: bool = field(default=False, init=False)

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.engine._release()


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that could begin one of the stop sequences."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


class Engine:
    def __init__(self, model: ModelSettings, limits: LimitsSettings, state_dir: Path | None,
                 clock: Callable[[], float] = time.monotonic):
        self.model_settings = model
        self.limits = limits
        # Where the model's checksum is cached when its own directory is read-only.
        self._state_dir = state_dir
        self._clock = clock
        self._llama: Any = None
        self._prompts: PromptBuilder | None = None
        self._embedder: Embedder | None = None
        self._grammars_checked: dict[str, bool] = {}  # insertion order: the oldest goes first
        self._grammars_lock = threading.Lock()
        self._condition = threading.Condition()
        self._busy = False
        # Predicted seconds of the running request and of each one waiting: what Retry-After
        # adds up.
        self._running_estimate = 0.0
        self._waiting_estimates: list[float] = []
        self._last_progress = clock()
        self.prompt_progress: PromptProgress | None = None
        # Prompt tokens llama.cpp evaluated: a shared start kept in the KV cache is not counted.
        self.prompt_tokens_evaluated = 0
        self.prompt_evaluation_seconds = 0.0
        # Measured on this device: prompt tokens per second and seconds per generated token.
        self.prompt_tokens_per_second: float | None = None
        self._seconds_per_token: float | None = None
        self._average_request_seconds = 5.0
        self._request_started = 0.0
        self._stop = threading.Event()
        self._trial: TrialLoad | None = None
        # While loading: when the current step must have shown progress (load_overdue).
        self._load_deadline = clock() + LOAD_FLOOR_SECONDS
        # Every call into llama.cpp (load and each generation) runs on this one thread.
        # llama.cpp's OpenMP workers belong to the thread that calls it: calls from many HTTP
        # threads would leave one idle worker team per thread, and with more OpenMP threads
        # than cores libgomp stops spinning between operations, halving decode speed.
        self._inference = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self.state = EngineState.LOADING
        self.status_line = "starting"
        self.facts: ModelFacts | None = None
        self.failure: ApplianceError | None = None

    # ---- loading -------------------------------------------------------------------------

    def load(self) -> ModelFacts:
        """Check, then load the model. On failure the state is FAILED and the error re-raised."""
        try:
            self.facts = self._inference.submit(self._load).result()
        except ApplianceError as exc:
            self.failure = exc
            self.state = EngineState.FAILED
            raise
        with self._condition:
            if self.state is EngineState.LOADING:
                self.state = EngineState.READY
                self.status_line = "ready"
                self._last_progress = self._clock()
        return self.facts

    def _step(self, status: str, seconds: float = LOAD_FLOOR_SECONDS) -> None:
        """A step of loading begins, or shows progress: it has `seconds` for its next sign."""
        self.status_line = status
        self._load_deadline = self._clock() + seconds

    def load_overdue(self) -> bool:
        """Loading, and its current step has shown no progress in its time: a read is blocked
        (a hung drive or network mount), which no thread can interrupt."""
        return self.state is EngineState.LOADING and self._clock() > self._load_deadline

    def _load(self) -> ModelFacts:
        settings = self.model_settings
        path = settings.path
        started = self._clock()
        self._step(f"checking {path.name}")
        template = self._chat_template_override()
        read_gguf_header(path)
        size = path.stat().st_size
        hashed = 0

        def hashing(chunk: int) -> None:
            nonlocal hashed
            hashed += chunk
            self._step(f"computing sha256 of {path.name}: {hashed * 100 // max(size, 1)} %")

        hashing(0)
        try:
            sha256 = verify_sha256(path, settings.sha256, self._state_dir, hashing)
        except OSError as exc:  # an I/O error of the drive midway
            raise ModelFileError(f"{path}: cannot read the model file: {exc.strerror}; check "
                                 "the drive (dmesg)", ExitCode.MODEL_MISSING) from None
        if not passed_trial(self._state_dir, sha256):
            self._step(f"trial load of {path.name} in a child process", load_time_bound(size))
            self._trial = TrialLoad(settings)
            if self._stop.is_set():
                self._trial.stop()
            self._trial.run(sha256, self._state_dir, size)
        self._step(f"loading {path.name}", load_time_bound(size))
        from llama_cpp import Llama, llama_cpp  # deferred: importing loads the native library

        cores = physical_core_count()
        try:
            llama = Llama(**llama_arguments(settings, settings.threads or cores, verbose=False))
        except ValueError as exc:  # llama-cpp-python's wording for "llama.cpp refused it"
            raise ModelFileError(
                f"{path}: llama.cpp could not load the model ({exc}); the file is probably "
                "truncated or corrupt — download it again and check its sha256") from None
        except MemoryError as exc:
            raise ApplianceError(f"{path}: not enough memory to load the model: {exc}",
                                 ExitCode.TRANSIENT) from None
        threads_choice = self._choose_threads(llama, sha256, cores)
        self._llama = llama
        self._prompts = PromptBuilder(llama, settings.special_tokens_in_chat, template)
        pooling = settings.embedding_pooling or declared_pooling(llama)
        if pooling is not None:
            self._embedder = Embedder(llama, pooling, settings.batch, threads_choice["threads"])
        file_type = llama.metadata.get("general.file_type")
        return ModelFacts(
            # A model from the store is named by its catalog id, which follows a fallback.
            id=settings.id or catalog_id_of(path) or settings.model_id,
            path=str(path),
            sha256=sha256,
            size_bytes=path.stat().st_size,
            quantization=quantization_name(int(file_type) if file_type is not None else None),
            parameters=int(llama._model.n_params()),
            context=llama.n_ctx(),
            context_trained=int(llama._model.n_ctx_train()),
            threads=threads_choice["threads"],
            threads_choice=threads_choice,
            flash_attention=settings.flash_attention,
            kv_cache_type=settings.kv_cache_type,
            embedding_pooling=pooling,
            load_seconds=round(self._clock() - started, 3),
            system_info=llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
        )

    def _chat_template_override(self) -> str | None:
        path = self.model_settings.chat_template_file
        if path is None:
            return None
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ApplianceError(f"model.chat_template_file: cannot read {path}: {exc}; fix "
                                 "the path or leave the setting out to use the model's own",
                                 ExitCode.CONFIG_INVALID) from None

    def _choose_threads(self, llama: Any, sha256: str, cores: int) -> dict[str, Any]:
        """`model.threads` when set; else the count measured fastest for this model file here,
        timed now if it never was (the prompt's threads follow: prefill scales with cores)."""
        if self.model_settings.threads:
            return {"threads": self.model_settings.threads, "source": "model.threads"}
        choice = tuning.stored_choice(self._state_dir, sha256)
        if choice is None:
            def progress(message: str) -> None:
                self._step(f"timing decode by thread count: {message}")
            rates = tuning.decode_rates(llama, list(range(1, cores + 1)), progress=progress)
            choice = tuning.store_choice(self._state_dir, sha256, rates)
            log.info("threads: %d, the fastest decode measured (%s tok/s by count)",
                     choice["threads"], choice["tg_tokens_per_second"])
        tuning.use_threads(llama, choice["threads"], cores)
        return {"source": "measured"} | choice

    # ---- admission -----------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return len(self._waiting_estimates)

    @property
    def busy(self) -> bool:
        return self._busy

    def estimate_seconds(self, prompt_tokens: int, max_tokens: int) -> float:
        """How long a request of this size takes at the speeds measured here (at most: the
        whole prompt evaluated, every token generated); the average request until measured."""
        if self.prompt_tokens_per_second is None or self._seconds_per_token is None:
            return self._average_request_seconds
        return prompt_tokens / self.prompt_tokens_per_second + max_tokens * self._seconds_per_token

    def _retry_after(self) -> int:
        """Seconds until the queue has room: the rest of the running request and all waiting."""
        running_left = max(0.0, self._running_estimate - (self._clock() - self._request_started))
        return max(1, math.ceil(running_left + sum(self._waiting_estimates)))

    def acquire(self, estimate: float | None = None,
                client_gone: Callable[[], bool] = lambda: False) -> Lease:
        """Wait for the model, or raise QueueFull / QueueTimeout / NotReady / ClientGone.

        `estimate` is the request's predicted seconds (`estimate_seconds`); a client that hangs
        up while waiting gives its place back at once instead of being run for nobody.
        """
        estimate = self._average_request_seconds if estimate is None else estimate
        with self._condition:
            if self.state is not EngineState.READY:
                raise NotReady(self.state.value)
            if self._busy and len(self._waiting_estimates) >= self.limits.queue_size:
                raise QueueFull(self._retry_after())
            self._waiting_estimates.append(estimate)
            try:
                started = self._clock()
                deadline = started + self.limits.queue_timeout_seconds
                while self._busy and self.state is EngineState.READY:
                    if client_gone():
                        raise ClientGone()
                    remaining = deadline - self._clock()
                    if remaining <= 0:
                        raise QueueTimeout(self._clock() - started, self._retry_after())
                    self._condition.wait(min(remaining, CLIENT_CHECK_SECONDS))
                if self.state is not EngineState.READY:
                    raise NotReady(self.state.value)
                if client_gone():
                    raise ClientGone()
                self._busy = True
                self._running_estimate = estimate
                self._request_started = self._last_progress = self._clock()
            finally:
                self._waiting_estimates.remove(estimate)
        return Lease(self)

    def _release(self) -> None:
        with self._condition:
            now = self._clock()
            elapsed = now - self._request_started
            self._average_request_seconds += 0.2 * (elapsed - self._average_request_seconds)
            self._busy = False
            self._last_progress = now
            if self.state is EngineState.READY:
                self.status_line = "ready"
            self._condition.notify()

    # ---- liveness ------------------------------------------------------------------------

    @property
    def context_tokens_held(self) -> int:
        """Positions of the context the KV cache holds now (kept for the next request too)."""
        return self._llama.n_tokens if self._llama is not None else 0

    def heartbeat_age(self) -> float:
        """Seconds since the engine last showed progress; 0 while idle (nothing is stuck)."""
        return self._clock() - self._last_progress if self._busy else 0.0

    def stall_limit(self) -> float:
        """Seconds without progress after which a request counts as stalled."""
        if self.limits.stall_seconds is not None:
            return self.limits.stall_seconds
        if self.prompt_tokens_per_second is None:
            return STALL_UNMEASURED_SECONDS
        longest_step = max(PROMPT_CHUNK_SECONDS,
                           PROMPT_CHUNK_MIN_TOKENS / self.prompt_tokens_per_second,
                           self._seconds_per_token or 0.0)
        return max(STALL_FLOOR_SECONDS, STALL_STEPS * longest_step)

    def is_stalled(self) -> bool:
        return self.heartbeat_age() > self.stall_limit()

    def shut_down(self) -> None:
        """Refuse new work and make the running generation end at its next token."""
        with self._condition:
            self.state = EngineState.STOPPING
            self._stop.set()
            self._condition.notify_all()
        if self._trial is not None:
            self._trial.stop()

    # ---- prompts -------------------------------------------------------------------------

    def chat_prompt(self, messages: list[dict[str, Any]],
                    tools: list[dict[str, Any]] | None = None
                    ) -> tuple[list[int], tuple[str, ...]]:
        """(prompt tokens, the template's stop strings) for a chat; see prompts.py."""
        assert self._prompts is not None
        return self._prompts.chat(messages, tools)

    @property
    def chat_template(self) -> str | None:
        assert self._prompts is not None
        return self._prompts.template

    def text_prompt(self, prompt: str) -> list[int]:
        assert self._prompts is not None
        return self._prompts.text(prompt)

    def grammar_parses(self, grammar: str) -> bool:
        """Whether llama.cpp takes `grammar` (a sampler made of an unparsable one is NULL);
        the answer is kept for the last few grammars."""
        from llama_cpp import llama_cpp

        with self._grammars_lock:  # requests check theirs on their own threads
            if grammar not in self._grammars_checked:
                sampler = llama_cpp.llama_sampler_init_grammar(
                    self._llama._model.vocab, grammar.encode(), b"root")
                if sampler:
                    llama_cpp.llama_sampler_free(sampler)
                if len(self._grammars_checked) >= GRAMMARS_KEPT:
                    self._grammars_checked.pop(next(iter(self._grammars_checked)))
                self._grammars_checked[grammar] = bool(sampler)
            return self._grammars_checked[grammar]

    @property
    def vocabulary_size(self) -> int:
        return self._llama.n_vocab()

    def token_budget(self, prompt_tokens: int, requested: int) -> int:
        """Tokens this request may generate; PromptTooLong when the prompt leaves no room."""
        context = self._llama.n_ctx()
        if prompt_tokens >= context:
            raise PromptTooLong(
                f"the prompt is {prompt_tokens} tokens but the context holds {context} "
                "(model.context); shorten the prompt or the conversation")
        return min(requested, context - prompt_tokens)

    # ---- embeddings ----------------------------------------------------------------------

    def embedding_tokens(self, texts: list[str]) -> list[list[int]]:
        """Each text's tokens; CannotEmbed without pooling, PromptTooLong past its context."""
        embedder = self._embedder
        if embedder is None:
            raise CannotEmbed()
        tokens = [self.text_prompt(text) for text in texts]  # tokenized as a completion's
        for index, each in enumerate(tokens):
            if len(each) > embedder.tokens:
                raise PromptTooLong(f"input {index} is {len(each)} tokens; an embedding takes "
                                    f"at most {embedder.tokens} (model.batch)")
        return tokens

    @property
    def embedding_dimensions(self) -> int:
        return self._llama.n_embd()

    def embed(self, lease: Lease, tokens: list[list[int]],
              cancelled: Callable[[], bool] = lambda: False) -> list[list[float]] | None:
        """The texts' unit vectors, on the inference thread; None when stopped between two."""
        if lease.released or lease.engine is not self:
            raise RuntimeError("embed() needs a lease that is held")
        embedder = self._embedder
        assert embedder is not None

        def run() -> list[list[float]] | None:
            vectors = []
            for each in tokens:
                if self._stop.is_set() or cancelled():
                    return None
                self.status_line = f"embedding: {len(vectors)} of {len(tokens)} texts"
                vectors.append(embedder.embed(each))
                self._last_progress = self._clock()
            return vectors

        return self._inference.submit(run).result()

    # ---- generation ----------------------------------------------------------------------

    def generate(self, lease: Lease, prompt: list[int], sampling: Sampling,
                 stats: GenerationStats,
                 cancelled: Callable[[], bool] = lambda: False) -> Iterator[str]:
        """Yield text pieces as they are decoded; `stats` is filled in as it goes.

        Ends early, with finish_reason "cancelled", when the engine shuts down or
        `cancelled()` turns true (the client went away). The decoding runs on the inference
        thread; this generator hands its pieces over, and when it is closed early it stops the
        loop and waits for it, so the lease is never released while llama.cpp still runs.
        """
        if lease.released or lease.engine is not self:
            raise RuntimeError("generate() needs a lease that is held")
        pieces: queue.SimpleQueue[str | BaseException | None] = queue.SimpleQueue()
        closed = threading.Event()

        def produce() -> None:
            try:
                for piece in self._decode(prompt, sampling, stats,
                                          lambda: closed.is_set() or cancelled()):
                    pieces.put(piece)
            except BaseException as exc:  # handed to the caller's thread, raised there
                pieces.put(exc)
            finally:
                pieces.put(None)

        done = self._inference.submit(produce)
        try:
            while (item := pieces.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            closed.set()
            done.result()

    def _decode(self, prompt: list[int], sampling: Sampling, stats: GenerationStats,
                cancelled: Callable[[], bool]) -> Iterator[str]:
        llama = self._llama
        vocab = llama._model.vocab
        from llama_cpp import llama_cpp

        # Unseeded means random: the seed of an earlier request must not carry over.
        llama.set_seed(llama_cpp.LLAMA_DEFAULT_SEED if sampling.seed is None else sampling.seed)
        started = self._clock()
        first_token_at: float | None = None
        if not self._evaluate_prompt(prompt, cancelled):
            stats.finish_reason = "cancelled"
            return
        evaluated_at = self._clock()
        observer = (_Observer(sampling)
                    if sampling.logit_bias or sampling.top_logprobs is not None else None)
        trigger = sampling.grammar_trigger if sampling.grammar else None
        generated: list[int] = []
        pieces: list[bytes] = []  # each generated token's bytes
        ends: list[int] = []  # the completion text's length after each token
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        text, delivered = "", 0  # the completion's text, and how much of it was yielded
        # The whole prompt is in the KV cache now: generate() finds it there and samples at once.
        tokens = self._continue(prompt, sampling, observer,
                                None if trigger else sampling.grammar)
        try:
            while True:
                try:
                    token = next(tokens)
                except StopIteration:
                    break
                now = self._clock()
                stats.generation_seconds = now - evaluated_at
                if first_token_at is not None:
                    self._seconds_per_token = _smoothed(self._seconds_per_token,
                                                        now - self._last_progress)
                self._last_progress = now
                if first_token_at is None:
                    first_token_at = now
                    stats.time_to_first_token = now - started
                if not sampling.ignore_eos and llama_cpp.llama_vocab_is_eog(vocab, token):
                    stats.finish_reason = "stop"
                    break
                piece = llama.detokenize([token])
                generated.append(token)
                pieces.append(piece)
                if sampling.top_logprobs is not None:
                    stats.logprobs.append(observer.logprob(token, piece, llama.detokenize))
                stats.decode_seconds = now - first_token_at
                text += decoder.decode(piece)
                ends.append(len(text))
                if trigger is not None and (at := text.find(trigger, delivered)) >= 0:
                    # From the last token boundary before the trigger on, the text is made
                    # again under the grammar, which begins with what came after that boundary.
                    kept = sum(1 for end in ends if end <= at)
                    tokens.close()
                    del generated[kept:], pieces[kept:], ends[kept:], stats.logprobs[kept:]
                    decoder.reset()
                    before, text = text, decoder.decode(b"".join(pieces))
                    constrained = grammar_prefixed(sampling.grammar, before[len(text):at])
                    trigger = None
                    if not self._evaluate_prompt(prompt + generated, cancelled):
                        stats.finish_reason = "cancelled"
                        break
                    tokens = self._continue(prompt + generated, sampling, observer, constrained)
                    stats.completion_tokens = len(generated)
                    continue
                stats.completion_tokens = len(generated)
                pending = text[delivered:]
                hit = min((pending.find(stop) for stop in sampling.stop if stop in pending),
                          default=-1)
                if hit >= 0:
                    text = text[:delivered + hit]
                    stats.finish_reason = "stop"
                    break
                # A tail that may begin a stop sequence, or the trigger, is not yielded yet.
                keep = held_back(pending, sampling.stop + ((trigger,) if trigger else ()))
                if len(pending) > keep:
                    yield pending[:len(pending) - keep]
                    delivered = len(text) - keep
                if stats.completion_tokens >= sampling.max_tokens:
                    break
                if self._stop.is_set() or cancelled():
                    stats.finish_reason = "cancelled"
                    break
            text += decoder.decode(b"", final=True)
            if len(text) > delivered:
                yield text[delivered:]
        finally:
            tokens.close()

    def _continue(self, context: list[int], sampling: Sampling, observer: _Observer | None,
                  grammar: str | None) -> Iterator[int]:
        """Tokens sampled after `context`, which is in the KV cache."""
        from llama_cpp import LlamaGrammar, LogitsProcessorList

        return self._llama.generate(
            context, top_k=sampling.top_k, top_p=sampling.top_p, min_p=sampling.min_p,
            temp=sampling.temperature, repeat_penalty=sampling.repeat_penalty,
            presence_penalty=sampling.presence_penalty,
            frequency_penalty=sampling.frequency_penalty,
            grammar=LlamaGrammar.from_string(grammar) if grammar else None,
            logits_processor=LogitsProcessorList([observer]) if observer else None,
        )

    def _evaluate_prompt(self, prompt: list[int], cancelled: Callable[[], bool]) -> bool:
        """Evaluate the part of `prompt` that is not in the KV cache already, in chunks; False
        when stopped between two of them."""
        llama = self._llama
        # The start the last request shares (a conversation's earlier turns) is kept; the last
        # token is always evaluated, so that its logits are fresh for sampling.
        cached = 0
        for had, wanted in zip(llama.input_ids[:llama.n_tokens], prompt[:-1], strict=False):
            if had != wanted:
                break
            cached += 1
        # A recurrent model's state cannot be cut at a position: it starts over.
        if cached and llama._ctx.kv_cache_seq_rm(-1, cached, -1):
            llama.n_tokens = cached
        else:
            llama.reset()
            cached = 0
        position = cached
        self.prompt_progress = PromptProgress(position, len(prompt))
        try:
            while position < len(prompt):
                if self._stop.is_set() or cancelled():
                    return False
                chunk = prompt[position:position + self._prompt_chunk_size()]
                started = self._clock()
                llama.eval(chunk)
                now = self._clock()
                position += len(chunk)
                self.prompt_tokens_evaluated += len(chunk)
                self.prompt_evaluation_seconds += now - started
                if now > started:
                    self.prompt_tokens_per_second = _smoothed(self.prompt_tokens_per_second,
                                                              len(chunk) / (now - started))
                self._last_progress = now
                self.prompt_progress = PromptProgress(position, len(prompt))
                self.status_line = f"evaluating a prompt: {position} of {len(prompt)} tokens"
            self.status_line = "generating"
            return True
        finally:
            self.prompt_progress = None

    def _prompt_chunk_size(self) -> int:
        batch = self.model_settings.batch
        if self.prompt_tokens_per_second is None:
            return min(batch, PROMPT_CHUNK_MIN_TOKENS)
        # A chunk lasts a tenth of the stall limit at most: an operator's short limit must not be
        # outlasted by one chunk of a healthy evaluation.
        seconds = min(PROMPT_CHUNK_SECONDS, self.stall_limit() / STALL_STEPS)
        return min(batch, max(PROMPT_CHUNK_MIN_TOKENS,
                              int(self.prompt_tokens_per_second * seconds)))


def _smoothed(average: float | None, sample: float) -> float:
    return sample if average is None else average + SPEED_SMOOTHING * (sample - average)
