import itertools
import math

import pytest
import torch

from trl_intrinsic.rewards import SolaceReward, solace_reward

SHAPE = (4, 6, 6)  # C, H, W of a tiny latent


def _latents(batch=4, shape=SHAPE, seed=0, dtype=torch.float64):
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


class Recorder:
    """A velocity function that returns the true velocity ε − z0 plus ``c`` and records its inputs.

    For ``x_t = (1 − t)·z0 + t·ε`` the true velocity is ``(x_t − z0) / t``, so the recovered noise
    ``ε̂ = v + z0`` is exactly ``ε + c`` and the reward is ``−log(c² + δ)``.
    """

    def __init__(self, z0, c=0.0):
        self.z0, self.c = z0, c
        self.calls = []

    def __call__(self, x_t, sigma, rows):
        assert x_t.shape[0] == sigma.shape[0] == rows.shape[0]
        self.calls.append((x_t.clone(), sigma.clone(), rows.clone()))
        z0 = self.z0[rows].to(x_t.dtype)
        t = sigma.to(x_t.dtype).view(-1, *([1] * (x_t.ndim - 1)))
        return (x_t - z0) / t + self.c

    @property
    def rows(self):
        return sum(c[0].shape[0] for c in self.calls)

    def probes_of(self, sigma, row):
        """The probes ε that re-noised latent ``row`` at ``sigma``, in call order."""
        out = []
        for x_t, sig, rows in self.calls:
            sel = (rows == row) & torch.isclose(sig.double(), torch.tensor(float(sigma), dtype=torch.float64))
            t = sig[sel].double().view(-1, *([1] * (x_t.ndim - 1)))
            out.append((x_t[sel].double() - (1 - t) * self.z0[row].double()) / t)
        return torch.cat(out)


TRAIN_SIGMAS = torch.tensor([0.8, 0.55, 0.3])


@pytest.mark.parametrize("weighting", ["uniform", "t(1-t)"])
@pytest.mark.parametrize("c", [0.0, 0.05, 0.5, 2.0])
def test_closed_form_true_velocity_plus_constant(weighting, c):
    z0 = _latents()
    reward = SolaceReward(num_probes=4, timestep_weighting=weighting)
    out = reward(["a"] * 4, None, latents=z0, velocity_fn=Recorder(z0, c), train_sigmas=TRAIN_SIGMAS)
    expected = -math.log(c**2 + 1e-6)
    assert len(out) == 4 and all(isinstance(r, float) for r in out)
    for r in out:
        assert r == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_closed_form_holds_for_packed_flux_latents_and_fp32():
    z0 = torch.randn(3, 16, 8)  # (B, seq, C), fp32
    out = solace_reward(["a"] * 3, None, latents=z0, velocity_fn=Recorder(z0, 0.3), train_sigmas=[0.9, 0.4])
    assert out == pytest.approx([-math.log(0.09 + 1e-6)] * 3, rel=1e-5)


def test_reward_formula_on_an_imperfect_model():
    """A velocity that is wrong in a probe-dependent way: check the formula by hand."""
    z0 = _latents(batch=2)
    sigmas = [0.7, 0.2]

    def vel(x_t, sigma, rows):
        return 0.5 * x_t - z0[rows]  # ε̂ = 0.5·x_t

    reward = SolaceReward(num_probes=4, timestep_weighting="t(1-t)")
    out = reward(None, None, latents=z0, velocity_fn=vel, train_sigmas=sigmas, group_ids=[3, 3])
    eps = reward.probes(3, SHAPE, step=0).double()
    expected = []
    for i in range(2):
        s = []
        for t in sigmas:
            x_t = (1 - t) * z0[i] + t * eps
            mse = ((0.5 * x_t - eps) ** 2).flatten(1).mean(1).mean()
            s.append(-math.log(mse + 1e-6))
        w = [t * (1 - t) for t in sigmas]
        expected.append(sum(wi * si for wi, si in zip(w, s)) / sum(w))
    assert out == pytest.approx(expected, rel=1e-9)


def test_better_noise_recovery_gets_higher_reward():
    z0 = _latents()
    rewards = [
        solace_reward(None, None, latents=z0, velocity_fn=Recorder(z0, c), train_sigmas=TRAIN_SIGMAS)[0]
        for c in (0.01, 0.1, 0.3, 1.0)
    ]
    assert all(a > b for a, b in itertools.pairwise(rewards))

    # Per row: the image whose velocity is off by less scores higher within one call.
    offsets = torch.tensor([0.4, 0.1, 0.2, 0.0], dtype=torch.float64)

    def vel(x_t, sigma, rows):
        t = sigma.view(-1, 1, 1, 1)
        return (x_t - z0[rows]) / t + offsets[rows].view(-1, 1, 1, 1)

    out = solace_reward(None, None, latents=z0, velocity_fn=vel, train_sigmas=TRAIN_SIGMAS)
    assert sorted(range(4), key=lambda i: out[i]) == [0, 2, 1, 3]


def test_probes_are_antithetic_shared_in_a_group_and_independent_across_groups():
    z0 = _latents(batch=4)
    rec = Recorder(z0)
    reward = SolaceReward(num_probes=6)
    reward(None, None, latents=z0, velocity_fn=rec, train_sigmas=TRAIN_SIGMAS, group_ids=[10, 11, 10, 11])
    for t in TRAIN_SIGMAS.tolist():
        p = [rec.probes_of(t, i) for i in range(4)]
        assert all(x.shape == (6, *SHAPE) for x in p)
        for x in p:  # antithetic: exact zero mean, second half the negation of the first
            torch.testing.assert_close(x[3:], -x[:3], rtol=0, atol=1e-12)
            assert x.mean(0).abs().max() < 1e-12
        torch.testing.assert_close(p[0], p[2], rtol=0, atol=1e-12)
        torch.testing.assert_close(p[1], p[3], rtol=0, atol=1e-12)
        assert (p[0] - p[1]).abs().min() > 0  # different groups: different draws everywhere
        assert abs(torch.corrcoef(torch.stack([p[0][:3].flatten(), p[1][:3].flatten()]))[0, 1]) < 0.2
    # The same probes at every sigma of one step.
    torch.testing.assert_close(rec.probes_of(0.8, 0), rec.probes_of(0.3, 0), rtol=0, atol=1e-12)
    # Without antithetic pairing, the draws are all distinct.
    rec = Recorder(z0)
    SolaceReward(num_probes=4, antithetic=False)(None, None, latents=z0, velocity_fn=rec, train_sigmas=[0.5])
    p = rec.probes_of(0.5, 0)
    assert (p[2:] + p[:2]).abs().max() > 0.1


def test_without_group_ids_the_call_is_one_group():
    z0 = _latents(batch=3)
    rec = Recorder(z0)
    solace_reward(None, None, latents=z0, velocity_fn=rec, train_sigmas=[0.5])
    torch.testing.assert_close(rec.probes_of(0.5, 0), rec.probes_of(0.5, 2), rtol=0, atol=1e-12)


def test_probes_depend_only_on_seed_step_and_group_so_processes_agree():
    """Two processes holding halves of one group draw the same probes and give the same rewards."""
    z0 = _latents(batch=4)
    groups = torch.tensor([5, 5, 9, 9])
    state = {"global_step": 7}
    full_rec = Recorder(z0)
    full = solace_reward(
        None, None, latents=z0, velocity_fn=full_rec, train_sigmas=TRAIN_SIGMAS, group_ids=groups,
        trainer_state=state,
    )  # fmt: skip
    halves, recs = [], []
    for part in ([0, 2], [1, 3]):  # each "process" holds one image of each group
        rec = Recorder(z0[part])
        recs.append(rec)
        halves += solace_reward(
            None, None, latents=z0[part], velocity_fn=rec, train_sigmas=TRAIN_SIGMAS,
            group_ids=groups[part].tolist(), trainer_state=state,
        )  # fmt: skip
    assert [halves[0], halves[2], halves[1], halves[3]] == pytest.approx(full, rel=1e-12)
    torch.testing.assert_close(recs[0].probes_of(0.55, 0), full_rec.probes_of(0.55, 0), rtol=0, atol=1e-12)
    torch.testing.assert_close(recs[1].probes_of(0.55, 0), full_rec.probes_of(0.55, 1), rtol=0, atol=1e-12)
    torch.testing.assert_close(recs[1].probes_of(0.55, 1), full_rec.probes_of(0.55, 2), rtol=0, atol=1e-12)

    # A later step, or another seed, draws new probes for the same group.
    class State:
        global_step = 8

    rec8 = Recorder(z0)
    solace_reward(
        None, None, latents=z0, velocity_fn=rec8, train_sigmas=[0.55], group_ids=groups, trainer_state=State()
    )
    assert (rec8.probes_of(0.55, 0) - full_rec.probes_of(0.55, 0)).abs().min() > 0
    rec_seed = Recorder(z0)
    SolaceReward(seed=1)(
        None,
        None,
        latents=z0,
        velocity_fn=rec_seed,
        train_sigmas=[0.55],
        group_ids=groups,
        trainer_state=state,
    )
    assert (rec_seed.probes_of(0.55, 0) - full_rec.probes_of(0.55, 0)).abs().min() > 0
    assert torch.equal(SolaceReward().probes(5, SHAPE, step=7), SolaceReward().probes(5, SHAPE, step=7))


def test_queries_exactly_the_nonzero_train_sigmas_with_conditional_rows():
    z0 = _latents(batch=3)
    rec = Recorder(z0)
    train = torch.tensor([0.6, 0.35, 0.1, 0.0])  # a window reaching the end of the schedule
    SolaceReward(num_probes=2)(None, None, latents=z0, velocity_fn=rec, train_sigmas=train)
    sig = torch.cat([c[1] for c in rec.calls])
    rows = torch.cat([c[2] for c in rec.calls])
    assert sig.dtype == torch.float32 and rows.dtype == torch.long
    assert sorted(set(sig.tolist())) == pytest.approx([0.1, 0.35, 0.6])
    assert sig.numel() == 2 * 3 * 3
    # Every image is queried K times at every sigma, conditioned on its own prompt only.
    for t in (0.6, 0.35, 0.1):
        sel = torch.isclose(sig, torch.tensor(t))
        assert torch.bincount(rows[sel], minlength=3).tolist() == [2, 2, 2]


@pytest.mark.parametrize(("max_batch_size", "num_calls"), [(None, 1), (100, 1), (7, 6), (1, 36)])
def test_one_batched_call_per_chunk_and_chunking_does_not_change_the_result(max_batch_size, num_calls):
    z0 = _latents(batch=3)

    def vel(x_t, sigma, rows):  # an imperfect, nonlinear model
        return torch.tanh(x_t) * (1 + sigma.view(-1, 1, 1, 1)) - 0.3 * z0[rows]

    calls = []

    def counted(x_t, sigma, rows):
        calls.append(x_t.shape[0])
        return vel(x_t, sigma, rows)

    reward = SolaceReward(num_probes=4, max_batch_size=max_batch_size)
    out = reward(None, None, latents=z0, velocity_fn=counted, train_sigmas=TRAIN_SIGMAS, group_ids=[1, 2, 1])
    n = 4 * 3 * 3
    assert sum(calls) == n and len(calls) == num_calls == math.ceil(n / (max_batch_size or n))
    ref = SolaceReward(num_probes=4)(
        None, None, latents=z0, velocity_fn=vel, train_sigmas=TRAIN_SIGMAS, group_ids=[1, 2, 1]
    )
    assert out == pytest.approx(ref, rel=1e-12)


def test_offline_uses_only_the_reference_velocity():
    z0 = _latents(batch=2)
    policy_calls = []

    def policy(x_t, sigma, rows):
        policy_calls.append(1)
        return torch.zeros_like(x_t)

    ref = Recorder(z0, c=0.2)
    out = SolaceReward(online=False)(
        None, None, latents=z0, velocity_fn=policy, reference_velocity_fn=ref, train_sigmas=[0.5]
    )
    assert not policy_calls and ref.rows == 8 * 2
    assert out == pytest.approx([-math.log(0.04 + 1e-6)] * 2, rel=1e-9)
    online = Recorder(z0, c=0.2)
    solace_reward(
        None, None, latents=z0, velocity_fn=online, reference_velocity_fn=policy, train_sigmas=[0.5]
    )
    assert online.rows == 16 and not policy_calls


def test_runs_without_grad_even_if_the_model_tracks_it():
    z0 = _latents(batch=2, dtype=torch.float32)
    weight = torch.nn.Parameter(torch.tensor(0.9))
    seen = []

    def vel(x_t, sigma, rows):
        seen.append(torch.is_grad_enabled())
        return weight * x_t

    out = solace_reward(None, None, latents=z0.requires_grad_(), velocity_fn=vel, train_sigmas=[0.5])
    assert seen == [False] and all(math.isfinite(r) for r in out)


def test_per_timestep_normalization_standardises_each_sigma_across_the_batch():
    z0 = _latents(batch=4)
    offsets = torch.tensor([0.4, 0.1, 0.2, 0.05], dtype=torch.float64)

    def vel(x_t, sigma, rows):
        t = sigma.view(-1, 1, 1, 1)
        return (x_t - z0[rows]) / t + offsets[rows].view(-1, 1, 1, 1) * (1 + t)

    kw = dict(latents=z0, velocity_fn=vel, train_sigmas=TRAIN_SIGMAS)
    raw = SolaceReward(num_probes=2)
    scores = raw.scores(z0, vel, TRAIN_SIGMAS)
    assert scores.shape == (4, 3)
    torch.testing.assert_close(
        torch.tensor(raw(None, None, **kw), dtype=torch.float64), scores.mean(1), rtol=1e-12, atol=1e-12
    )
    norm = SolaceReward(num_probes=2, normalize="per_timestep", timestep_weighting="t(1-t)")
    z = (scores - scores.mean(0)) / scores.std(0)
    w = TRAIN_SIGMAS.double() * (1 - TRAIN_SIGMAS.double())
    expected = (z * w).sum(1) / w.sum()
    torch.testing.assert_close(torch.tensor(norm(None, None, **kw), dtype=torch.float64), expected)
    assert norm(None, None, latents=z0[:1], velocity_fn=vel, train_sigmas=TRAIN_SIGMAS) == [0.0]


def test_public_attributes():
    assert solace_reward.__name__ == "solace_reward"
    assert solace_reward.requires_images is False
    assert (solace_reward.num_probes, solace_reward.antithetic, solace_reward.delta) == (8, True, 1e-6)
    assert solace_reward.online and solace_reward.normalize is None
    assert not isinstance(solace_reward, torch.nn.Module)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_probes": 3}, "num_probes"),
        ({"num_probes": 0, "antithetic": False}, "num_probes"),
        ({"delta": 0.0}, "delta"),
        ({"delta": -1e-6}, "delta"),
        ({"timestep_weighting": "snr"}, "timestep_weighting"),
        ({"normalize": "batch"}, "normalize"),
        ({"max_batch_size": 0}, "max_batch_size"),
    ],
)
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SolaceReward(**kwargs)


def test_bad_inputs_raise():
    z0 = _latents(batch=2)
    vel = Recorder(z0)
    ok = dict(latents=z0, velocity_fn=vel, train_sigmas=[0.5])
    with pytest.raises(ValueError, match="train_sigmas"):
        solace_reward(None, None, latents=z0, velocity_fn=vel)
    with pytest.raises(ValueError, match="train_sigmas"):
        solace_reward(None, None, latents=z0, velocity_fn=vel, train_sigmas=[0.0])
    with pytest.raises(ValueError, match="train_sigmas"):
        solace_reward(None, None, latents=z0, velocity_fn=vel, train_sigmas=[1.5])
    with pytest.raises(ValueError, match="latents"):
        solace_reward(None, None, velocity_fn=vel, train_sigmas=[0.5])
    bad = z0.clone()
    bad[1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        solace_reward(None, None, latents=bad, velocity_fn=vel, train_sigmas=[0.5])
    with pytest.raises(ValueError, match="latents"):
        solace_reward(None, None, latents=z0[0, 0, 0], velocity_fn=vel, train_sigmas=[0.5])
    with pytest.raises(TypeError, match="latents"):
        solace_reward(None, None, latents=z0.long(), velocity_fn=vel, train_sigmas=[0.5])
    with pytest.raises(ValueError, match="velocity_fn"):
        solace_reward(None, None, latents=z0, train_sigmas=[0.5])
    with pytest.raises(ValueError, match="reference_velocity_fn"):
        SolaceReward(online=False)(None, None, **ok)
    with pytest.raises(ValueError, match="group_ids"):
        solace_reward(None, None, group_ids=[0, 1, 2], **ok)
    with pytest.raises(TypeError, match="group_ids"):
        solace_reward(None, None, group_ids=[0.5, 1.0], **ok)
    with pytest.raises(ValueError, match="prompts"):
        solace_reward(["a", "b", "c"], None, **ok)
    with pytest.raises(ValueError, match="velocity_fn must return"):
        solace_reward(None, None, latents=z0, velocity_fn=lambda x, s, r: x[:, :1], train_sigmas=[0.5])
    with pytest.raises(ValueError, match="zero total weight"):
        SolaceReward(timestep_weighting="t(1-t)")(None, None, latents=z0, velocity_fn=vel, train_sigmas=[1.0])


def test_paper_recipe_config_is_valid_yaml_and_builds_the_reward():
    import pathlib

    import yaml

    path = pathlib.Path(__file__).parents[1] / "examples" / "configs" / "solace_sd35m.yaml"
    config = yaml.safe_load(path.read_text())
    assert config["model_name_or_path"] == "stabilityai/stable-diffusion-3.5-medium"
    assert (config["num_generations"], config["solace_num_probes"], config["resolution"]) == (16, 8, 512)
    assert (config["lora_r"], config["lora_alpha"], config["num_inference_steps"]) == (32, 64, 10)
    assert (config["learning_rate"], config["beta"], config["guidance_scale"]) == (3e-4, 0.04, 7.0)
    assert config["timestep_fraction"] == 0.6 and config["reward_funcs"] == ["solace_reward"]
    options = {k.removeprefix("solace_"): v for k, v in config.items() if k.startswith("solace_")}
    reward = SolaceReward(**options)
    assert repr(reward) == repr(solace_reward)


def test_training_run_on_the_tiny_sd3_pipeline_without_decoding(tmp_path):
    """FlowGRPOTrainer + SOLACE: conditional-only batched velocity calls at the trained sigmas, no VAE."""
    from datasets import Dataset
    from peft import LoraConfig

    from trl_intrinsic import FlowGRPOConfig, FlowGRPOTrainer
    from trl_intrinsic.testing import tiny_sd3_pipeline

    class Spy(SolaceReward):
        def __call__(self, prompts=None, images=None, **kwargs):
            transformer = trainer.accelerator.unwrap_model(trainer.model)
            handle = transformer.register_forward_pre_hook(
                lambda module, args, kw: forward_rows.append(
                    (kw.get("hidden_states", args[0] if args else None)).shape[0]
                ),
                with_kwargs=True,
            )
            sigmas_seen = []
            velocity_fn = kwargs["velocity_fn"]

            def spy_velocity(x_t, sigma, rows):
                sigmas_seen.append(sigma)
                return velocity_fn(x_t, sigma, rows)

            try:
                out = super().__call__(prompts, images, **{**kwargs, "velocity_fn": spy_velocity})
            finally:
                handle.remove()
            calls.append((kwargs["train_sigmas"], torch.cat(sigmas_seen), out))
            return out

    calls, forward_rows = [], []
    args = FlowGRPOConfig(
        output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, report_to="none", seed=0,
        per_device_train_batch_size=4, num_generations=2, max_steps=2, resolution=32,
        num_inference_steps=4, timestep_fraction=0.6, logging_steps=1, save_strategy="no",
        learning_rate=1e-3, guidance_scale=7.0, disable_tqdm=True,
    )  # fmt: skip
    trainer = FlowGRPOTrainer(
        tiny_sd3_pipeline(),
        [Spy(num_probes=2, max_batch_size=8)],
        args=args,
        train_dataset=Dataset.from_dict({"prompt": ["a red circle", "two blue squares"]}),
        peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0),
    )
    decodes = []
    original_decode = trainer.pipeline.vae.decode
    trainer.pipeline.vae.decode = lambda *a, **k: decodes.append(1) or original_decode(*a, **k)
    trainer.train()
    assert not decodes, "SOLACE needs no pixels: the VAE must not run during training"
    assert len(calls) == 2
    for train_sigmas, seen, out in calls:
        probe = train_sigmas[train_sigmas > 0]
        assert probe.numel() >= 1
        assert sorted(set(seen.tolist())) == pytest.approx(sorted(probe.tolist()))
        assert seen.numel() == 2 * probe.numel() * 4 and len(out) == 4
        assert all(math.isfinite(r) for r in out)
    # Conditional velocity only: transformer batches are the chunks of 8 rows, never doubled for CFG.
    assert set(forward_rows) == {8}  # 2 probes x |T| x 4 images, in chunks of 8 rows
