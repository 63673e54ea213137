"""Continuous batching on one thread: requests join and leave the running batch
between decode steps, whatever adapter each one uses.

The loop, once per step:

1. runs the calls other threads handed it (loading adapters: they write the bank);
2. drops the rows whose client went away, and their part of the KV cache;
3. admits waiting requests while the batch has room: each prompt is prefilled on its
   own (one row, its adapter, its own ``KVCache``), its first token drawn, and its
   cache appended to the batch's (``BatchKVCache.merge`` then ``extend``: rows are
   left-padded, each with its own offset);
4. decodes one token for every row at once: the bank is told each row's slot, the
   model runs on the batch's last tokens, and each row draws its token;
5. ends the rows that met an end-of-sequence token, a stop string or ``max_tokens``
   (``BatchKVCache.filter`` keeps the others).

Results go back to the asyncio side as events on each request's queue.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import BatchKVCache, KVCache, make_prompt_cache

from metapeft.serve.bank import Adapter, AdapterBank
from metapeft.serve.metrics import ServerMetrics
from metapeft.serve.sampling import Sampling, find_stop, sample

__all__ = ["Delta", "Engine", "Failed", "Finished", "Generation", "Overloaded"]

log = logging.getLogger(__name__)


class Overloaded(Exception):
    """The queue of waiting requests is full."""


@dataclass(frozen=True)
class Delta:
    """New text of a request."""

    text: str


@dataclass(frozen=True)
class Finished:
    """A request's end: ``reason`` is ``stop``, ``length`` or ``cancelled``."""

    reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    """A request the server could not finish."""

    message: str


Event = Delta | Finished | Failed


@dataclass(eq=False)
class Generation:
    """One request as the engine sees it: token ids in, events out.

    Attributes:
        prompt: The prompt's token ids (at least one).
        max_tokens: Tokens to generate at most (``>= 1``).
        sampling: Temperature, top-p and seed.
        stop: Strings that end the text (not included in it).
        adapter: The adapter (held with :meth:`AdapterBank.acquire`; the engine
            releases it when the request ends), or None for the base model.

    Example:
        >>> gen = Generation([1, 5, 9], 16, Sampling(0.0, 1.0, 0))
        >>> engine.submit(gen)
        >>> async for event in gen.events(): ...
    """

    prompt: list[int]
    max_tokens: int
    sampling: Sampling
    stop: tuple[str, ...] = ()
    adapter: Adapter | None = None
    arrived: float = field(init=False, default_factory=time.perf_counter)
    generated: int = field(init=False, default=0)
    cancelled: bool = field(init=False, default=False)
    done: bool = field(init=False, default=False)
    _queue: asyncio.Queue | None = field(init=False, default=None, repr=False)
    _loop: asyncio.AbstractEventLoop | None = field(init=False, default=None, repr=False)

    @property
    def label(self) -> str:
        """The ``adapter`` label of its metrics: the adapter's name, empty for the base."""
        return "" if self.adapter is None else self.adapter.name

    @property
    def slot(self) -> int:
        return 0 if self.adapter is None else self.adapter.slot

    def _bind(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()

    def _send(self, event: Event) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the event loop has closed: nobody is listening
            pass

    async def events(self):
        """The request's events, up to and including its :class:`Finished` or
        :class:`Failed`."""
        while True:
            event = await self._queue.get()
            yield event
            if not isinstance(event, Delta):
                return


class _Row:
    """A request in the running batch: its next input token, text and random stream."""

    def __init__(self, gen: Generation, detokenizer: Any) -> None:
        self.gen = gen
        self.detokenizer = detokenizer
        self.key = None if gen.sampling.greedy else mx.random.key(gen.sampling.seed)
        self.pending = 0
        self.text = ""
        self.sent = 0
        self.last = 0.0

    def next_key(self) -> mx.array | None:
        if self.key is None:
            return None
        self.key, key = mx.random.split(self.key)
        return key


class Engine:
    """Serves :class:`Generation` requests from one model and its adapter bank.

    Args:
        model: An mlx-lm model whose KV cache is ``KVCache`` in every layer.
        tokenizer: Its mlx-lm ``TokenizerWrapper``.
        bank: The adapters, on ``model``.
        metrics: Where to count.
        max_batch_size: Rows decoded together at most.
        max_queue: Requests waiting for a row at most; beyond, :meth:`submit`
            raises :class:`Overloaded`.
        prefill_chunk: Prompt tokens per forward pass while prefilling.

    Example:
        >>> engine = Engine(model, tokenizer, bank, ServerMetrics(), 8, 64)
        >>> engine.start()
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        bank: AdapterBank,
        metrics: ServerMetrics,
        max_batch_size: int,
        max_queue: int,
        prefill_chunk: int = 512,
    ) -> None:
        kinds = {type(c).__name__ for c in make_prompt_cache(model)}
        if kinds != {KVCache.__name__}:
            raise ValueError(
                f"the model's KV cache is {sorted(kinds)}; serving needs mlx-lm's KVCache in "
                "every layer (Llama, Mistral, Qwen2/3 and most dense models)"
            )
        if max_batch_size < 1 or max_queue < 1:
            raise ValueError(
                f"max_batch_size and max_queue must be >= 1, got {max_batch_size}, {max_queue}"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.bank = bank
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self._eos = set(tokenizer.eos_token_ids)
        self._cond = threading.Condition()
        self._waiting: deque[Generation] = deque()
        self._calls: list[tuple[Callable[[], Any], Future]] = []
        self._rows: list[_Row] = []
        self._cache: list[BatchKVCache] | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="metapeft-engine", daemon=True)

    # ------------------------------------------------------------------ other threads

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Ends the loop; requests still running or waiting get :class:`Failed`."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, gen: Generation) -> None:
        """Queues ``gen`` (call from the event loop that reads its events).

        Raises:
            ValueError: If the prompt is empty or ``max_tokens < 1``.
            Overloaded: If ``max_queue`` requests are already waiting.
            RuntimeError: If the engine is not running.
        """
        if not gen.prompt or gen.max_tokens < 1:
            raise ValueError(
                f"a generation needs a prompt and max_tokens >= 1, got {len(gen.prompt)} "
                f"prompt tokens and max_tokens={gen.max_tokens}"
            )
        gen._bind()
        with self._cond:
            if self._stopping or not self.alive:
                raise RuntimeError("the generation engine is not running")
            if len(self._waiting) >= self.max_queue:
                raise Overloaded(f"{len(self._waiting)} requests are already waiting")
            self._waiting.append(gen)
            self.metrics.waiting.set(len(self._waiting))
            self._cond.notify()

    def cancel(self, gen: Generation) -> None:
        """Ends ``gen`` early (its client went away); a no-op once it has ended."""
        with self._cond:
            if gen.done or gen.cancelled:
                return
            gen.cancelled = True
            if gen in self._waiting:
                self._waiting.remove(gen)
                self.metrics.waiting.set(len(self._waiting))
                self._end(gen, "cancelled")
            self._cond.notify()

    def call(self, fn: Callable[[], Any]) -> Future:
        """Runs ``fn`` on the engine's thread between two steps; its result or
        exception lands in the returned future."""
        future: Future = Future()
        with self._cond:
            if self._stopping or not self.alive:
                raise RuntimeError("the generation engine is not running")
            self._calls.append((fn, future))
            self._cond.notify()
        return future

    # ------------------------------------------------------------------ engine thread

    def _run(self) -> None:
        error = "the server is shutting down"
        try:
            while True:
                with self._cond:
                    while not (self._stopping or self._calls or self._waiting or self._rows):
                        self._cond.wait()
                    if self._stopping:
                        break
                    calls, self._calls = self._calls, []
                    room = min(self.max_batch_size - len(self._rows), len(self._waiting))
                    joining = [self._waiting.popleft() for _ in range(room)]
                    self.metrics.waiting.set(len(self._waiting))
                for fn, future in calls:
                    try:
                        future.set_result(fn())
                    except Exception as e:
                        future.set_exception(e)
                self._drop_cancelled()
                for gen in joining:
                    self._admit(gen)
                if self._rows:
                    self._decode()
                self.metrics.running.set(len(self._rows))
                self.metrics.kv_cache_bytes.set(sum(c.nbytes for c in self._cache or []))
        except BaseException as e:
            log.exception("the generation engine stopped")
            error = f"the generation engine stopped: {e}"
        finally:
            with self._cond:
                self._stopping = True
                left = [r.gen for r in self._rows] + list(self._waiting)
                self._waiting.clear()
                calls, self._calls = self._calls, []
            for gen in left:
                self._end(gen, "error", error)
            for _, future in calls:
                future.set_exception(RuntimeError(error))

    def _admit(self, gen: Generation) -> None:
        """Prefills ``gen`` alone, draws its first token and, unless that ends it, adds
        it to the running batch."""
        if gen.cancelled:
            self._end(gen, "cancelled")
            return
        row = _Row(gen, self.tokenizer.detokenizer)
        try:
            self.bank.use([gen.slot])
            cache = make_prompt_cache(self.model)
            prompt = mx.array(gen.prompt)[None]
            for start in range(0, prompt.shape[1], self.prefill_chunk):
                logits = self.model(prompt[:, start : start + self.prefill_chunk], cache=cache)
                mx.eval([c.state for c in cache])
            token = self._sample(logits[:, -1, :], [row])
            mx.eval(token)
        except Exception as e:
            log.exception("prefill failed")
            self._end(gen, "error", f"prefill failed: {e}")
            return
        self.metrics.prompt_tokens.labels(adapter=gen.label).inc(len(gen.prompt))
        if not self._accept(row, token.item()):
            return
        joined = [BatchKVCache.merge([c]) for c in cache]
        if self._cache is None:
            self._cache = joined
        else:
            for batch, new in zip(self._cache, joined, strict=True):
                batch.extend(new)
        self._rows.append(row)

    def _decode(self) -> None:
        """One token for every row of the batch."""
        rows = self._rows
        try:
            self.bank.use([r.gen.slot for r in rows])
            inputs = mx.array([r.pending for r in rows])[:, None]
            logits = self.model(inputs, cache=self._cache)[:, -1, :]
            tokens = self._sample(logits, rows).tolist()
        except Exception as e:
            log.exception("decode step failed")
            for row in rows:
                self._end(row.gen, "error", f"decode step failed: {e}")
            self._keep([])
            return
        self.metrics.decode_batch_size.observe(len(rows))
        going = [self._accept(row, token) for row, token in zip(rows, tokens, strict=True)]
        self._keep([i for i, on in enumerate(going) if on])

    def _sample(self, logits: mx.array, rows: list[_Row]) -> mx.array:
        return sample(
            logits,
            [r.gen.sampling.temperature for r in rows],
            [r.gen.sampling.top_p for r in rows],
            [r.next_key() for r in rows],
        )

    def _accept(self, row: _Row, token: int) -> bool:
        """Takes a row's new token: sends its text and tells whether the row goes on
        (else it has ended: end-of-sequence, stop string or ``max_tokens``)."""
        gen = row.gen
        gen.generated += 1
        now = time.perf_counter()
        if gen.generated == 1:
            self.metrics.time_to_first_token.labels(adapter=gen.label).observe(now - gen.arrived)
        else:
            self.metrics.inter_token_latency.labels(adapter=gen.label).observe(now - row.last)
        row.last = now
        self.metrics.generation_tokens.labels(adapter=gen.label).inc()
        reason = None
        if token in self._eos:
            reason = "stop"
        else:
            row.detokenizer.add_token(token)
        if reason is None and gen.generated >= gen.max_tokens:
            reason = "length"
        if reason is not None:
            row.detokenizer.finalize()
        checked = len(row.text)
        row.text += row.detokenizer.last_segment
        held = 0
        if gen.stop:
            longest = max(map(len, gen.stop))
            at = find_stop(row.text, gen.stop, max(0, checked - longest + 1))
            if at is not None:
                row.text, reason = row.text[:at], "stop"
            held = longest - 1  # a stop string may be starting: keep its length back
        end = len(row.text) if reason is not None else len(row.text) - held
        if end > row.sent:
            gen._send(Delta(row.text[row.sent : end]))
            row.sent = end
        if reason is not None:
            self._end(gen, reason)
            return False
        row.pending = token
        return True

    def _drop_cancelled(self) -> None:
        keep = []
        for i, row in enumerate(self._rows):
            if row.gen.cancelled:
                self._end(row.gen, "cancelled")
            else:
                keep.append(i)
        self._keep(keep)

    def _keep(self, keep: list[int]) -> None:
        """Keeps only the rows ``keep`` of the batch, and their KV cache."""
        if len(keep) == len(self._rows):
            return
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._cache = None
            mx.clear_cache()
        else:
            for c in self._cache:
                c.filter(keep)

    def _end(self, gen: Generation, status: str, error: str | None = None) -> None:
        gen.done = True
        if gen.adapter is not None:
            self.bank.release(gen.adapter)
        self.metrics.requests.labels(adapter=gen.label, status=status).inc()
        if error is not None:
            gen._send(Failed(error))
        else:
            gen._send(Finished(status, len(gen.prompt), gen.generated))
