"""Serve an image reward over HTTP for ``RemoteReward`` (``trl_intrinsic.rewards.remote``), e.g.::

    python -m trl_intrinsic.rewards.serve clip_score --port 8000
    python -m trl_intrinsic.rewards.serve verifier_reward --host 0.0.0.0 --port 8000 --batch-size 64
    python -m trl_intrinsic.rewards.serve my_package.rewards:my_reward --port 8001

The reward is a name exported by ``trl_intrinsic.rewards`` (``clip_score``, ``pick_score``,
``ocr_score``, ``verifier_reward``, ``verifier_reward_partial``) or ``module:attribute`` for any callable
``f(prompts=, images=, **columns) -> list[float | None]``. It is called with ``prompts``, PIL ``images``
(also passed as ``completions``) and the forwarded dataset columns; rewards that need the trainer's model
(``solace_reward``, ``nsc_reward``: ``requires_images = False``) cannot be served.

Endpoints and schema: ``trl_intrinsic.rewards.protocol`` (``POST /score``, ``GET /health``). The server
scores one request at a time, in order of arrival, in calls of at most ``--batch-size`` images; a model the
reward loads lazily (the external scorers) is loaded by the first request. It has no authentication: bind it
to ``127.0.0.1`` (the default) or a private network. Needs ``pip install "trl-intrinsic[serve]"``.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations (`Request`, imported
# inside `app_for`) at runtime.
import argparse
import asyncio
import importlib
import inspect
import logging
from collections.abc import Callable, Sequence
from typing import Any

from trl_intrinsic.rewards.protocol import HEALTH_PATH, SCORE_PATH, decode_request, encode_response

__all__ = ["app_for", "load_reward", "main"]

logger = logging.getLogger(__name__)


def _missing(package: str) -> ImportError:
    return ImportError(
        f"The reward server needs the `{package}` package. "
        'Install it with: pip install "trl-intrinsic[serve]"'
    )


def load_reward(spec: str) -> Callable[..., Any]:
    """The reward named ``spec``: a name of ``trl_intrinsic.rewards`` or ``"module:attribute"``.

    Raises:
        ValueError: unknown name, or a reward that does not score images (``requires_images = False``).
    """
    if ":" in spec:
        module, _, attribute = spec.partition(":")
        try:
            reward = getattr(importlib.import_module(module), attribute)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"Cannot load reward {spec!r} ({err}); expected 'module:attribute'.") from err
    else:
        from trl_intrinsic.rewards import reward_by_name

        reward = reward_by_name(spec)
    if not callable(reward):
        raise ValueError(f"Reward {spec!r} is a {type(reward).__name__}, not a callable.")
    if getattr(reward, "requires_images", True) is False:
        raise ValueError(
            f"Reward {spec!r} does not score pixels (requires_images=False): it needs the trainer's model or "
            "logits, which cannot be sent over HTTP. Serve an image reward such as clip_score."
        )
    return reward


def app_for(reward: Callable[..., Any], *, name: str | None = None, batch_size: int | None = None) -> Any:
    """A FastAPI app serving ``reward`` (sync or async) at ``POST /score`` and ``GET /health``.

    Args:
        reward: called ``reward(prompts=, images=, completions=, **columns)``; one value or ``None`` per
            image.
        name: reported by ``/health`` and in error messages (default: the reward's ``__name__``).
        batch_size: at most this many images per call of the reward (``None``: the whole request).
    """
    try:
        from fastapi import FastAPI, HTTPException, Request
    except ImportError as err:
        raise _missing("fastapi") from err
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
    ):
        raise ValueError(f"`batch_size` must be a positive int or None, got {batch_size!r}.")
    name = name or getattr(reward, "__name__", type(reward).__name__)
    app = FastAPI(title=f"trl-intrinsic reward server: {name}")
    one_at_a_time = asyncio.Lock()

    @app.get(HEALTH_PATH)
    async def health() -> dict[str, Any]:
        return {"status": "ok", "reward": name, "batch_size": batch_size}

    @app.post(SCORE_PATH)
    async def score(request: Request) -> dict[str, Any]:
        try:
            payload = await request.json()
        except ValueError:
            raise HTTPException(400, "The body is not JSON; see trl_intrinsic.rewards.protocol.") from None
        try:
            prompts, images, columns = await asyncio.to_thread(decode_request, payload)
        except ValueError as err:
            raise HTTPException(400, str(err)) from None
        async with one_at_a_time:
            try:
                rewards = await _call(reward, prompts, images, columns, batch_size)
            except (ValueError, TypeError, KeyError) as err:
                raise HTTPException(
                    422, f"Reward {name!r} refused the request: {type(err).__name__}: {err}"
                ) from None
            except Exception as err:
                logger.exception("Reward %r failed", name)
                raise HTTPException(500, f"Reward {name!r} raised {type(err).__name__}: {err}") from None
        try:
            return encode_response(rewards, len(prompts))
        except ValueError as err:
            raise HTTPException(500, f"Reward {name!r} {err}") from None

    return app


async def _call(
    reward: Callable[..., Any],
    prompts: list[str],
    images: list[Any],
    columns: dict[str, list],
    batch_size: int | None,
) -> list[Any]:
    """The reward's values over the request, in calls of at most ``batch_size`` images, off the event loop."""
    size = batch_size or len(prompts)
    values: list[Any] = []
    for start in range(0, len(prompts), size):
        window = slice(start, start + size)
        kwargs = {key: column[window] for key, column in columns.items()}
        chunk = images[window]
        result = await asyncio.to_thread(
            reward, prompts=prompts[window], images=chunk, completions=chunk, **kwargs
        )
        if inspect.isawaitable(result):  # an async reward: its coroutine runs on the server's loop
            result = await result
        result = result.tolist() if hasattr(result, "tolist") else list(result)
        if len(result) != len(chunk):
            raise RuntimeError(
                f"returned {len(result)} rewards for {len(chunk)} images; return one per image."
            )
        values += result
    return values


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m trl_intrinsic.rewards.serve REWARD [--host] [--port] [--batch-size] [--name]``."""
    parser = argparse.ArgumentParser(
        prog="python -m trl_intrinsic.rewards.serve",
        description="Serve an image reward over HTTP for trl_intrinsic.rewards.RemoteReward.",
    )
    parser.add_argument(
        "reward", help="a reward of trl_intrinsic.rewards (e.g. clip_score) or module:attribute"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="images per reward call (default: a request's)"
    )
    parser.add_argument("--name", default=None, help="the reward's name in /health (default: its __name__)")
    parser.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    args = parser.parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        parser.error(f"--batch-size must be ≥ 1, got {args.batch_size}")
    try:
        reward = load_reward(args.reward)
    except ValueError as err:
        parser.error(str(err))
    app = app_for(reward, name=args.name, batch_size=args.batch_size)
    try:
        import uvicorn
    except ImportError as err:
        raise _missing("uvicorn") from err
    logging.basicConfig(level=args.log_level.upper())
    url = f"http://{args.host}:{args.port}"
    logger.info("Serving %s at %s%s (health: %s%s)", args.reward, url, SCORE_PATH, url, HEALTH_PATH)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
