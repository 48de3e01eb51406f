"""EMA of the trainable weights (Flow-GRPO's ``train.ema``): the schedule, evaluation and saving with it."""

import numpy as np
import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from safetensors.torch import load_file
from transformers import TrainerCallback

from trl_intrinsic import FlowGRPOConfig, FlowGRPOTrainer
from trl_intrinsic.ema import ParameterCopy, warmup_ema_decay
from trl_intrinsic.flow.weights import LORA_WEIGHTS_NAME
from trl_intrinsic.testing import tiny_sd3_pipeline

PROMPTS = ["a red circle", "two blue squares", "a green triangle", "a yellow square"]


def brightness(prompts, images, **kwargs):
    return [float(np.asarray(image, dtype=np.float32).mean() / 255) for image in images]


def _trainer(tmp_path, callbacks=None, **overrides):
    values = dict(
        output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, report_to="none", seed=0,
        per_device_train_batch_size=4, num_generations=2, max_steps=4, resolution=32, num_inference_steps=3,
        eval_num_inference_steps=3, logging_steps=1, save_strategy="no", learning_rate=3e-2,
        guidance_scale=1.0, beta=0.0, disable_tqdm=True, ema=True, ema_update_interval=2, ema_decay=0.5,
    )  # fmt: skip
    values.update(overrides)
    return FlowGRPOTrainer(
        tiny_sd3_pipeline(),
        [brightness],
        args=FlowGRPOConfig(**values),
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        eval_dataset=Dataset.from_dict({"prompt": PROMPTS[:2]}),
        peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0),
        callbacks=callbacks,
    )


def test_warmup_decay_is_the_references():
    assert warmup_ema_decay(0, 0.9) == pytest.approx(0.1)
    assert warmup_ema_decay(5, 0.9) == pytest.approx(6 / 15)
    assert warmup_ema_decay(1000, 0.9) == 0.9


def test_parameter_copy_swaps_blends_and_round_trips(tmp_path):
    params = [torch.nn.Parameter(torch.arange(4.0)), torch.nn.Parameter(torch.ones(2, 2))]
    copy = ParameterCopy(params)
    with torch.no_grad():
        params[0].add_(4.0)
    copy.blend_(0.75)  # 0.75·old + 0.25·new
    torch.testing.assert_close(copy.tensors[0], torch.arange(4.0) + 1.0)
    with copy.swapped():
        torch.testing.assert_close(params[0].data, torch.arange(4.0) + 1.0)
    torch.testing.assert_close(params[0].data, torch.arange(4.0) + 4.0)
    copy.save(tmp_path / "copy.safetensors")
    other = ParameterCopy(params)
    other.load(tmp_path / "copy.safetensors", "the test copy")
    torch.testing.assert_close(other.tensors, copy.tensors)
    with pytest.raises(ValueError, match="the test copy"):
        other.load(tmp_path / "missing.safetensors", "the test copy")
    with pytest.raises(ValueError, match="holds 2 tensors"):
        ParameterCopy(params[:1]).load(tmp_path / "copy.safetensors", "the test copy")


class RecordWeights(TrainerCallback):
    def __init__(self):
        self.after_step = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.after_step[state.global_step] = [p.detach().clone() for p in model.parameters() if p.requires_grad]


def test_ema_follows_the_schedule_and_is_what_evaluation_and_saving_use(tmp_path):
    recorder = RecordWeights()
    trainer = _trainer(tmp_path, callbacks=[recorder])
    initial = [p.detach().clone() for p in trainer.model.parameters() if p.requires_grad]
    trainer.train()

    # updates after steps 1 and 3 ((s + 1) % 2 == 0), each with d = min((1 + s)/(10 + s), 0.5)
    expected = initial
    for step in (1, 3):
        d = warmup_ema_decay(step, 0.5)
        expected = [d * e + (1 - d) * w for e, w in zip(expected, recorder.after_step[step], strict=True)]
    torch.testing.assert_close(trainer._ema.tensors, expected, rtol=1e-5, atol=1e-7)
    raw = [p.detach().clone() for p in trainer.model.parameters() if p.requires_grad]
    assert any(not torch.allclose(r, e) for r, e in zip(raw, expected, strict=True))

    # evaluation runs with the EMA weights swapped in, and puts the raw ones back
    seen = []
    original = trainer._generate_and_score

    def spy(inputs, mode):
        seen.append([p.detach().clone() for p in trainer.model.parameters() if p.requires_grad])
        return original(inputs, mode)

    trainer._generate_and_score = spy
    trainer.evaluate()
    torch.testing.assert_close(seen[0], expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close([p.detach() for p in trainer.model.parameters() if p.requires_grad], raw)

    # save_model writes the EMA adapter; the trainer keeps training the raw weights
    trainer.save_model(str(tmp_path / "final"))
    saved = load_file(str(tmp_path / "final" / LORA_WEIGHTS_NAME))
    names = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    lora_b = next(i for i, n in enumerate(names) if "lora_B" in n)
    target = expected[lora_b]
    same_shape = [t for t in saved.values() if t.shape == target.shape]
    assert any(torch.allclose(t, target, rtol=1e-5, atol=1e-7) for t in same_shape)
    assert not any(torch.allclose(t, raw[lora_b]) for t in same_shape)
    torch.testing.assert_close([p.detach() for p in trainer.model.parameters() if p.requires_grad], raw)


def test_memory_estimate_counts_the_ema(tmp_path):
    with_ema, without = _trainer(tmp_path / "a"), _trainer(tmp_path / "b", ema=False)
    assert with_ema.memory_estimate().copies - without.memory_estimate().copies == with_ema._ema.nbytes() > 0


@pytest.mark.parametrize(("field", "value"), [("ema_decay", 1.0), ("ema_decay", -0.1), ("ema_update_interval", 0)])
def test_bad_ema_settings_name_the_field(tmp_path, field, value):
    with pytest.raises(ValueError, match=field):
        FlowGRPOConfig(output_dir=str(tmp_path), **{field: value})
