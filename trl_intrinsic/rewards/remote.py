"""Rewards scored by another process or machine over HTTP: :class:`RemoteReward`, :class:`AsyncRemoteReward`.

A reward model that does not fit beside the policy, or needs other dependencies, runs in a server of its
own (``python -m trl_intrinsic.rewards.serve clip_score --port 8000``, see
:mod:`trl_intrinsic.rewards.serve`) and the trainer sends it its images::

    reward = RemoteReward("http://gpu-box:8000/score", name="clip_score")
    FlowGRPOTrainer(model, reward_funcs=[solace_reward, reward], ...)

What is sent: the images as PNG, their prompts and the dataset columns named in ``forward_columns``
(JSON values only; the wire format is in :mod:`trl_intrinsic.rewards.protocol`), in requests of at most
``batch_size`` images, ``max_concurrency`` requests in flight at once. No other keyword of the trainer
leaves the process (no tensors, no callables). Rows whose image is ``None`` are not sent and get ``None``.

**Synchronous or asynchronous.**

* :class:`RemoteReward` is a synchronous reward: ``reward(prompts=..., images=...)`` returns the list of
  rewards wherever it is called (a script, a notebook, every trainer), after sending its batches
  concurrently on a private event loop. ``await reward.acall(...)`` does the same from async code.
* :class:`AsyncRemoteReward` takes the same arguments, but its ``__call__`` is a coroutine function.
  The flow trainers and TRL's ``GRPOTrainer`` (hence ``IntrinsicGRPOTrainer``) await all async rewards
  of a batch together, so several remote rewards score at the same time. The flow trainers start the
  async rewards before calling the synchronous ones, so a remote reward also overlaps a local one such as
  SOLACE; TRL's ``GRPOTrainer`` awaits them after the synchronous ones.

**Failures.** Connection errors, timeouts (``timeout`` seconds per request) and 429/5xx answers are
retried ``max_retries`` times, after ``backoff_factor · 2^k`` seconds (at most ``backoff_max``; a
longer ``Retry-After`` is honoured up to ``backoff_max``). Then :class:`RemoteRewardError` names the
URL, the attempts, the last failure and the likely fix; the trainers stop with it as the cause. Other
4xx answers (a malformed request, a reward refusing its inputs) are not retried.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any, NamedTuple
from urllib.parse import urlsplit, urlunsplit

from PIL import Image

from trl_intrinsic.rewards.protocol import SCORE_PATH, decode_response, encode_request
from trl_intrinsic.validation import Range, check_ranges

__all__ = ["AsyncRemoteReward", "RemoteReward", "RemoteRewardError"]

_RULES = (
    Range("batch_size", low=1, integer=True, fix="the number of images per request, e.g. 16."),
    Range("max_concurrency", low=1, integer=True, fix="the number of requests in flight at once, e.g. 4."),
    Range("timeout", low=0, low_open=True, fix="seconds to wait for one request, e.g. 60."),
    Range("max_retries", low=0, integer=True, fix="0 fails on the first error."),
    Range("backoff_factor", low=0, fix="seconds before the first retry, e.g. 0.5."),
    Range("backoff_max", low=0, fix="the longest wait between two attempts in seconds, e.g. 30."),
)
_RESERVED = ("prompts", "images", "completions")


def _httpx() -> Any:
    try:
        import httpx
    except ImportError as err:
        raise ImportError(
            'RemoteReward needs the `httpx` package. Install it with: pip install "trl-intrinsic[remote]"'
        ) from err
    return httpx


class RemoteRewardError(RuntimeError):
    """A remote reward could not score a batch: the server was unreachable, too slow, failing or refused it.

    Attributes:
        url: the scoring endpoint.
        attempts: the requests made for the failed batch.
    """

    def __init__(self, message: str, *, url: str, attempts: int) -> None:
        super().__init__(message)
        self.url, self.attempts = url, attempts


class _Job(NamedTuple):
    """One call's work: the rows that have an image, their prompts, images and forwarded column values."""

    num_samples: int
    rows: list[int]
    prompts: list[str]
    images: list[Any]
    columns: dict[str, list[Any]]


class RemoteReward:
    """A reward computed by a server (``python -m trl_intrinsic.rewards.serve``), called like a local one.

    Called as a flow reward ``reward(prompts, images, **kwargs)`` or a TRL/Janus reward
    ``reward(prompts=..., completions=[PIL images], **kwargs)``; returns ``list[float | None]`` of the
    images' length, ``None`` where the image is ``None`` or the server's reward does not apply. The call
    is synchronous: it returns once every batch is scored (the batches are sent concurrently), in any
    context; ``await reward.acall(...)`` from async code. ``AsyncRemoteReward`` is the same reward
    as an async callable, which the trainers await together with their other async rewards. Arguments
    are checked here, before any request; nothing is sent until the first call.

    Args:
        url: the scoring endpoint, ``http(s)://host:port/score`` (a URL without a path gets ``/score``).
        name: the reward's name in the trainers' logs (``rewards/<name>/mean``).
        batch_size: images per request.
        max_concurrency: requests in flight at once.
        timeout: seconds to wait for one request (connecting, sending, scoring, answering).
        max_retries: further attempts after a connection error, a timeout or a 429/5xx answer.
        backoff_factor: seconds before the first retry; doubled at each further one.
        backoff_max: the longest wait between two attempts, in seconds.
        forward_columns: dataset columns (keywords of the call) sent with the images, e.g. ``("metadata",)``
            for the toy world's verifier; their values must be JSON-serialisable.
        headers: extra HTTP headers of every request (e.g. an ``Authorization`` token for a gateway).
    """

    requires_images = True

    def __init__(
        self,
        url: str,
        *,
        name: str = "remote_reward",
        batch_size: int = 16,
        max_concurrency: int = 4,
        timeout: float = 60.0,
        max_retries: int = 3,
        backoff_factor: float = 0.5,
        backoff_max: float = 30.0,
        forward_columns: Sequence[str] = (),
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.url = _check_url(url)
        if not isinstance(name, str) or not name:
            raise TypeError(f"`name` must be a non-empty string (the reward's name in logs), got {name!r}.")
        self.batch_size, self.max_concurrency, self.timeout = batch_size, max_concurrency, timeout
        self.max_retries, self.backoff_factor, self.backoff_max = max_retries, backoff_factor, backoff_max
        check_ranges(self, _RULES)
        self.forward_columns = _check_columns(forward_columns)
        if headers is not None and not (
            isinstance(headers, Mapping) and all(isinstance(v, str) for v in [*headers, *headers.values()])
        ):
            raise TypeError(f"`headers` must map header names to string values, got {headers!r}.")
        self.headers = dict(headers or {})
        self.__name__ = name
        _httpx()  # fail now, not at the first training step, if the client library is missing

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.url!r}, name={self.__name__!r}, batch_size={self.batch_size}, "
            f"max_concurrency={self.max_concurrency}, timeout={self.timeout:g}, "
            f"max_retries={self.max_retries}"
            + (f", forward_columns={self.forward_columns}" if self.forward_columns else "")
            + ")"
        )

    def __call__(
        self,
        prompts: Sequence[str],
        images: Sequence[Any] | None = None,
        *,
        completions: Sequence[Any] | None = None,
        **kwargs: Any,
    ) -> list[float | None]:
        """Score the images and wait for the rewards (``None`` where an image is ``None``)."""
        return _run_to_completion(self._score(self._job(prompts, images, completions, kwargs)))

    async def acall(
        self,
        prompts: Sequence[str],
        images: Sequence[Any] | None = None,
        *,
        completions: Sequence[Any] | None = None,
        **kwargs: Any,
    ) -> list[float | None]:
        """The call, for async code: the requests run on the caller's event loop."""
        return await self._score(self._job(prompts, images, completions, kwargs))

    # -- one call ---------------------------------------------------------------------------------

    def _job(self, prompts: Any, images: Any, completions: Any, kwargs: dict[str, Any]) -> _Job:
        """Check a call's arguments; pick what is sent: the rows with an image, the forwarded columns."""
        images = completions if images is None else images
        if images is None:
            raise ValueError(
                f"{self.__name__}: pass `images` (flow trainers) or `completions` (PIL images, Janus)."
            )
        if isinstance(prompts, str) or len(prompts) != len(images):
            raise ValueError(
                f"{self.__name__}: got {len(prompts)} prompts for {len(images)} images; give one each."
            )
        images = [im[0] if isinstance(im, (list, tuple)) and len(im) == 1 else im for im in images]
        rows = [i for i, image in enumerate(images) if image is not None]
        for i in rows:
            if not isinstance(images[i], Image.Image):
                raise TypeError(
                    f"{self.__name__}: images[{i}] is a {type(images[i]).__name__}; "
                    "expected PIL images (or None)."
                )
            if not isinstance(prompts[i], str):
                raise TypeError(
                    f"{self.__name__}: prompts[{i}] is a {type(prompts[i]).__name__}, not a string."
                )
        columns = {}
        for name in self.forward_columns:
            if name not in kwargs:
                passed = sorted(k for k, v in kwargs.items() if isinstance(v, list))
                raise ValueError(
                    f"{self.__name__}: `forward_columns` names {name!r} but the call has no such keyword "
                    f"(list-valued keywords passed: {passed}); check the dataset's column names."
                )
            values = kwargs[name]
            if not isinstance(values, (list, tuple)) or len(values) != len(images):
                raise TypeError(
                    f"{self.__name__}: column {name!r} must be a list of {len(images)} values "
                    f"(one per image), got {type(values).__name__}."
                )
            columns[name] = [values[i] for i in rows]
            try:
                json.dumps(columns[name])
            except (TypeError, ValueError) as err:
                raise TypeError(
                    f"{self.__name__}: column {name!r} cannot be sent as JSON ({err}); forward only "
                    "dataset columns of strings, numbers, lists and dicts — never tensors or callables."
                ) from None
        return _Job(len(images), rows, [prompts[i] for i in rows], [images[i] for i in rows], columns)

    async def _score(self, job: _Job) -> list[float | None]:
        """Send the job's batches concurrently; the rewards in the call's order."""
        out: list[float | None] = [None] * job.num_samples
        if not job.rows:
            return out
        httpx = _httpx()
        starts = range(0, len(job.rows), self.batch_size)
        gate = asyncio.Semaphore(self.max_concurrency)
        limits = httpx.Limits(
            max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency
        )
        async with httpx.AsyncClient(timeout=self.timeout, limits=limits, headers=self.headers) as client:
            tasks = [asyncio.ensure_future(self._batch(client, gate, job, s)) for s in starts]
            try:
                results = await asyncio.gather(*tasks)
            finally:  # on the first failure, stop the other batches before the client closes
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        for start, values in zip(starts, results, strict=True):
            for offset, value in enumerate(values):
                out[job.rows[start + offset]] = value
        return out

    async def _batch(self, client: Any, gate: asyncio.Semaphore, job: _Job, start: int) -> list[float | None]:
        window = slice(start, start + self.batch_size)
        async with gate:
            columns = {name: values[window] for name, values in job.columns.items()}
            body = await asyncio.to_thread(encode_request, job.prompts[window], job.images[window], columns)
            return await self._post(client, body, len(job.prompts[window]))

    async def _post(self, client: Any, body: dict[str, Any], num_images: int) -> list[float | None]:
        """One batch's request, retried; its rewards or :class:`RemoteRewardError`."""
        httpx = _httpx()
        images = f"{num_images} image{'s' * (num_images != 1)}"
        who = f"RemoteReward {self.__name__!r} could not score a batch of {images} at {self.url}"
        failure, hint, delay = "", "", 0.0
        for attempt in range(self.max_retries + 1):
            if attempt:
                await asyncio.sleep(delay)
            try:
                response = await asyncio.wait_for(client.post(self.url, json=body), self.timeout)
            except (httpx.TimeoutException, asyncio.TimeoutError):
                failure, hint = f"no answer within timeout={self.timeout:g} s", _SLOW
                delay = self._backoff(attempt)
                continue
            except httpx.TransportError as err:
                failure, hint = f"{type(err).__name__}: {err or 'the connection failed'}", _down(self.url)
                delay = self._backoff(attempt)
                continue
            status = response.status_code
            if status == 429 or status >= 500:
                failure, hint = f"HTTP {status}: {_detail(response)}", _FAILING
                delay = self._backoff(attempt, response.headers.get("retry-after"))
                continue
            if status != 200:
                raise RemoteRewardError(
                    f"{who}: the server refused it (HTTP {status}: {_detail(response)}). Not retried: "
                    "fix the request (e.g. `forward_columns`) or the server's reward.",
                    url=self.url,
                    attempts=attempt + 1,
                )
            try:
                return decode_response(response.json(), num_images)
            except ValueError as err:
                raise RemoteRewardError(
                    f"{who}: its answer is malformed ({err}). Is this a trl_intrinsic reward server "
                    "(`python -m trl_intrinsic.rewards.serve`)?",
                    url=self.url,
                    attempts=attempt + 1,
                ) from None
        attempts = self.max_retries + 1
        raise RemoteRewardError(
            f"{who} after {attempts} attempt{'s' * (attempts > 1)} (max_retries={self.max_retries}); "
            f"last failure: {failure}. {hint}",
            url=self.url,
            attempts=attempts,
        )

    def _backoff(self, attempt: int, retry_after: str | None = None) -> float:
        """Seconds to wait after failed attempt ``attempt`` (0-based)."""
        delay = self.backoff_factor * 2.0**attempt
        if retry_after is not None:
            with contextlib.suppress(ValueError):  # an HTTP date keeps the exponential delay
                delay = max(delay, float(retry_after))
        return min(delay, self.backoff_max)


class AsyncRemoteReward(RemoteReward):
    """``RemoteReward`` whose call is a coroutine function, for trainers that await async rewards.

    The trainers (``FlowGRPOTrainer``, ``DiffusionNFTTrainer``, TRL's ``GRPOTrainer`` and
    ``IntrinsicGRPOTrainer``) await every async reward of a batch together, so several remote rewards score
    at the same time. Same arguments and results as ``RemoteReward``; ``await reward(prompts=...,
    images=...)`` outside a trainer.
    """

    async def __call__(  # type: ignore[override]
        self,
        prompts: Sequence[str],
        images: Sequence[Any] | None = None,
        *,
        completions: Sequence[Any] | None = None,
        **kwargs: Any,
    ) -> list[float | None]:
        """Score the images; the rewards once the server answered."""
        return await self.acall(prompts, images, completions=completions, **kwargs)


# ---------------------------------------------------------------------------------------------- helpers
_SLOW = (
    "The server is slower than `timeout`: raise `timeout`, lower `batch_size` or `max_concurrency`, or check "
    "the server's load (its first request may be loading the model)."
)
_FAILING = "The server failed on it; its log has the traceback."


def _down(url: str) -> str:
    port = urlsplit(url).port or (443 if url.startswith("https") else 80)
    return (
        "Is the reward server running and reachable from here? Start it with "
        f"`python -m trl_intrinsic.rewards.serve <reward> --port {port}` (add `--host 0.0.0.0` to accept "
        "requests from other machines)."
    )


def _detail(response: Any) -> str:
    """The server's ``detail`` message, or the start of its body."""
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    return str(detail if detail is not None else response.text[:300] or response.reason_phrase)


def _check_url(url: Any) -> str:
    example = "e.g. 'http://localhost:8000/score'"
    if not isinstance(url, str):
        raise TypeError(f"`url` must be a string, {example}; got {type(url).__name__}.")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError for an invalid port)
    except ValueError as err:
        raise ValueError(f"`url` {url!r} is not a valid URL ({err}); {example}.") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"`url` must be an http:// or https:// URL with a host, {example}; got {url!r}.")
    if parts.path in ("", "/"):
        parts = parts._replace(path=SCORE_PATH)
    return urlunsplit(parts)


def _check_columns(columns: Any) -> tuple[str, ...]:
    if isinstance(columns, str) or not isinstance(columns, Sequence):
        raise TypeError(
            f"`forward_columns` must be a sequence of column names, e.g. ('metadata',); got {columns!r}."
        )
    for name in columns:
        if not isinstance(name, str) or not name:
            raise TypeError(f"`forward_columns` must hold column names (strings), got {name!r}.")
        if name in _RESERVED:
            raise ValueError(
                f"`forward_columns` cannot hold {name!r}: prompts and images are always sent; remove it."
            )
    return tuple(columns)


def _run_to_completion(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """Run ``coroutine`` on a new event loop and return its result, from synchronous code."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    # An event loop already runs in this thread (a notebook, async code) and cannot run another: use a thread.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coroutine).result()
