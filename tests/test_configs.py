"""The shipped YAML configs load: SFT/eval files into their dataclasses, accelerate files with accelerate's loader.

Catches typos (unknown keys are errors in ``build_config`` and in accelerate's ``ClusterConfig``) and checks
the few invariants the recipes promise: total batch 128 on 8 GPUs, bf16, and no accelerate-side gradient
accumulation that would override the trainer's. Needs neither a GPU nor DeepSpeed.
"""

from pathlib import Path

import pytest
import yaml

from agdo.config import build_config
from agdo.eval import EvalConfig
from agdo.data import BENCHMARKS
from agdo.training.mdpo import OverdenoisingConfig
from agdo.training.rl import RL_METHODS, RLConfig
from agdo.training.sft import SFTConfig

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SFT_FILES = sorted((CONFIGS / "sft").glob("*.yaml"))
EVAL_FILES = sorted((CONFIGS / "eval").glob("*.yaml"))
RL_FILES = sorted((CONFIGS / "rl").glob("*.yaml"))
ACCELERATE_FILES = sorted((CONFIGS / "accelerate").glob("*.yaml"))
FILTER_FILES = sorted((CONFIGS / "filter").glob("*.yaml"))
NUM_GPUS = 8  # the accelerate configs' num_processes; the paper's total batch is 128 (App. C)


def _ids(paths):
    return [p.relative_to(CONFIGS).as_posix() for p in paths]


def test_configs_exist():
    assert SFT_FILES and EVAL_FILES and ACCELERATE_FILES and RL_FILES and FILTER_FILES
    # Every RL method has a paper-scale recipe (the AGDO paper's Tables 2 and 4, MDPO's paper 003).
    methods = {build_config(RLConfig, path).method for path in RL_FILES}
    assert methods == set(RL_METHODS)
    for name in ("deepspeed_zero2.yaml", "deepspeed_zero3.yaml", "ddp.yaml"):
        assert (CONFIGS / "accelerate" / name).is_file()


@pytest.mark.parametrize("path", SFT_FILES, ids=_ids(SFT_FILES))
def test_sft_config_loads(path):
    config = build_config(SFTConfig, path)
    assert config.mixed_precision == "bf16"
    assert config.per_device_train_batch_size * config.gradient_accumulation_steps * NUM_GPUS == 128
    assert config.learning_rate == pytest.approx(1e-6)
    assert config.num_train_epochs == 1
    assert config.post_num == 16
    assert config.model_name_or_path and not config.model_name_or_path.startswith(("http", "hf://"))
    if config.method == "agdo":
        assert config.gamma == 100.0
    if config.method == "random":
        assert config.random_masks_per_sample == 35


@pytest.mark.parametrize("path", RL_FILES, ids=_ids(RL_FILES))
def test_rl_config_loads(path):
    config = build_config(RLConfig, path)
    assert config.mixed_precision == "bf16" and config.model_name_or_path
    assert bool(config.train_file) != bool(config.benchmarks)
    assert all(name in BENCHMARKS for name in config.benchmarks or [])
    if config.method == "mdpo":  # paper 003 §3.1 and App. A.3
        assert config.learning_rate == pytest.approx(7e-7) and config.max_steps == 100
        assert (config.num_generations, config.diffusion_steps, config.steps_per_sample) == (8, 128, 8)
        assert config.beta == 0.08 and config.block_length_mixture == [128, 512]
        return
    assert config.learning_rate == pytest.approx(1e-6) and config.temperature == 1.0
    if config.method in ("diffu_grpo", "wd1"):  # §6.1: 15 independent masks per response
        assert config.masks_per_sample == 15 and config.p_mask_prompt == 0.15
    if config.method == "coupled":  # 5 draws x 3 forwards = 15 forward passes per response
        assert config.masks_per_sample == 5
    if path.name != "quick.yaml":  # the paper's App. C settings
        assert (config.prompts_per_step, config.num_generations, config.max_completion_length) == (32, 8, 1024)
        assert config.diffusion_steps is None  # one token per step
        assert config.post_num == (0 if "code" in path.name else 16)
        if config.method == "agdo":
            assert config.delta == 1.0 and config.influence_norm == "sum"


@pytest.mark.parametrize("path", EVAL_FILES, ids=_ids(EVAL_FILES))
def test_eval_config_loads(path):
    config = build_config(EvalConfig, path)
    assert config.benchmarks and config.algs and config.seeds
    assert config.block_length is None or config.gen_length % config.block_length == 0
    assert config.steps % (config.gen_length // (config.block_length or config.gen_length)) == 0


@pytest.mark.parametrize("path", FILTER_FILES, ids=_ids(FILTER_FILES))
def test_filter_config_loads(path):
    config = build_config(OverdenoisingConfig, path)
    assert config.sampler_config().return_predictions and config.temperature == 0.0
    assert all(name in BENCHMARKS for name in config.benchmarks or [])


def test_overrides_apply_to_shipped_config():
    config = build_config(SFTConfig, CONFIGS / "sft" / "dream_v0_instruct_7b_agdo.yaml",
                          ["model_name_or_path=/tmp/model", "gamma=50"])
    assert config.model_name_or_path == "/tmp/model" and config.gamma == 50.0
    with pytest.raises(ValueError, match="unknown"):
        build_config(SFTConfig, CONFIGS / "sft" / "dream_v0_instruct_7b_agdo.yaml", ["gama=50"])


@pytest.mark.parametrize("path", ACCELERATE_FILES, ids=_ids(ACCELERATE_FILES))
def test_accelerate_config_parses(path):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.utils import DistributedType

    config = load_config_from_file(str(path))  # the loader `accelerate launch --config_file` uses
    assert isinstance(config, ClusterConfig)
    assert ClusterConfig.from_yaml_file(str(path)) == config  # unknown top-level keys raise here
    assert config.mixed_precision == "bf16"
    assert config.num_processes == NUM_GPUS and config.num_machines == 1
    if path.stem.startswith("deepspeed"):
        assert config.distributed_type == DistributedType.DEEPSPEED
        assert config.deepspeed_config["zero_stage"] == int(path.stem[-1])
        # Set here, accelerate would export it and override SFTConfig.gradient_accumulation_steps.
        assert "gradient_accumulation_steps" not in config.deepspeed_config
    else:
        assert config.distributed_type == DistributedType.MULTI_GPU


@pytest.mark.parametrize("path", ACCELERATE_FILES, ids=_ids(ACCELERATE_FILES))
def test_accelerate_launch_accepts_config(path):
    """Nested ``deepspeed_config`` keys are not checked by ClusterConfig: check them against the launcher."""
    launch = pytest.importorskip("accelerate.commands.launch")
    parser = launch.launch_command_parser()
    options = {action.dest for action in parser._actions}
    nested = yaml.safe_load(path.read_text()).get("deepspeed_config", {})
    assert set(nested) <= options, f"deepspeed_config keys unknown to `accelerate launch`: {set(nested) - options}"
    if not hasattr(launch, "_validate_launch_command"):  # private helper; only in the accelerate we pin against
        pytest.skip("accelerate.commands.launch._validate_launch_command not available")
    args = parser.parse_args(["--config_file", str(path), "-m", "agdo.cli", "sft"])
    args, _, _ = launch._validate_launch_command(args)  # fills the launch args from the file; no GPU/DeepSpeed needed
    assert args.num_processes == NUM_GPUS and args.mixed_precision == "bf16"
    assert args.use_deepspeed == path.stem.startswith("deepspeed")
    assert args.gradient_accumulation_steps is None  # the trainer's value wins
