"""The accelerate configs load with accelerate's own parsers, build its plugin objects, and (for ZeRO) pass
DeepSpeed's config parser; the command lines of the configs' README go through `accelerate launch`'s
argument validation."""

import argparse
import os
import re
import shlex
from pathlib import Path
from unittest import mock

import pytest
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin
from accelerate.utils.launch import (
    prepare_deepspeed_cmd_env,
    prepare_multi_gpu_env,
    prepare_simple_launcher_cmd_env,
)

import trl_intrinsic

CONFIG_DIR = Path(trl_intrinsic.__file__).parent / "accelerate_configs"
REPO = CONFIG_DIR.parents[1]
EXPECTED = {
    "single_gpu": DistributedType.NO,
    "multi_gpu": DistributedType.MULTI_GPU,
    "zero2": DistributedType.DEEPSPEED,
    "zero3": DistributedType.DEEPSPEED,
    "fsdp": DistributedType.FSDP,
}


def _launch_env(argv: list[str]) -> tuple[argparse.Namespace, dict[str, str]]:
    """Parse and validate ``accelerate launch <argv>`` as the CLI does; return the args and the environment
    the launcher would give the training processes."""
    args = launch_command_parser().parse_args(argv)
    args, defaults, mixed_precision_from_config = _validate_launch_command(args)
    if args.use_deepspeed:
        fields = list(defaults.deepspeed_config) if defaults else []
        args.deepspeed_fields_from_accelerate_config = ",".join(
            fields + (["mixed_precision"] if mixed_precision_from_config else [])
        )
        _, env = prepare_deepspeed_cmd_env(args)
    elif args.use_fsdp or args.multi_gpu:
        env = prepare_multi_gpu_env(args)
    else:
        _, env = prepare_simple_launcher_cmd_env(args)
    return args, env


def _deepspeed_config(env: dict[str, str], micro_batch: int = 2, accumulation: int = 1) -> dict:
    """The DeepSpeed config accelerate builds from the launcher environment, with the ``auto`` values the
    Trainer fills in (one process: DeepSpeed reads the world size from torch.distributed)."""
    with mock.patch.dict(os.environ, env, clear=True):
        config = DeepSpeedPlugin().deepspeed_config
    auto = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro_batch * accumulation,
        "gradient_clipping": 1.0,
    }
    filled = {key: (auto[key] if value == "auto" else value) for key, value in config.items()}
    filled["bf16"] = {"enabled": env.get("ACCELERATE_MIXED_PRECISION") == "bf16"}
    return filled


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads_with_accelerate(name):
    path = CONFIG_DIR / f"{name}.yaml"
    config = ClusterConfig.from_yaml_file(str(path))  # raises on unknown keys
    assert config.distributed_type == EXPECTED[name]
    assert config.mixed_precision == "bf16"
    assert config.num_machines == 1 and not config.use_cpu
    assert type(load_config_from_file(str(path))) is ClusterConfig
    args, env = _launch_env(["--config_file", str(path), "train.py"])
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    assert args.num_processes == (1 if name == "single_gpu" else 8)
    assert bool(args.use_deepspeed) == (name.startswith("zero"))
    assert bool(args.use_fsdp) == (name == "fsdp")


def test_fsdp_config_builds_the_plugin():
    _, env = _launch_env(["--config_file", str(CONFIG_DIR / "fsdp.yaml"), "train.py"])
    with mock.patch.dict(os.environ, env, clear=True):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is True
    assert plugin.state_dict_type.name == "FULL_STATE_DICT"
    assert (
        plugin.auto_wrap_policy is not None
        and plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"
    )
    # no class names: accelerate wraps the model's `_no_split_modules` (the transformer blocks)
    assert plugin.transformer_cls_names_to_wrap is None


@pytest.mark.parametrize(
    ("name", "extra", "stage", "offload"),
    [
        ("zero2", [], 2, "none"),
        ("zero3", [], 3, "none"),
        ("zero3", ["--offload_optimizer_device", "cpu", "--offload_param_device", "cpu"], 3, "cpu"),
    ],
    ids=["zero2", "zero3", "zero3-offload"],
)
def test_deepspeed_configs_build_the_plugin_and_parse_in_deepspeed(name, extra, stage, offload):
    _, env = _launch_env(["--config_file", str(CONFIG_DIR / f"{name}.yaml"), *extra, "train.py"])
    config = _deepspeed_config(env)
    zero = config["zero_optimization"]
    assert zero["stage"] == stage
    assert zero["offload_optimizer"]["device"] == offload and zero["offload_param"]["device"] == offload
    if stage == 3:
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True  # full weights on save

    deepspeed_config = pytest.importorskip(
        "deepspeed.runtime.config", reason="DeepSpeed is not installed (DS_BUILD_OPS=0 pip install deepspeed)"
    )
    parsed = deepspeed_config.DeepSpeedConfig(config)
    assert parsed.zero_optimization_stage == stage
    assert parsed.zero_config.offload_optimizer.device == offload
    assert parsed.zero_config.offload_param.device == offload
    assert parsed.bfloat16_config.enabled and parsed.train_micro_batch_size_per_gpu == 2
    # DeepSpeed's parser is not a rubber stamp: an inconsistent batch is refused
    with pytest.raises(AssertionError, match="train_batch_size"):
        deepspeed_config.DeepSpeedConfig({**config, "train_batch_size": 3})


def _readme_commands() -> list[str]:
    text = (CONFIG_DIR / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL)
    commands = [
        " ".join(line.rstrip("\\").strip() for line in block.strip().splitlines()) for block in blocks
    ]
    return [c for c in commands if "accelerate launch" in c]


def test_readme_command_lines_are_valid_launches():
    commands = _readme_commands()
    assert len(commands) >= 4  # SOLACE, IRIS, multi-node Flow-GRPO, CPU
    seen = set()
    for command in commands:
        words = shlex.split(command)
        env_overrides = dict(w.split("=", 1) for w in words[: words.index("accelerate")])
        argv = words[words.index("launch") + 1 :]
        if "--config_file" in argv:
            config = argv[argv.index("--config_file") + 1]
            assert (REPO / config).is_file(), f"README refers to a missing config {config}"
            argv[argv.index("--config_file") + 1] = str(REPO / config)
            seen.add(Path(config).stem)
        with mock.patch.dict(os.environ, env_overrides):
            args, env = _launch_env(argv)
        assert args.num_processes >= 2, command
        if "--offload_param_device" in argv:
            config = _deepspeed_config(env)["zero_optimization"]
            assert config["stage"] == 3 and config["offload_param"]["device"] == "cpu"
        if args.num_machines > 1:
            # torchrun's node arguments, as `multi_gpu_launcher` passes them
            endpoint = getattr(args, "master_addr", None) or args.rdzv_endpoint.split(":")[0]
            assert int(args.nnodes) == args.num_machines > 1 and endpoint == args.main_process_ip
            assert int(args.nproc_per_node) * args.num_machines == args.num_processes
    assert {"multi_gpu", "zero3"} <= seen
    assert any(shlex.split(c).count("--num_machines") and "--machine_rank" in c for c in commands)
