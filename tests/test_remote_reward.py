"""RemoteReward against real reward servers on localhost: the toy verifier served by
``python -m trl_intrinsic.rewards.serve`` in a subprocess, and scripted servers for batching, retries and
timeouts; the Flow-GRPO trainer with a remote reward, including a server that dies mid-training."""

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import TrainerCallback

from trl_intrinsic import FlowGRPOConfig, FlowGRPOTrainer
from trl_intrinsic.rewards import AsyncRemoteReward, RemoteReward, RemoteRewardError
from trl_intrinsic.rewards.protocol import decode_request, encode_request
from trl_intrinsic.rewards.serve import app_for, load_reward, main
from trl_intrinsic.testing import tiny_sd3_pipeline
from trl_intrinsic.toyworld import render, sample_metadata, verifier_reward
from trl_intrinsic.trainers.common import is_complete_checkpoint, last_complete_checkpoint

ROOT = Path(__file__).resolve().parents[1]
FAST = dict(backoff_factor=0.01, backoff_max=0.05)  # retries without waiting


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------- servers
class _ServerProcess:
    """``python -m trl_intrinsic.rewards.serve <args>`` on a free localhost port, ready once ``/health``
    answers."""

    def __init__(self, *args: str, log: Path):
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}/score"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        command = [sys.executable, "-m", "trl_intrinsic.rewards.serve", *args, "--port", str(port)]
        self.log = log
        with open(log, "w") as out:
            self.process = subprocess.Popen(
                [*command, "--log-level", "warning"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"The reward server exited: {log.read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"The reward server did not answer /health within 60 s: {log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


@pytest.fixture(scope="module")
def verifier_server(tmp_path_factory):
    server = _ServerProcess(
        "verifier_reward", "--batch-size", "3", log=tmp_path_factory.mktemp("server") / "log.txt"
    )
    yield server
    server.stop()


@contextlib.contextmanager
def scripted_server(respond):
    """A localhost HTTP server answering POSTs with ``respond(index, body) -> (status, payload, delay_s)``.

    Yields ``(url, bodies, peak)``: the request bodies in arrival order and the peak number of requests being
    answered at once (``peak[0]``).
    """
    bodies, active, peak, lock = [], [0], [0], threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with lock:
                index = len(bodies)
                bodies.append(body)
                active[0] += 1
                peak[0] = max(peak[0], active[0])
            try:
                status, payload, delay = respond(index, body)
                time.sleep(delay)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout)
                pass
            finally:
                with lock:
                    active[0] -= 1

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/score", bodies, peak
    finally:
        server.shutdown()
        server.server_close()


def _echo(body):
    """Rewards = the prompts read as numbers."""
    return {"rewards": [float(p) for p in body["prompts"]]}


# ---------------------------------------------------------------------------------------------- toy data
def _images(n):
    return [render(sample_metadata(1, seed=i)[0]) for i in range(n)]


def _toy_batch(n=10):
    """Prompts, rendered images (every third one of another prompt: a wrong image) and metadata; one row has
    no metadata (not a toy prompt) and one no image, both scored ``None``."""
    meta = sample_metadata(n, seed=0)
    images = [render(m if i % 3 else meta[(i + 1) % n], seed=i) for i, m in enumerate(meta)]
    images[7] = None
    metadata = [json.dumps(m) for m in meta]
    metadata[4] = None
    return [m["prompt"] for m in meta], images, metadata


def test_scores_equal_the_local_reward_and_only_columns_are_sent(verifier_server):
    prompts, images, metadata = _toy_batch()
    expected = verifier_reward(prompts, images, metadata=metadata)
    assert {0.0, 1.0, None} <= set(expected)
    reward = RemoteReward(verifier_server.url, forward_columns=("metadata",), batch_size=4)
    # the trainers' tensors and callables are not sent: they would not encode as JSON
    extra = dict(latents=torch.zeros(10, 4, 8, 8), velocity_fn=lambda *a: None, trainer_state=object())
    assert reward(prompts=prompts, images=images, metadata=metadata, **extra) == expected
    assert reward(prompts=prompts, completions=images, metadata=metadata) == expected  # TRL/Janus style
    assert asyncio.run(reward.acall(prompts, images, metadata=metadata)) == expected

    async_reward = AsyncRemoteReward(verifier_server.url, forward_columns=("metadata",))

    async def from_async_code():  # a synchronous call inside a running event loop (a notebook) too
        return reward(prompts, images, metadata=metadata), await async_reward(
            prompts, images, metadata=metadata
        )

    assert asyncio.run(from_async_code()) == (expected, expected)
    assert reward(prompts[:2], [None, None], metadata=metadata[:2]) == [None, None]  # nothing to send


def test_batches_are_concurrent_and_keep_the_order():
    def respond(index, body):  # the first batch answers last
        return 200, _echo(body), 0.3 if body["prompts"][0] == "0" else 0.02

    with scripted_server(respond) as (url, bodies, peak):
        reward = RemoteReward(url, batch_size=4, max_concurrency=2, forward_columns=("tag",))
        prompts = [str(i) for i in range(10)]
        images = _images(10)
        tags = [f"t{i}" for i in range(10)]
        assert reward(prompts, images, tag=tags) == [float(i) for i in range(10)]
    assert sorted(len(b["prompts"]) for b in bodies) == [2, 4, 4]
    assert peak[0] == 2  # two batches in flight, never more than max_concurrency
    first = next(b for b in bodies if b["prompts"][0] == "0")
    assert first["columns"] == {"tag": ["t0", "t1", "t2", "t3"]}
    decoded_prompts, decoded_images, _ = decode_request(first)
    assert decoded_prompts == prompts[:4]
    assert np.array_equal(np.asarray(decoded_images[0]), np.asarray(images[0]))  # PNG: lossless


def test_retries_a_server_that_answers_503_twice_then_succeeds():
    def respond(index, body):
        return (503, {"detail": "warming up"}, 0) if index < 2 else (200, _echo(body), 0)

    with scripted_server(respond) as (url, bodies, _):
        assert RemoteReward(url, max_retries=2, **FAST)(["1", "2"], _images(2)) == [1.0, 2.0]
        assert len(bodies) == 3
    with scripted_server(respond) as (url, bodies, _), pytest.raises(RemoteRewardError) as info:
        RemoteReward(url, max_retries=1, **FAST)(["1"], _images(1))
    assert "after 2 attempts" in str(info.value) and "HTTP 503: warming up" in str(info.value)
    assert info.value.attempts == 2 and info.value.url == url


def test_a_refused_request_is_not_retried():
    with scripted_server(lambda i, b: (422, {"detail": "metadata: missing"}, 0)) as (url, bodies, _):
        with pytest.raises(RemoteRewardError, match=r"refused it \(HTTP 422: metadata: missing\)"):
            RemoteReward(url, max_retries=3, **FAST)(["1"], _images(1))
        assert len(bodies) == 1
    for answer in ({"scores": [1]}, {"rewards": [1, 2]}, {"rewards": ["1"]}, {"rewards": [float("inf")]}):
        malformed = scripted_server(lambda i, b, answer=answer: (200, answer, 0))
        with malformed as (url, bodies, _), pytest.raises(RemoteRewardError, match="malformed"):
            RemoteReward(url, **FAST)(["1"], _images(1))
        assert len(bodies) == 1
    with scripted_server(lambda i, b: (200, {"rewards": [float("nan"), 0.5]}, 0)) as (url, _, _):
        assert RemoteReward(url)(["1", "2"], _images(2)) == [None, 0.5]  # NaN: does not apply


def test_a_slow_server_times_out_with_the_timeout_in_the_message():
    with scripted_server(lambda i, b: (200, _echo(b), 2.0)) as (url, bodies, _):
        started = time.monotonic()
        with pytest.raises(
            RemoteRewardError, match=r"after 2 attempts.*no answer within timeout=0.3 s.*raise"
        ):
            RemoteReward(url, timeout=0.3, max_retries=1, **FAST)(["1"], _images(1))
        assert time.monotonic() - started < 1.5
        assert len(bodies) == 2


def test_nothing_listening_gives_a_clear_error_after_the_last_retry():
    port = _free_port()
    url = f"http://127.0.0.1:{port}/score"
    with pytest.raises(RemoteRewardError) as info:
        RemoteReward(url, max_retries=2, **FAST)(["1", "2"], _images(2))
    message = str(info.value)
    assert url in message and "after 3 attempts" in message and "ConnectError" in message
    assert f"python -m trl_intrinsic.rewards.serve <reward> --port {port}" in message


def test_backoff_doubles_is_capped_and_honours_retry_after():
    reward = RemoteReward("http://127.0.0.1:1", backoff_factor=0.5, backoff_max=3.0)
    assert [reward._backoff(k) for k in range(4)] == [0.5, 1.0, 2.0, 3.0]
    assert reward._backoff(0, "2") == 2.0 and reward._backoff(0, "60") == 3.0
    assert reward._backoff(1, "Wed, 21 Oct 2015 07:28:00 GMT") == 1.0


# ---------------------------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(url="localhost:8000"), ValueError, "`url` must be an http"),
        (dict(url="ftp://host/score"), ValueError, "`url` must be an http"),
        (dict(url=8000), TypeError, "`url` must be a string"),
        (dict(url="http://host:99999/score"), ValueError, "not a valid URL"),
        (dict(timeout=0), ValueError, "`timeout` must be a finite number > 0, got 0"),
        (dict(timeout=float("nan")), ValueError, "`timeout`"),
        (dict(max_retries=-1), ValueError, "`max_retries` must be an int ≥ 0, got -1"),
        (dict(max_retries=1.5), TypeError, "`max_retries` must be an int"),
        (dict(batch_size=0), ValueError, "`batch_size` must be an int ≥ 1, got 0; the number of images"),
        (dict(batch_size=True), TypeError, "`batch_size`"),
        (dict(max_concurrency=0), ValueError, "`max_concurrency`"),
        (dict(backoff_factor=-1.0), ValueError, "`backoff_factor`"),
        (dict(forward_columns="metadata"), TypeError, r"e.g. \('metadata',\)"),
        (dict(forward_columns=("images",)), ValueError, "always sent"),
        (dict(name=""), TypeError, "`name`"),
        (dict(headers={"X-Token": 1}), TypeError, "`headers`"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, error, match):
    kwargs = {"url": "http://127.0.0.1:1/score", **kwargs}
    with pytest.raises(error, match=match):
        RemoteReward(kwargs.pop("url"), **kwargs)


def test_bad_calls_fail_before_any_request():
    reward = RemoteReward("http://127.0.0.1:1", forward_columns=("metadata",), max_retries=0)
    assert reward.url == "http://127.0.0.1:1/score"
    assert reward.requires_images and reward.__name__ == "remote_reward"
    assert repr(reward).startswith("RemoteReward('http://127.0.0.1:1/score', name='remote_reward'")
    images = _images(2)
    with pytest.raises(ValueError, match="names 'metadata' but the call has no such keyword"):
        reward(["a", "b"], images)
    with pytest.raises(TypeError, match="column 'metadata' cannot be sent as JSON"):
        reward(["a", "b"], images, metadata=[torch.zeros(1), torch.zeros(1)])
    with pytest.raises(TypeError, match="column 'metadata' must be a list of 2 values"):
        reward(["a", "b"], images, metadata="{}")
    with pytest.raises(ValueError, match="2 prompts for 1 images"):
        reward(["a", "b"], images[:1], metadata=["{}"])
    with pytest.raises(TypeError, match=r"images\[0\] is a ndarray; expected PIL images"):
        RemoteReward("http://127.0.0.1:1", max_retries=0)(["a"], [np.zeros((4, 4, 3))])


# ---------------------------------------------------------------------------------------------- server app
def test_server_app_answers_health_and_refuses_bad_requests_with_4xx():
    from fastapi.testclient import TestClient

    def reward(prompts, images, *, metadata=None, **kwargs):
        if metadata is None:
            raise ValueError("metadata: needed")
        return [{"nan": float("nan"), "inf": float("inf")}.get(m, 1.0) for m in metadata]

    client = TestClient(app_for(reward, name="toy", batch_size=2))
    assert client.get("/health").json() == {"status": "ok", "reward": "toy", "batch_size": 2}
    good = encode_request(["a", "b", "c"], _images(3), {"metadata": ["x", "nan", None]})
    assert client.post("/score", json=good).json() == {"rewards": [1.0, None, 1.0]}
    cases = [
        (b"not json", 400, "not JSON"),
        ({"prompts": ["a"]}, 400, "images: expected a list of 1"),
        ({"prompts": ["a"], "images": ["%%%"]}, 400, "images[0]: not a base64-encoded PNG"),
        ({**encode_request(["a"], _images(1)), "extra": 1}, 400, "Unknown fields ['extra']"),
        ({**good, "columns": {"metadata": ["x"]}}, 400, "columns['metadata']: expected a list of 3"),
        (encode_request(["a"], _images(1)), 422, "refused the request: ValueError: metadata: needed"),
        (encode_request(["a"], _images(1), {"metadata": ["inf"]}), 500, "reward 0 is infinite"),
    ]
    for body, status, detail in cases:
        response = client.post("/score", **({"content": body} if isinstance(body, bytes) else {"json": body}))
        assert response.status_code == status, (body, response.text)
        assert detail in response.json()["detail"]


def test_server_refuses_rewards_that_need_the_trainer_and_unknown_names():
    assert load_reward("verifier_reward") is verifier_reward
    assert load_reward("trl_intrinsic.toyworld.reward:verifier_reward") is verifier_reward
    with pytest.raises(ValueError, match="requires_images=False"):
        load_reward("solace_reward")
    with pytest.raises(SystemExit):
        main(["no_such_reward", "--port", "1"])


def test_importing_rewards_loads_no_http_library():
    code = (
        "import sys, trl_intrinsic.rewards, trl_intrinsic.rewards.serve; "
        "print(sorted({'httpx', 'fastapi', 'uvicorn'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------------- training
def _trainer(tmp_path, reward_funcs, **overrides):
    meta = sample_metadata(4, seed=1)
    dataset = Dataset.from_dict(
        {"prompt": [m["prompt"] for m in meta], "metadata": [json.dumps(m) for m in meta]}
    )
    values = dict(
        output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, report_to="none", seed=0,
        per_device_train_batch_size=4, num_generations=2, max_steps=1, resolution=32,
        num_inference_steps=3, logging_steps=1, save_strategy="no", learning_rate=1e-3, disable_tqdm=True,
    )  # fmt: skip
    callbacks = overrides.pop("callbacks", None)
    values.update(overrides)
    return FlowGRPOTrainer(
        tiny_sd3_pipeline(),
        reward_funcs,
        args=FlowGRPOConfig(**values),
        train_dataset=dataset,
        peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0),
        callbacks=callbacks,
    )


class _LogRecorder(TrainerCallback):
    def __init__(self, logged):
        self.logged = logged

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logged.append(dict(logs or {}))


def test_remote_and_local_rewards_mix_in_flow_grpo(tmp_path, verifier_server):
    remote = AsyncRemoteReward(verifier_server.url, name="remote_verifier", forward_columns=("metadata",))
    trainer = _trainer(tmp_path, [remote, verifier_reward], max_steps=2)
    logged = []
    trainer.add_callback(_LogRecorder(logged))
    trainer.train()
    steps = [logs for logs in logged if "rewards/remote_verifier/mean" in logs]
    assert len(steps) == 2
    for logs in steps:  # the same images scored by the same verifier, here and on the server
        assert logs["rewards/remote_verifier/mean"] == logs["rewards/verifier_reward/mean"]


class _KillAfterFirstStep(TrainerCallback):
    def __init__(self, server):
        self.server = server

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            self.server.stop()


def test_a_server_that_dies_mid_training_stops_it_with_the_clear_error(tmp_path):
    server = _ServerProcess("verifier_reward", log=tmp_path / "server.txt")
    remote = RemoteReward(
        server.url, name="remote_verifier", forward_columns=("metadata",), max_retries=1, timeout=10, **FAST
    )
    trainer = _trainer(
        tmp_path,
        [remote],
        max_steps=3,
        save_strategy="steps",
        save_steps=1,
        callbacks=[_KillAfterFirstStep(server)],
    )
    try:
        with pytest.raises(
            RuntimeError, match="Reward function 'remote_verifier' raised RemoteRewardError at global step 1"
        ) as info:
            trainer.train()
    finally:
        server.stop()
    cause = info.value.__cause__
    assert isinstance(cause, RemoteRewardError)
    assert server.url in str(cause) and "after 2 attempts" in str(cause)
    assert "Is the reward server running" in str(cause)
    # Step 1 was checkpointed before the server died; step 2 failed while scoring, before writing anything.
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1"]
    assert is_complete_checkpoint(out / "checkpoint-1")

    # With the server back, the run resumes from that checkpoint and finishes.
    server = _ServerProcess("verifier_reward", log=tmp_path / "server2.txt")
    try:
        remote = RemoteReward(server.url, name="remote_verifier", forward_columns=("metadata",))
        trainer = _trainer(tmp_path, [remote], max_steps=3, save_strategy="steps", save_steps=1)
        trainer.train(resume_from_checkpoint=True)
    finally:
        server.stop()
    assert last_complete_checkpoint(out) == str(out / "checkpoint-3")


def test_remote_rewards_score_janus_images_in_intrinsic_grpo(tmp_path, verifier_server):
    from trl.trainer.utils import is_async_callable

    from trl_intrinsic import IntrinsicGRPOConfig, IntrinsicGRPOTrainer
    from trl_intrinsic.testing import tiny_janus

    sync = RemoteReward(verifier_server.url, name="remote_sync", forward_columns=("metadata",))
    concurrent = AsyncRemoteReward(verifier_server.url, name="remote_async", forward_columns=("metadata",))
    assert not is_async_callable(sync) and is_async_callable(concurrent)  # how TRL tells them apart
    meta = sample_metadata(2, seed=1)
    model, processor = tiny_janus(seed=0)
    args = IntrinsicGRPOConfig(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", per_device_train_batch_size=4,
        num_generations=2, max_completion_length=3, max_steps=1, logging_steps=1, save_strategy="no",
        gradient_checkpointing=False, seed=0,
    )  # fmt: skip
    trainer = IntrinsicGRPOTrainer(
        model,
        [sync, concurrent, verifier_reward],
        args=args,
        train_dataset=Dataset.from_dict(
            {"prompt": [m["prompt"] for m in meta], "metadata": [json.dumps(m) for m in meta]}
        ),
        processing_class=processor,
    )
    logged = []
    trainer.add_callback(_LogRecorder(logged))
    trainer.train()
    (logs,) = [logs for logs in logged if "rewards/remote_sync/mean" in logs]
    assert logs["rewards/remote_sync/mean"] == logs["rewards/remote_async/mean"]
    assert logs["rewards/remote_sync/mean"] == logs["rewards/verifier_reward/mean"]
