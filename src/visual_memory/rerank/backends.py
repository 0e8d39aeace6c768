"""Backends: send a `Prompt` to a vision-language model, return its text and token counts.

Two protocols cover the models people use:

* `OpenAIBackend`: any OpenAI-compatible ``/v1/chat/completions`` endpoint:
  vLLM, Ollama, llama.cpp's server, LM Studio (open VLMs such as Qwen2-VL or
  LLaVA on your own machine) and hosted APIs. Images go as
  ``data:image/jpeg;base64,...`` URLs in ``image_url`` content parts.
* `GeminiBackend`: Google's Gemini API through the official ``google-genai``
  client; images go as inline data parts.

A backend makes exactly one attempt per `complete` call and raises
`BackendError` on failure; `VLMReranker` owns retries, back-off, the
concurrency limit, accounting and the cache, the same for every backend.
(So the OpenAI-compatible backend speaks plain HTTP through ``httpx``, the
client both official SDKs are built on: the ``openai`` SDK would add a second,
hidden retry loop and typed models of fields we do not read.)

API keys come from the environment only: ``VISMEM_RERANK_API_KEY``, then the
provider's usual variable (``OPENAI_API_KEY``; ``GEMINI_API_KEY`` or
``GOOGLE_API_KEY``). A key is sent in a request header, never logged, never
put in an error message, a result, the cache or the memory.
"""

from __future__ import annotations

import base64
import email.utils
import logging
import os
import time
from dataclasses import dataclass
from typing import Optional

from .prompt import Prompt

log = logging.getLogger(__name__)

KEY_ENV = "VISMEM_RERANK_API_KEY"
PROVIDER_KEY_ENV = {"openai": ("OPENAI_API_KEY",), "gemini": ("GEMINI_API_KEY", "GOOGLE_API_KEY")}
DEFAULT_TIMEOUT = 60.0
DEFAULT_MAX_TOKENS = 1024  # room for a JSON answer, and for the thinking that some models do first


@dataclass(frozen=True)
class Completion:
    """What one successful call returned."""

    text: Optional[str]
    input_tokens: Optional[int] = None
    output_tokens: Optional[int] = None
    note: Optional[str] = None  # e.g. the finish reason when no text came back


class BackendError(Exception):
    """One failed attempt.

    Attributes
    ----------
    reason : str
        A `visual_memory.rerank.FALLBACKS` key ("timeout", "rate_limited", ...).
    retryable : bool
        Whether trying again may succeed (429, 5xx, 408, timeouts, refused connections).
    retry_after : float or None
        Seconds the server asked us to wait (``Retry-After``), if it said.
    """

    def __init__(self, reason: str, message: str, *, retryable: bool = False, retry_after: Optional[float] = None,
                 status: Optional[int] = None) -> None:
        super().__init__(message)
        self.reason, self.retryable, self.retry_after, self.status = reason, retryable, retry_after, status


def api_key_from_env(provider: str) -> Optional[str]:
    """``$VISMEM_RERANK_API_KEY``, else the provider's usual variable, else None."""
    for name in (KEY_ENV, *PROVIDER_KEY_ENV.get(provider, ())):
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return None


def parse_retry_after(value: Optional[str], *, now: Optional[float] = None) -> Optional[float]:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date); None if absent or unreadable.

    >>> parse_retry_after("2"), parse_retry_after("0.5"), parse_retry_after(None)
    (2.0, 0.5, None)
    """
    if value is None or not str(value).strip():
        return None
    value = str(value).strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


def status_error(status: int, message: str, retry_after: Optional[float]) -> BackendError:
    """The `BackendError` for an HTTP status: 429 and 5xx (and 408) are retried, other codes are not."""
    if status == 429:
        return BackendError("rate_limited", f"HTTP 429 (rate limited): {message}", retryable=True, retry_after=retry_after, status=status)
    if status >= 500:
        return BackendError("server_error", f"HTTP {status}: {message}", retryable=True, retry_after=retry_after, status=status)
    if status == 408:
        return BackendError("timeout", f"HTTP 408 (request timeout): {message}", retryable=True, retry_after=retry_after, status=status)
    hint = " (check the API key: $VISMEM_RERANK_API_KEY)" if status in (401, 403) else ""
    return BackendError("http_error", f"HTTP {status}{hint}: {message}", status=status)


def _clip(text: str, n: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _data_url(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


class OpenAIBackend:
    """An OpenAI-compatible chat-completions endpoint.

    Parameters
    ----------
    base_url : str
        The API root, e.g. ``http://127.0.0.1:8000/v1`` (vLLM),
        ``http://127.0.0.1:11434/v1`` (Ollama), ``https://api.openai.com/v1``;
        a URL that already ends in ``/chat/completions`` is used as it is.
    model : str
        The served model name (vLLM: the name given to ``vllm serve``).
    api_key : str, optional
        Default: from the environment (`api_key_from_env`); local servers need none.
    timeout : float, default 60
        Seconds per attempt (connect, write, read and pool each).
    max_tokens : int, default 1024
    temperature : float, default 0
    """

    provider = "openai"

    def __init__(self, base_url: str, *, model: str, api_key: Optional[str] = None, timeout: float = DEFAULT_TIMEOUT,
                 max_tokens: int = DEFAULT_MAX_TOKENS, temperature: float = 0.0) -> None:
        import httpx

        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ValueError(f"re-rank endpoint must be an http(s) URL such as http://127.0.0.1:8000/v1; got {base_url!r}")
        _check_common(model, timeout, max_tokens)
        root = base_url.rstrip("/")
        self.url = root if root.endswith("/chat/completions") else root + "/chat/completions"
        self.model = model
        self.max_tokens, self.temperature = int(max_tokens), float(temperature)
        key = api_key if api_key is not None else api_key_from_env(self.provider)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._secrets = [key] if key else []
        self._http = httpx.Client(timeout=httpx.Timeout(timeout), headers=headers, follow_redirects=False)

    def __repr__(self) -> str:  # never the key
        return f"OpenAIBackend(url={self.url!r}, model={self.model!r})"

    def request_body(self, prompt: Prompt) -> dict:
        """The JSON body of the chat-completions request for ``prompt``."""
        content = [{"type": "text", "text": p[1]} if p[0] == "text" else {"type": "image_url", "image_url": {"url": _data_url(p[1])}}
                   for p in prompt.parts]
        return {
            "model": self.model,
            "messages": [{"role": "system", "content": prompt.system}, {"role": "user", "content": content}],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }

    def complete(self, prompt: Prompt) -> Completion:
        """One attempt. Raises `BackendError`."""
        import httpx

        try:
            resp = self._http.post(self.url, json=self.request_body(prompt))
        except httpx.TimeoutException as exc:
            raise BackendError("timeout", f"no answer from {self.url} within {self._http.timeout.read:g} s ({type(exc).__name__})",
                               retryable=True) from None
        except httpx.TransportError as exc:
            raise BackendError("connection", f"cannot reach {self.url}: {redact(str(exc), self._secrets)}", retryable=True) from None
        if resp.status_code >= 400:
            raise status_error(resp.status_code, redact(_error_message(resp), self._secrets),
                               parse_retry_after(resp.headers.get("retry-after")))
        try:
            data = resp.json()
            choice = data["choices"][0]
            content = choice["message"].get("content")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise BackendError("bad_response", f"{self.url} did not answer in the chat-completions shape: {_clip(resp.text)}") from None
        if isinstance(content, list):  # some servers return content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        usage = data.get("usage") or {}
        note = None if content else f"no text (finish_reason {choice.get('finish_reason')!r})"
        return Completion(content if isinstance(content, str) else None, _int(usage.get("prompt_tokens")),
                          _int(usage.get("completion_tokens")), note)

    def close(self) -> None:
        self._http.close()


class GeminiBackend:
    """Google's Gemini API through the ``google-genai`` client.

    Parameters
    ----------
    model : str
        E.g. "gemini-2.5-flash" (the paper used Gemini 1.5 Flash, since retired).
    api_key : str, optional
        Default: ``$VISMEM_RERANK_API_KEY``, ``$GEMINI_API_KEY`` or
        ``$GOOGLE_API_KEY``. Required (a `ValueError` names the variables).
    base_url : str, optional
        Another endpoint speaking the Gemini API (a proxy; a test double on
        127.0.0.1). Default: Google's.
    timeout : float, default 60
        Seconds per attempt.
    max_tokens : int, default 1024
        ``max_output_tokens``; thinking models spend part of it before answering.
    api_version : str, optional
        Default: the client's (google-genai 3.x: "v1").
    """

    provider = "gemini"

    def __init__(self, *, model: str, api_key: Optional[str] = None, base_url: Optional[str] = None,
                 timeout: float = DEFAULT_TIMEOUT, max_tokens: int = DEFAULT_MAX_TOKENS, temperature: float = 0.0,
                 api_version: Optional[str] = None) -> None:
        try:
            import httpx
            from google import genai
            from google.genai import types
        except ImportError:
            raise ImportError("the Gemini backend needs google-genai: pip install 'visual-memory[rerank]'") from None
        _check_common(model, timeout, max_tokens)
        key = api_key if api_key is not None else api_key_from_env(self.provider)
        if not key:
            raise ValueError(f"the Gemini API needs a key: set ${KEY_ENV} (or $GEMINI_API_KEY / $GOOGLE_API_KEY)")
        self.model, self.max_tokens, self.temperature = model, int(max_tokens), float(temperature)
        self.base_url = base_url
        self._secrets = [key]
        self._types = types
        self._timeout = float(timeout)
        options = types.HttpOptions(
            base_url=base_url, api_version=api_version, timeout=int(timeout * 1000),
            # One attempt per call: the reranker retries, with the same policy for every backend.
            retry_options=types.HttpRetryOptions(attempts=1),
            httpx_client=httpx.Client(timeout=httpx.Timeout(timeout)),
        )
        self._client = genai.Client(api_key=key, vertexai=False, http_options=options)

    def __repr__(self) -> str:
        return f"GeminiBackend(model={self.model!r}, base_url={self.base_url!r})"

    def contents(self, prompt: Prompt) -> list:
        t = self._types
        parts = [t.Part.from_text(text=p[1]) if p[0] == "text" else t.Part.from_bytes(data=p[1], mime_type="image/jpeg")
                 for p in prompt.parts]
        return [t.Content(role="user", parts=parts)]

    def complete(self, prompt: Prompt) -> Completion:
        """One attempt. Raises `BackendError`."""
        import httpx
        from google.genai import errors

        config = self._types.GenerateContentConfig(system_instruction=prompt.system, temperature=self.temperature,
                                                   max_output_tokens=self.max_tokens)
        try:
            resp = self._client.models.generate_content(model=self.model, contents=self.contents(prompt), config=config)
        except errors.APIError as exc:
            headers = getattr(getattr(exc, "response", None), "headers", None) or {}
            retry_after = parse_retry_after(headers.get("retry-after")) if hasattr(headers, "get") else None
            raise status_error(int(exc.code or 0), redact(_clip(exc.message or str(exc)), self._secrets), retry_after) from None
        except httpx.TimeoutException as exc:
            raise BackendError("timeout", f"no answer from the Gemini API within {self._timeout:g} s ({type(exc).__name__})",
                               retryable=True) from None
        except httpx.TransportError as exc:
            raise BackendError("connection", f"cannot reach the Gemini API: {redact(str(exc), self._secrets)}", retryable=True) from None
        except ValueError as exc:  # the client could not read the body
            raise BackendError("bad_response", f"the Gemini API answered in an unexpected shape: {redact(_clip(str(exc)), self._secrets)}") from None
        usage = resp.usage_metadata
        out_tokens = None
        if usage is not None and usage.candidates_token_count is not None:
            out_tokens = usage.candidates_token_count + (usage.thoughts_token_count or 0)  # thinking is billed as output
        text = resp.text
        note = None
        if not text:
            cand = (resp.candidates or [None])[0]
            note = f"no text (finish reason {getattr(cand, 'finish_reason', None)})"
        return Completion(text, _int(getattr(usage, "prompt_token_count", None)), _int(out_tokens), note)

    def close(self) -> None:
        self._client.close()


def _check_common(model, timeout, max_tokens) -> None:
    if not isinstance(model, str) or not model.strip():
        raise ValueError("a re-rank model name is required (e.g. --rerank-model Qwen/Qwen2-VL-7B-Instruct)")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"re-rank timeout must be a positive number of seconds; got {timeout!r}")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"re-rank max_tokens must be a positive integer; got {max_tokens!r}")


def _int(x) -> Optional[int]:
    return int(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _error_message(resp) -> str:
    try:
        data = resp.json()
        err = data.get("error", data) if isinstance(data, dict) else data
        msg = err.get("message") if isinstance(err, dict) else None
        return _clip(msg or resp.text)
    except ValueError:
        return _clip(resp.text or resp.reason_phrase)


def redact(text: str, secrets) -> str:
    """``text`` with every secret replaced by "***" (errors can echo request details)."""
    for s in secrets:
        if s:
            text = text.replace(s, "***")
    return text


def backend_from_url(url: str, *, model: str, timeout: float = DEFAULT_TIMEOUT, max_tokens: int = DEFAULT_MAX_TOKENS):
    """The backend a ``--rerank`` value names.

    ``gemini`` is Google's Gemini API; ``gemini+http(s)://HOST[:PORT]`` the
    Gemini API at another base URL (a proxy, a local double); any other
    ``http(s)://`` URL an OpenAI-compatible endpoint (e.g.
    ``http://127.0.0.1:8000/v1`` for ``vllm serve``).
    """
    if url == "gemini":
        return GeminiBackend(model=model, timeout=timeout, max_tokens=max_tokens)
    if url.startswith("gemini+"):
        return GeminiBackend(model=model, base_url=url[len("gemini+"):], timeout=timeout, max_tokens=max_tokens)
    if url.startswith(("http://", "https://")):
        return OpenAIBackend(url, model=model, timeout=timeout, max_tokens=max_tokens)
    raise ValueError(f"--rerank must be an OpenAI-compatible URL (http://127.0.0.1:8000/v1), 'gemini' or 'gemini+URL'; got {url!r}")
