"""IntrinsicGRPOTrainer under ``torchrun --nproc_per_node 2`` (gloo, CPU), on a tiny causal LM and a tiny Janus.

One prompt group of G = 4 completions per generation spans both processes (1 row per micro-step, 2 micro-steps
per generation, 2 processes). Each process writes ``<results>/<kind>_rank<i>.json`` with, for the first rollout,
the prompts, what ``_generate`` returned (text LM), the self-certainty of its own rows, the rewards of all rows
as gathered before normalising, its own advantages, and the files it opened for writing under the output
directory. The text LM run is also resumed from its mid-generation ``checkpoint-1``: the rollouts of the step
after the resume and the final adapter weights of both runs are written to ``text_rank<i>.safetensors``.

Usage: ``torchrun --nproc_per_node 2 <this> OUTPUT_DIR RESULTS_DIR``.
"""

import json
import os
import sys

import torch
from accelerate import PartialState
from datasets import Dataset
from peft import LoraConfig
from safetensors.torch import save_file

from trl_intrinsic import IntrinsicGRPOConfig, IntrinsicGRPOTrainer
from trl_intrinsic.rewards import nsc_reward
from trl_intrinsic.testing import tiny_causal_lm, tiny_janus

PROMPTS = ["a red circle", "two blue squares", "a green triangle", "a yellow square"]


def make_trainer(
    kind: str, output_dir: str, per_device_train_batch_size: int, **overrides
) -> IntrinsicGRPOTrainer:
    """The trainer of this script; a single process with ``per_device_train_batch_size=2`` sees the same
    generation batches as two processes with 1."""
    values = dict(
        output_dir=output_dir, use_cpu=True, bf16=False, report_to="none", seed=2, disable_tqdm=True,
        per_device_train_batch_size=per_device_train_batch_size, num_generations=4, steps_per_generation=2,
        max_completion_length=6, learning_rate=1e-2, beta=0.0, max_steps=1, logging_steps=1,
        save_strategy="steps", save_steps=1, gradient_checkpointing=False, log_completions=True,
    )  # fmt: skip
    values.update(overrides)
    dataset = Dataset.from_dict({"prompt": PROMPTS})
    if kind == "janus":
        model, processor = tiny_janus(seed=0)
        values["max_completion_length"] = 4
        return IntrinsicGRPOTrainer(
            model,
            [nsc_reward],
            args=IntrinsicGRPOConfig(**values),
            train_dataset=dataset,
            processing_class=processor,
        )
    model, tokenizer = tiny_causal_lm(seed=0)
    return IntrinsicGRPOTrainer(
        model, [nsc_reward], args=IntrinsicGRPOConfig(**values), train_dataset=dataset, processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )  # fmt: skip


def record_rollouts(trainer: IntrinsicGRPOTrainer) -> list[dict]:
    """Keep, for every rollout: the prompts, the `_generate` output (text LM), the self-certainty of the local
    rows, the gathered rewards and the local advantages."""
    records = []
    generate, rewards, score = (
        trainer._generate,
        trainer._calculate_rewards,
        trainer._generate_and_score_completions,
    )

    def recorded_generate(prompts):
        output = generate(prompts)
        records.append({"generate": list(output)})
        return output

    def recorded_rewards(inputs, *args):
        gathered = rewards(inputs, *args)
        if not records or "rewards" in records[-1]:
            records.append({})
        records[-1]["self_certainty"] = [float(x["self_certainty"]) for x in inputs]
        records[-1]["rewards"] = gathered.cpu().tolist()
        return gathered

    def recorded_score(inputs):
        output = score(inputs)
        records[-1]["prompts"] = [x["prompt"] for x in inputs]
        records[-1]["step"] = trainer.state.global_step
        records[-1]["advantages"] = output["advantages"].cpu().tolist()
        records[-1]["completion_ids"] = output["completion_ids"].cpu()
        return output

    trainer._generate = recorded_generate
    trainer._calculate_rewards = recorded_rewards
    trainer._generate_and_score_completions = recorded_score
    return records


def lora_weights(trainer: IntrinsicGRPOTrainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items() if "lora_" in k}


def main(output_dir: str, results_dir: str) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    written = []

    def audit(event, args):
        # Python-level file creation (open for writing, mkdir); safetensors writes from Rust and is not seen.
        if event == "open" and isinstance(args[0], str | bytes | os.PathLike) and isinstance(args[1], str):
            writing = any(flag in args[1] for flag in "wax+")
        elif event == "os.mkdir":
            writing = True
        else:
            return
        if writing:
            written.append(os.path.realpath(os.fsdecode(args[0])))

    sys.addaudithook(audit)
    os.makedirs(results_dir, exist_ok=True)
    for kind in ("text", "janus"):
        root = os.path.join(output_dir, kind)
        real_root = os.path.realpath(root)
        trainer = make_trainer(
            kind, root, per_device_train_batch_size=1, max_steps=3 if kind == "text" else 1
        )
        records = record_rollouts(trainer)
        trainer.train()
        first = records[0]
        result = {
            "world_size": trainer.accelerator.num_processes,
            "prompts": first["prompts"],
            "self_certainty": first["self_certainty"],
            "rewards": first["rewards"],
            "advantages": first["advantages"],
            "completion_ids": first["completion_ids"].tolist(),
            "written": sorted(
                {os.path.relpath(p, real_root) for p in written if p.startswith(real_root + os.sep)}
            ),
        }
        if kind == "text":
            result["generate"] = first["generate"]
            # resume the same run from its mid-generation checkpoint-1, in a fresh output directory
            resumed = make_trainer(kind, root + "-resumed", per_device_train_batch_size=1, max_steps=3)
            resumed_records = record_rollouts(resumed)
            resumed.train(resume_from_checkpoint=os.path.join(root, "checkpoint-1"))
            assert [r["step"] for r in records] == [0, 2] and [r["step"] for r in resumed_records] == [2]
            tensors = {
                "full_step2_completion_ids": records[1]["completion_ids"],
                "resumed_step2_completion_ids": resumed_records[0]["completion_ids"],
            }
            tensors.update({f"full.{k}": v for k, v in lora_weights(trainer).items()})
            tensors.update({f"resumed.{k}": v for k, v in lora_weights(resumed).items()})
            save_file(
                {k: v.contiguous() for k, v in tensors.items()},
                os.path.join(results_dir, f"text_rank{rank}.safetensors"),
            )
        with open(os.path.join(results_dir, f"{kind}_rank{rank}.json"), "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    # Every file is written: leave without interpreter teardown, where torch's background threads
    # occasionally abort a rank ("terminate called without an active exception") after a clean run.
    PartialState().wait_for_everyone()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
