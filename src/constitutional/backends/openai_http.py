"""The `openai` backend's HTTP client: POSTs to the server with retries, and the server's errors
as one-line messages (`OpenAIBackend` in `openai.py` is built on it).

Retries: connection errors (refused, reset, dropped), timeouts, HTTP 5xx, 408, 429 and a 200 with
invalid JSON are retried up to max_retries times, sleeping `min(max_backoff, backoff * 2**k)` times a
factor uniform in [0.5, 1] ("equal jitter") before retry k, or a numeric Retry-After (capped by
max_backoff). Any other 4xx fails at once with the server's message. Counts are in `self.stats`.
"""

from __future__ import annotations

import http.client
import json
import logging
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from ..errors import UserError

log = logging.getLogger("constitutional.backends.openai")


class ClientError(UserError):
    """A 4xx the request cannot recover from (kept apart so echo probing can fall back)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class HTTPClient:
    """`OpenAIBackend`'s requests: `_post` with the retry policy above, `_map` for concurrency, counts in `stats`."""

    def _count(self, key: str, k: int = 1) -> None:
        with self._stats_lock:
            self.stats[key] = self.stats.get(key, 0) + k

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def _post(self, path: str, body: dict) -> dict:
        """POST JSON to `{base}{path}` with retries; the decoded JSON response."""
        url = self.base_url + path
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        self._count("requests")
        last = "no attempt"
        for attempt in range(self.max_retries + 1):
            self._count("attempts")
            wait = None
            try:
                req = urllib.request.Request(url, data=data, headers=headers, method="POST")
                with self._opener.open(req, timeout=self.timeout) as resp:
                    raw = resp.read()
                try:
                    out = json.loads(raw)
                    if not isinstance(out, dict):
                        raise ValueError
                    return out
                except ValueError:
                    kind, last = "invalid_json", "invalid JSON in a 200 response"
            except urllib.error.HTTPError as e:
                msg = self._server_message(e)
                if not (e.code >= 500 or e.code in (408, 429)):
                    raise ClientError(self._client_error(url, e.code, msg), e.code) from None
                kind, last = ("http_5xx" if e.code >= 500 else f"http_{e.code}"), f"HTTP {e.code} ({msg})"
                try:
                    wait = min(self.max_backoff, max(0.0, float(e.headers.get("Retry-After", ""))))
                except (TypeError, ValueError, AttributeError):
                    wait = None
            except urllib.error.URLError as e:  # connect failed: the reason is the socket error
                timeout = isinstance(e.reason, TimeoutError)
                kind, last = ("timeouts" if timeout else "connection_errors"), self._redact(f"cannot connect ({e.reason})")
            except TimeoutError:
                kind, last = "timeouts", f"no response within {self.timeout:g} s (CAI_OPENAI_TIMEOUT)"
            except (http.client.HTTPException, OSError) as e:  # reset, RemoteDisconnected, IncompleteRead
                kind, last = "connection_errors", self._redact(f"connection dropped ({type(e).__name__}: {e})"[:240])
            self._count(kind)
            if attempt == self.max_retries:
                break
            if wait is None:
                wait = min(self.max_backoff, self.backoff * 2**attempt) * self._rng.uniform(0.5, 1.0)
            self._count("retries")
            log.warning("openai server %s: %s; retry %d/%d in %.1f s", self.base_url, last, attempt + 1, self.max_retries, wait)
            self._sleep(wait)
        self._count("failures")
        raise UserError(
            f"openai server {self.base_url}: {last} after {self.max_retries + 1} attempts; "
            "check that the server is up (a rerun resumes where this stopped)"
        )

    def _server_message(self, e: urllib.error.HTTPError) -> str:
        try:
            raw = e.read().decode("utf-8", "replace")
        except Exception:  # the body is only for the message
            raw = ""
        msg = raw
        try:
            body = json.loads(raw)
            err = body.get("error", body) if isinstance(body, dict) else body
            msg = (err.get("message") or err.get("detail") or json.dumps(err)) if isinstance(err, dict) else str(err)
        except ValueError:
            pass
        msg = " ".join(self._redact(str(msg)).split()) or (e.reason or "no message")
        return msg[:200] + ("..." if len(msg) > 200 else "")

    def _client_error(self, url: str, status: int, msg: str) -> str:
        head = f"openai server {url}: HTTP {status} ({msg}); "
        if status in (401, 403):
            return head + f"check the API key in the environment variable {self.api_key_env} (CAI_OPENAI_API_KEY_ENV names another)"
        if status == 404:
            return head + f"the endpoint or model name was not found on the server; check the API base URL (usually ending in /v1) and the model {self.model!r}"
        return head + "the server rejected the request; check the model name and the server's limits"

    def _map(self, fn, items: list) -> list:
        """fn over items, at most max_concurrency at a time, results in order."""
        if len(items) <= 1:
            return [fn(x) for x in items]
        pool = ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(items)), thread_name_prefix="cai-openai")
        try:
            return list(pool.map(fn, items))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # a failure cancels what has not started

    @staticmethod
    def _choice(resp: dict, url: str) -> dict:
        choices = resp.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            err = resp.get("error")
            raise UserError(f"openai server {url}: a response without choices ({str(err or resp)[:200]}); is this an OpenAI-compatible API base?")
        return choices[0]
