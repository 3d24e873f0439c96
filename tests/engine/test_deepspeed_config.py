"""DeepSpeed configuration: the vlmtune config is the one source of batch, accumulation, clipping, precision."""
from __future__ import annotations

import json

import pytest
import torch

from vlmtune.config import TrainConfig
from vlmtune.engine.deepspeed_config import DEEPSPEED_DIR, deepspeed_config, resolve_deepspeed
from vlmtune.errors import UserError

SHIPPED = {"deepspeed_zero1": 1, "deepspeed_zero2": 2, "deepspeed_zero2_offload": 2, "deepspeed_zero3": 3,
           "deepspeed_zero3_offload": 3}
CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)  # only the device type is read: no GPU needed


def values(tree):
    """Every leaf value of a JSON tree."""
    if isinstance(tree, dict):
        return [v for x in tree.values() for v in values(x)]
    return [tree]


def test_every_shipped_config_is_listed():
    assert sorted(p.stem for p in DEEPSPEED_DIR.glob("*.json")) == sorted(SHIPPED)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_vlmtune_values_fill_the_shipped_config(name):
    train = TrainConfig(batch_size=16, accumulative_counts=4, max_norm=0.5)
    cfg = deepspeed_config(name, train, torch.bfloat16, world_size=8, device=GPU)
    assert cfg["train_micro_batch_size_per_gpu"] == 16 and cfg["gradient_accumulation_steps"] == 4
    assert cfg["train_batch_size"] == 16 * 4 * 8 and cfg["gradient_clipping"] == 0.5
    assert cfg["bf16"]["enabled"] is True and cfg["fp16"]["enabled"] is False
    assert "auto" not in values(cfg)  # DeepSpeed itself does not resolve "auto" (only HF's integration does)
    shipped = json.loads((DEEPSPEED_DIR / f"{name}.json").read_text())
    assert cfg["zero_optimization"] == shipped["zero_optimization"]  # stage and offload settings kept
    assert cfg["zero_optimization"]["stage"] == SHIPPED[name]
    assert ("offload_optimizer" in cfg["zero_optimization"]) == name.endswith("_offload")


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_deepspeed_accepts_the_filled_config(name):
    """DeepSpeed's own parser and batch check (train = micro x accumulation x world; one process here)."""
    from deepspeed.runtime.config import DeepSpeedConfig

    parsed = DeepSpeedConfig(deepspeed_config(name, TrainConfig(batch_size=2, accumulative_counts=3, max_norm=2.0),
                                              torch.float32, world_size=1, device=CPU))
    assert (parsed.train_batch_size, parsed.train_micro_batch_size_per_gpu, parsed.gradient_accumulation_steps) == (6, 2, 3)
    assert parsed.gradient_clipping == 2.0 and parsed.zero_optimization_stage == SHIPPED[name]


def test_precision_flags_follow_the_model_dtype():
    train = TrainConfig()
    fp16 = deepspeed_config("deepspeed_zero2", train, torch.float16, 1, GPU)  # a GPU without bf16 (V100, T4)
    assert fp16["fp16"] == {"enabled": True, "initial_scale_power": 16} and fp16["bf16"]["enabled"] is False
    fp32 = deepspeed_config("deepspeed_zero2", train, torch.float32, 1, CPU)
    assert fp32["fp16"]["enabled"] is False and fp32["bf16"]["enabled"] is False
    assert deepspeed_config("deepspeed_zero2", train, torch.bfloat16, 1, CPU)["bf16"]["enabled"] is True


def test_fp16_on_cpu_is_refused_with_what_to_use():
    with pytest.raises(UserError, match="fp16 training is not supported on CPU.*bfloat16"):
        deepspeed_config("deepspeed_zero2", TrainConfig(), torch.float16, 1, CPU)


def test_a_json_path_works_and_its_own_batch_values_are_overridden(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"train_batch_size": 999, "gradient_accumulation_steps": 7,
                                "zero_optimization": {"stage": 1}, "wall_clock_breakdown": True}))
    cfg = deepspeed_config(str(path), TrainConfig(batch_size=3, accumulative_counts=2), torch.float32, 2, CPU)
    assert (cfg["train_batch_size"], cfg["gradient_accumulation_steps"]) == (12, 2)
    assert cfg["wall_clock_breakdown"] is True and cfg["zero_optimization"] == {"stage": 1}
    assert resolve_deepspeed("deepspeed_zero3.json") == DEEPSPEED_DIR / "deepspeed_zero3.json"


def test_unknown_name_and_broken_json_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="'deepspeed_zero4' is neither a JSON file nor one of: deepspeed_zero1, "):
        deepspeed_config("deepspeed_zero4", TrainConfig(), torch.float32, 1, CPU)
    broken = tmp_path / "broken.json"
    broken.write_text('{\n  "zero_optimization": {"stage": 2},\n  oops\n}')
    with pytest.raises(UserError, match="broken.json: invalid JSON at line 3"):
        deepspeed_config(str(broken), TrainConfig(), torch.float32, 1, CPU)


@pytest.mark.parametrize("name", ["deepspeed_zero2_offload", "deepspeed_zero3_offload"])
def test_offload_pins_host_memory_only_for_gpus(name):
    """The shipped offload JSONs pin host memory (for copies to a GPU); CPU ranks have nothing to pin."""
    shipped = json.loads(resolve_deepspeed(name).read_text())["zero_optimization"]
    offloads = [k for k in ("offload_optimizer", "offload_param") if k in shipped]
    assert offloads and all(shipped[k]["pin_memory"] is True for k in offloads)
    train = TrainConfig()
    on_cpu = deepspeed_config(name, train, torch.float32, 2, CPU)["zero_optimization"]
    on_gpu = deepspeed_config(name, train, torch.bfloat16, 8, GPU)["zero_optimization"]
    assert all(on_cpu[k]["pin_memory"] is False and on_gpu[k]["pin_memory"] is True for k in offloads)
    assert {k: {**v, "pin_memory": True} for k, v in on_cpu.items() if k in offloads} == {k: shipped[k] for k in offloads}


def test_zero_stage_of_every_shipped_config():
    from vlmtune.engine.deepspeed_config import zero_stage

    assert {name: zero_stage(name) for name in SHIPPED} == SHIPPED
