"""A vLLM server's streams as the seam's StreamUpdates: one request per batch row, all sent at once (the server
batches them), each read as server-sent events in a thread of its own, merged into every pane's state after
each token. A mixin of VllmBackend (utils/serving/backend.py), which holds the tokenizer, `eos_ids`, the
client, the gate, the serving settings and `_model_for`."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack

from utils.core.errors import ServingError
from utils.core.seam import GenerationSettings, PaneState, StreamUpdate, placement

AS_IDS = {"return_tokens_as_token_ids": True}  # logprobs keyed "token_id:N", never ambiguous text


class ServedStreams:
    def stream_rows(self, prompt, rows, settings=None, stop_event=None) -> Iterator[StreamUpdate]:
        settings = settings or GenerationSettings()
        prompts, notices = self.row_prompts(prompt, rows, settings.max_new_tokens)
        strengths, adapters = placement(self, rows)
        return self._stream(
            prompts, rows, strengths, adapters, settings, stop_event or threading.Event(), notices
        )

    def _stream(self, prompts, rows, strengths, adapters, settings, stop_event, notices):
        states = {row.key: PaneState(row.key, row.label) for row in rows}
        events: queue.Queue = queue.Queue()
        started = time.perf_counter()
        finished = False
        with ExitStack() as held:
            names = [
                held.enter_context(self._model_for(s, a)) for s, a in zip(strengths, adapters, strict=True)
            ]
            held.enter_context(self.gate.shared())  # never in a step with a scoring request (backend.py)
            for i, name in enumerate(names):
                body = self._generation_body(name, prompts[i], settings)
                threading.Thread(
                    target=self._pump,
                    args=(i, body, stop_event, events),
                    name="lora-lens-vllm-stream",
                    daemon=True,
                ).start()
            try:
                yield StreamUpdate(states, list(notices), max(len(p) for p in prompts))
                open_rows = len(rows)
                while open_rows:
                    try:
                        kind, i, payload = events.get(timeout=self.serving.timeout_s + 5)
                    except queue.Empty:
                        raise ServingError(self.client._silent()) from None
                    state = states[rows[i].key]
                    if kind == "error":
                        raise payload
                    if kind == "end":
                        open_rows -= 1
                        if not state.done:
                            state.done = True
                            state.finish_reason = "stopped" if stop_event.is_set() else payload
                        continue
                    self._advance(state, payload, time.perf_counter() - started)
                    yield StreamUpdate(states, list(notices), max(len(p) for p in prompts))
                finished = True
                yield StreamUpdate(states, list(notices), max(len(p) for p in prompts), finished=True)
            finally:
                if not finished:
                    stop_event.set()  # the consumer left or a row failed: every other stream closes too

    def _generation_body(
        self, model: str, prompt_ids, settings: GenerationSettings, logprobs: int = 0
    ) -> dict:
        body = {
            "model": model,
            "prompt": list(prompt_ids),
            "max_tokens": settings.max_new_tokens,
            "temperature": settings.temperature,
            "top_p": settings.top_p,
            "ignore_eos": settings.ignore_eos,
            "stop_token_ids": [] if settings.ignore_eos else list(self.eos_ids),
            "return_token_ids": True,
            "skip_special_tokens": False,
            **AS_IDS,
        }
        if not settings.greedy:
            body["seed"] = settings.seed
        if logprobs:
            body["logprobs"] = logprobs
        return body

    def _pump(self, i: int, body: dict, stop_event, events: queue.Queue) -> None:
        """One row's stream, in a thread of its own: token ids onto the queue, then ("end", reason)."""
        reason = "length"
        try:
            for chunk in self.client.stream("/v1/completions", body, stop_event):
                choice = chunk["choices"][0]
                ids = choice.get("token_ids") or []
                if ids:
                    events.put(("tokens", i, ids))
                if choice.get("finish_reason"):
                    reason = "eos" if choice["finish_reason"] == "stop" else "length"
        except Exception as exc:  # handed to the consumer, which raises it as the run's error
            events.put(("error", i, exc if isinstance(exc, ServingError) else ServingError(str(exc))))
        events.put(("end", i, reason))

    def _advance(self, state: PaneState, ids, now: float) -> None:
        added = [state.add(token, now, self.eos_ids) for token in ids]  # every one: a chunk may end in EOS
        if any(added):
            state.text = self.tokenizer.decode(state.token_ids, skip_special_tokens=True)
