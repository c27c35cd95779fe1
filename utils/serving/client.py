"""The HTTP calls to an OpenAI-compatible vLLM server: JSON requests and server-sent-event streams, each with a
time-out, and every failure (refused, silent, an error answer) turned into a `ServingError` that says what to
do. Standard library only, so a view process needs nothing else to talk to a server."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

from utils.core.errors import ServingError


class VllmClient:
    """One server's root URL and the time-out every call gets (connect, and each wait for bytes)."""

    def __init__(self, url: str, timeout_s: float = 120.0):
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s

    def get(self, path: str, timeout_s: float | None = None) -> dict:
        return self._json(urllib.request.Request(self.url + path), timeout_s)

    def post(self, path: str, body: dict, timeout_s: float | None = None) -> dict:
        return self._json(self._request(path, body), timeout_s)

    def post_text(self, path: str, body: dict) -> str:
        """A POST whose answer is plain text (vLLM's adapter registration answers so)."""
        with self._open(self._request(path, body), None) as response:
            return response.read().decode("utf-8", "replace")

    def stream(self, path: str, body: dict, stop_event: threading.Event | None = None) -> Iterator[dict]:
        """The chunks of a streamed answer (`"stream": true`), until [DONE]; a set stop_event closes the
        connection, which makes the server abort the request."""
        with self._open(self._request(path, {**body, "stream": True}), None) as response:
            try:
                for raw in response:
                    if stop_event is not None and stop_event.is_set():
                        return
                    line = raw.decode("utf-8", "replace").strip()
                    if not line.startswith("data:"):
                        continue
                    data = line[len("data:") :].strip()
                    if data == "[DONE]":
                        return
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise ServingError(self._refused(chunk["error"]))
                    yield chunk
            except TimeoutError:
                raise ServingError(self._silent()) from None
            except (ConnectionError, OSError) as exc:
                raise ServingError(f"The vLLM server at {self.url} dropped the stream ({exc}).") from None

    def ping(self) -> float:
        """Milliseconds a /v1/models call takes (raises ServingError where the server cannot be reached)."""
        started = time.perf_counter()
        self.get("/v1/models", timeout_s=min(self.timeout_s, 10.0))
        return (time.perf_counter() - started) * 1000

    def _request(self, path: str, body: dict) -> urllib.request.Request:
        return urllib.request.Request(
            self.url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )

    def _json(self, request: urllib.request.Request, timeout_s: float | None) -> dict:
        with self._open(request, timeout_s) as response:
            try:
                return json.loads(response.read())
            except TimeoutError:
                raise ServingError(self._silent()) from None
            except ValueError:
                raise ServingError(
                    f"The server at {self.url} answered with something other than JSON."
                ) from None

    def _open(self, request: urllib.request.Request, timeout_s: float | None):
        try:
            return urllib.request.urlopen(request, timeout=timeout_s or self.timeout_s)
        except urllib.error.HTTPError as exc:
            try:
                detail = json.loads(exc.read()).get("error", {})
            except (ValueError, AttributeError, OSError):
                detail = {"message": exc.reason}
            raise ServingError(self._refused(detail, exc.code)) from None
        except TimeoutError:
            raise ServingError(self._silent()) from None
        except urllib.error.URLError as exc:
            reason = exc.reason
            if isinstance(reason, (TimeoutError, socket.timeout)):
                raise ServingError(self._silent()) from None
            raise ServingError(
                f"The vLLM server at {self.url} cannot be reached ({reason}). Start it (the README's "
                "'Serving from vLLM' says how), or run the in-process engine (LORA_LENS_BACKEND=local)."
            ) from None
        except (ConnectionError, OSError) as exc:
            raise ServingError(f"The vLLM server at {self.url} cannot be reached ({exc}).") from None

    def _silent(self) -> str:
        return (
            f"The vLLM server at {self.url} did not answer within {self.timeout_s:g} s (LORA_LENS_VLLM_TIMEOUT_S); "
            "it may be overloaded or still starting. Try again shortly."
        )

    def _refused(self, detail, code: int | None = None) -> str:
        message = detail.get("message") if isinstance(detail, dict) else str(detail)
        status = f" ({code})" if code else ""
        return f"The vLLM server at {self.url} refused the request{status}: {str(message)[:300]}"
