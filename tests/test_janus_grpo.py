from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import PeftModel
from trl import ModelConfig, TrlParser

from trl_intrinsic import IntrinsicGRPOConfig, IntrinsicGRPOTrainer
from trl_intrinsic.autoregressive import janus_completion_logps, position_ids_from_mask
from trl_intrinsic.rewards.self_certainty import nsc_reward, self_certainty
from trl_intrinsic.testing import restore_janus_generation_config, tiny_janus

CONFIG = Path(__file__).resolve().parents[1] / "examples" / "configs" / "iris_janus_pro_1b.yaml"


def _dataset() -> Dataset:
    return Dataset.from_dict({"prompt": ["a red circle", "two blue squares"], "tag": ["single", "counting"]})


def _config(tmp_path, **overrides) -> IntrinsicGRPOConfig:
    kwargs = dict(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        report_to="none",
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=5,
        max_steps=1,
        learning_rate=1e-2,
        beta=0.01,
        logging_steps=1,
        save_strategy="no",
        gradient_checkpointing=False,
        seed=0,
    )
    kwargs.update(overrides)
    return IntrinsicGRPOConfig(**kwargs)


class _Recorder:
    __name__ = "recorder"

    def __init__(self):
        self.calls = []

    def __call__(self, prompts, completions, completion_ids, **kwargs):
        self.calls.append(
            {"prompts": prompts, "completions": completions, "completion_ids": completion_ids, **kwargs}
        )
        return [float(i) for i in range(len(prompts))]


def _trainer(tmp_path, recorder=None, **overrides):
    model, processor = tiny_janus(seed=0)
    funcs = [nsc_reward] + ([recorder] if recorder is not None else [])
    return IntrinsicGRPOTrainer(
        model,
        funcs,
        args=_config(tmp_path, **overrides),
        train_dataset=_dataset(),
        processing_class=processor,
    )


def _batch(trainer):
    return [dict(x) for x in trainer.train_dataset.select([0, 0, 1, 1])]


def test_rollout_rewards_and_self_certainty_recomputation(tmp_path):
    recorder = _Recorder()
    trainer = _trainer(tmp_path, recorder)
    out = trainer._generate_and_score_completions(_batch(trainer))
    (call,) = recorder.calls
    assert call["prompts"] == ["a red circle", "a red circle", "two blue squares", "two blue squares"]
    assert call["tag"] == ["single", "single", "counting", "counting"]
    assert all(im.size == (32, 32) and im.mode == "RGB" for im in call["completions"])
    assert [len(ids) for ids in call["completion_ids"]] == [16] * 4
    assert call["trainer_state"] is trainer.state
    assert all(isinstance(c, str) for c in call["cot"])

    # Recompute with one teacher-forced conditional forward over prompt + CoT + BOI + image tokens.
    janus = trainer._janus()
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)
    mask = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
    is_image = out["mm_token_type_ids"].bool()
    with torch.no_grad():
        embeds = torch.where(
            is_image[..., None],
            janus.prepare_embeddings_for_image_generation(ids.masked_fill(~is_image, 0)),
            janus.get_input_embeddings()(ids.masked_fill(is_image, 0)),
        )
        hidden = janus.model.language_model(
            inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids_from_mask(mask)
        ).last_hidden_state
    prompt_len = out["prompt_ids"].shape[1]
    trained = (out["completion_mask"] * out["tool_mask"]).bool()
    for i in range(4):
        positions = (
            prompt_len - 1 + torch.nonzero(trained[i]).squeeze(-1)
        )  # hidden state predicting each token
        image_pos = positions[is_image[i, positions + 1]]
        text_pos = positions[~is_image[i, positions + 1]]
        assert len(image_pos) == 16 and len(text_pos) >= 1  # both parts are trained
        sc_image = self_certainty(janus.model.generation_head(hidden[i, image_pos]))
        sc_text = self_certainty(janus.lm_head(hidden[i, text_pos]))
        assert call["self_certainty_image"][i] == pytest.approx(sc_image.mean().item(), rel=1e-4, abs=1e-7)
        assert call["self_certainty_text"][i] == pytest.approx(sc_text.mean().item(), rel=1e-4, abs=1e-7)
        both = torch.cat([sc_text, sc_image]).mean().item()
        assert call["self_certainty"][i] == pytest.approx(both, rel=1e-4, abs=1e-7)
        assert call["cot"][i] == trainer._tokenizer.decode(ids[i, text_pos + 1], skip_special_tokens=True)

    # The rollout's tokens are scored by the training forward (finite log-probs, ratio 1 on the first step).
    with torch.no_grad():
        logps, _ = janus_completion_logps(
            janus, ids, mask, out["mm_token_type_ids"], out["completion_ids"].shape[1]
        )
    assert torch.isfinite(logps[trained]).all()
    # NSC and the recorder both scored; group advantages of the recorder's 0,1,2,3 are ±1 within each pair.
    assert out["advantages"].shape == (4,)


def _params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def test_lora_training_changes_only_adapter(tmp_path):
    trainer = _trainer(tmp_path)
    before = _params(trainer.model)
    trainer.train()
    after = _params(trainer.model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed)
    assert any("language_model" in k for k in changed)
    assert not any(k for k in before if "lora_" in k and "vision_model" in k)


def test_full_finetuning_reaches_both_heads_and_keeps_frozen_parts(tmp_path):
    trainer = _trainer(tmp_path, janus_lora=False, beta=0.0)
    before = _params(trainer.model)
    trainer.train()
    after = _params(trainer.model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("model.generation_head.") for k in changed), "image tokens must reach the loss"
    assert any(k.startswith("model.language_model.") for k in changed)
    # lm_head is tied to the input embeddings: text tokens reach the loss through it.
    assert "model.language_model.embed_tokens.weight" in changed
    for frozen in ("model.vision_model.", "model.aligner.", "model.vqmodel.", "model.generation_aligner."):
        assert not any(k.startswith(frozen) for k in changed), frozen


def test_use_cot_false_generates_no_cot(tmp_path):
    recorder = _Recorder()
    trainer = _trainer(tmp_path, recorder, use_cot=False)
    out = trainer._generate_and_score_completions(_batch(trainer))
    (call,) = recorder.calls
    assert call["cot"] == [""] * 4
    assert out["completion_ids"].shape[1] == 17  # BOI + 16 image tokens
    assert int(out["tool_mask"].sum()) == 4 * 16
    assert call["self_certainty"] == pytest.approx(call["self_certainty_image"])


def test_adapter_save_and_reload_round_trip(tmp_path):
    trainer = _trainer(tmp_path / "run")
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert (tmp_path / "adapter" / "README.md").exists()
    base, processor = tiny_janus(seed=0)
    restore_janus_generation_config(base, processor)
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    ids = torch.randint(0, 64, (2, 24))
    mask = torch.ones_like(ids)
    image = torch.zeros_like(ids)
    image[:, 8:] = 1
    trained = trainer.accelerator.unwrap_model(trainer.model).eval()
    with torch.no_grad():
        expected, _ = janus_completion_logps(trained.get_base_model(), ids, mask, image, 20)
        got, _ = janus_completion_logps(reloaded.get_base_model(), ids, mask, image, 20)
        untrained, _ = janus_completion_logps(tiny_janus(seed=0)[0], ids, mask, image, 20)
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(untrained, expected)


def test_invalid_janus_settings_raise(tmp_path):
    with pytest.raises(ValueError, match="cfg_weight"):
        _config(tmp_path, cfg_weight=0.5)
    with pytest.raises(ValueError, match="num_generations"):
        _config(tmp_path, num_generations=1, per_device_train_batch_size=2)
    with pytest.raises(ValueError, match="image_token_num"):
        _trainer(tmp_path, image_token_num=576)
    with pytest.raises(ValueError, match="image_size"):
        _trainer(tmp_path, image_size=384)
    model, processor = tiny_janus(seed=0)
    model.model.generation_head = None
    with pytest.raises(ValueError, match="generation_head"):
        IntrinsicGRPOTrainer(model, [nsc_reward], args=_config(tmp_path), processing_class=processor)


def test_paper_recipe_config_parses():
    config, model_config = TrlParser((IntrinsicGRPOConfig, ModelConfig)).parse_args_and_config(
        ["--config", str(CONFIG), "--use_cpu", "true", "--bf16", "false"]
    )
    assert model_config.model_name_or_path == "deepseek-community/Janus-Pro-1B"
    assert (config.num_generations, config.cfg_weight, config.learning_rate, config.beta) == (
        8,
        5.0,
        1e-6,
        0.01,
    )
    assert (config.max_completion_length, config.image_token_num, config.image_size) == (1024, 576, 384)
    assert config.use_cot and config.janus_lora
