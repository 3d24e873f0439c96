"""`vlmtune train CFG --dry-run`: the memory each GPU needs, before anything launches.

The model is built on the meta device by the code that builds it for training (model/build.py
`build_meta_model`), from config.json files only: the config's folders, or for the hub ids the recipes name the
architecture configs shipped in vlmtune/assets/model_configs/. Counts come from its real module shapes and
trainable flags; nothing is downloaded, allocated or launched.

Per GPU, in bytes (N GPUs, w = bytes of the training precision, P_t trained and P_f frozen parameters):

    parameters   ZeRO-1/2: every weight (frozen 4/8-bit ones packed); ZeRO-3: a 1/N partition of each, plus
                 whole copies of those under stage3_param_persistence_threshold; offload_param: on the host
    gradients    w P_t (ZeRO-1), w P_t / N (ZeRO-2/3); offload_optimizer: fp32 on the host
    optimizer    fp32 master weights + Adam's two moments: 12 P_t / N, on the host with offload_optimizer

DeepSpeed's own estimators (`estimate_zero2/3_model_states_mem_needs`) are printed beside them: they count
every parameter as trained. Activations follow the formula in docs/training.md (`activation_bytes`). The
count is checked against the tensors DeepSpeed ranks really hold by vlmtune/engine/memory_census.py.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from vlmtune.config import Config, ModelConfig, load_config, parse_cfg_options
from vlmtune.errors import UserError
from vlmtune.plan_activations import activation_bytes
from vlmtune.plan_report import GiB, render

MODEL_CONFIGS = Path(__file__).resolve().parent / "assets" / "model_configs"
ADAM_STATE_BYTES = 8  # exp_avg + exp_avg_sq, fp32
MASTER_BYTES = 4  # DeepSpeed's fp32 copy of the trained weights


def architecture_folder(name_or_path: str, key: str) -> str:
    """A folder holding the model's config.json: the local folder itself, else the shipped config of that hub id."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path)
    shipped = MODEL_CONFIGS / name_or_path
    if not name_or_path.startswith((".", "/", "~")) and (shipped / "config.json").is_file():
        return str(shipped)
    known = sorted(str(p.parent.relative_to(MODEL_CONFIGS)) for p in MODEL_CONFIGS.glob("*/*/config.json"))
    raise UserError(f"{key} {name_or_path!r} is neither a local folder nor a hub id with a shipped architecture config "
                    f"({', '.join(known)}); point {key} at a folder holding the model's config.json (a remote-code "
                    "model such as InternLM2 also needs its modeling files there and trust_remote_code=True)")


@dataclass
class Part:
    """One part of the model: its parameters (elements), how many train, and the bytes of its frozen ones."""

    name: str
    params: int = 0
    trained: int = 0
    frozen_bytes: int = 0  # as training stores them: packed 4/8-bit, else the training precision
    largest_trained: int = 0  # elements of its largest trained tensor (DeepSpeed's offload gradient buffers)


def stored_bytes(param: torch.nn.Parameter, w: int) -> int:
    """Bytes a frozen weight takes in training: bitsandbytes' packed storage and quantization statistics for
    4-bit (nf4: half a byte each, one absmax per block, double-quantized to a byte with an fp32 absmax per 256
    blocks) and 8-bit (a byte each, an fp32 scale per output row); otherwise `w` per element (DeepSpeed casts
    every floating weight to the training precision)."""
    import bitsandbytes as bnb

    n = param.numel()
    if isinstance(param, bnb.nn.Params4bit):
        blocks = math.ceil(n / param.blocksize)
        stats = blocks + 4 * math.ceil(blocks / 256) if param.compress_statistics else 4 * blocks
        return math.ceil(n / 2) + stats
    if isinstance(param, bnb.nn.Int8Params):
        return n + 4 * param.shape[0]
    return n * w


def count_parts(model, w: int) -> list[Part]:
    """LLM, LLM LoRA, vision tower, vision LoRA, projector (+ AnyRes newline) of a (meta) LlavaModel."""
    names = {"llm": "LLM", "visual_encoder": "vision tower", "projector": "projector", "image_newline": "projector"}
    parts: dict[str, Part] = {}
    for name, param in model.named_parameters():
        label = names[name.split(".")[0]] + (" LoRA" if ".lora_" in name else "")
        part = parts.setdefault(label, Part(label))
        part.params += param.numel()
        if param.requires_grad:
            part.trained += param.numel()
            part.largest_trained = max(part.largest_trained, param.numel())
        else:
            part.frozen_bytes += stored_bytes(param, w)
    return list(parts.values())


@dataclass
class ZeroSettings:
    """What of a DeepSpeed JSON decides where model states live."""

    name: str
    stage: int
    offload_optimizer: bool
    offload_param: bool
    persistence_threshold: int  # ZeRO-3 keeps whole parameters below this many elements on every rank


def zero_settings(name_or_path: str) -> ZeroSettings:
    """The ZeRO stage and offloads of a shipped DeepSpeed config name or JSON path (DeepSpeed's defaults apply)."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    from vlmtune.engine.deepspeed_config import resolve_deepspeed

    path = resolve_deepspeed(name_or_path)
    try:
        zero = json.loads(path.read_text()).get("zero_optimization", {})
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    parsed = DeepSpeedZeroConfig(**zero)
    stage = int(parsed.stage)
    if stage not in (1, 2, 3):
        raise UserError(f"{path}: ZeRO stage {stage} is not planned; use a deepspeed_zero1/2/3 config")
    device = lambda offload: offload is not None and str(offload.device).endswith(("cpu", "nvme"))  # noqa: E731
    return ZeroSettings(path.stem, stage, device(parsed.offload_optimizer), stage == 3 and device(parsed.offload_param),
                        int(parsed.param_persistence_threshold))


@dataclass
class ModelStates:
    """Bytes per rank of each component: on the GPU, and on the host (offload)."""

    parameters: int
    gradients: int
    optimizer: int
    host_parameters: int
    host_gradients: int
    host_optimizer: int
    step_buffer: int  # transient at the optimizer step: the fp32 gradient partition (GPU, without offload)
    gathered: int  # transient ZeRO-3 working set: DeepSpeed's 4 x largest layer (16-bit weights + gradients)
    deepspeed_estimate: int  # DeepSpeed's estimator for the trained parameters + the frozen weights, per GPU

    @property
    def gpu(self) -> int:
        return self.parameters + self.gradients + self.optimizer

    @property
    def host(self) -> int:
        return self.host_parameters + self.host_gradients + self.host_optimizer


def model_states(model, parts: list[Part], zero: ZeroSettings, gpus: int, w: int) -> ModelStates:
    """Parameters, gradients and optimizer states per rank under `zero` on `gpus` ranks (module docstring)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    trained = sum(p.trained for p in parts)
    frozen = sum(p.frozen_bytes for p in parts)
    shard = math.ceil(trained / gpus)  # each rank's partition of the flat trained parameters
    largest_trained = max(p.largest_trained for p in parts)
    largest_layer = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    if zero.stage < 3:
        params = frozen + w * trained
        grads = w * (trained if zero.stage == 1 else shard)
        estimate = frozen + estimate_zero2_model_states_mem_needs(trained, gpus, 1, zero.offload_optimizer)[1]
        gathered = 0
    else:
        params = _zero3_parameter_bytes(model, zero, gpus, w)
        grads = w * shard
        estimate = math.ceil(frozen / gpus) + estimate_zero3_model_states_mem_needs(
            trained, largest_layer, gpus, 1, zero.offload_optimizer, zero.offload_param)[1]
        gathered = 4 * largest_layer  # DeepSpeed's largest_layer_memory
    optimizer = (MASTER_BYTES + ADAM_STATE_BYTES) * shard
    host_params = host_grads = host_opt = 0
    if zero.offload_param:  # the partitions move to the host; persistent whole parameters stay on the GPU
        persistent = _zero3_persistent_bytes(model, zero, w)
        host_params, params = params - persistent, persistent
    if zero.offload_optimizer:  # master weights, moments and fp32 gradients on the host
        host_opt, optimizer = optimizer, 0
        if zero.stage < 3:  # a 16-bit partition copy on the host; a w x largest-parameter gradient buffer each side
            host_params += w * shard
            host_grads, grads = 4 * shard + w * largest_trained, w * largest_trained
        else:  # the 16-bit gradient partition moves to the host too
            host_grads, grads = 4 * shard + grads, 0
    step_buffer = 0 if zero.offload_optimizer else 4 * shard
    return ModelStates(params, grads, optimizer, host_params, host_grads, host_opt, step_buffer, gathered, estimate)


def _zero3_parameter_bytes(model, zero: ZeroSettings, gpus: int, w: int) -> int:
    """ZeRO-3: each parameter's 1/N partition (padded to whole elements), plus whole persistent parameters."""
    partitions = sum(math.ceil(p.numel() / gpus) * w for p in model.parameters())
    return partitions + _zero3_persistent_bytes(model, zero, w)


def _zero3_persistent_bytes(model, zero: ZeroSettings, w: int) -> int:
    """Parameters ZeRO-3 keeps whole on every rank (fewer elements than the persistence threshold)."""
    return sum(p.numel() * w for p in model.parameters() if p.numel() < zero.persistence_threshold)


@dataclass
class Plan:
    """Everything `--dry-run` prints."""

    config: Config
    zero: ZeroSettings
    gpus: int
    gpu_memory: float  # GiB
    dtype: torch.dtype
    parts: list[Part]
    states: ModelStates
    activations: dict[bool, int]  # gradient checkpointing on/off -> bytes per sample of max_length
    activation_fixed: dict[bool, int]  # ... bytes independent of the micro-batch

    def activation(self, micro_batch: int, checkpointing: bool | None = None) -> int:
        ckpt = self.config.model.use_gradient_checkpointing if checkpointing is None else checkpointing
        return self.activation_fixed[ckpt] + micro_batch * self.activations[ckpt]

    def peak(self, micro_batch: int, checkpointing: bool | None = None) -> int:
        """Model states + the larger of (activations + ZeRO-3's gathered layer) and the step's fp32 gradients."""
        s = self.states
        return s.gpu + max(self.activation(micro_batch, checkpointing) + s.gathered, s.step_buffer)

    def largest_micro_batch(self, checkpointing: bool | None = None) -> int:
        """The largest micro-batch whose peak fits in --gpu-memory (0: not even one sample)."""
        ckpt = self.config.model.use_gradient_checkpointing if checkpointing is None else checkpointing
        budget = self.gpu_memory * GiB
        if self.peak(1, ckpt) > budget:
            return 0
        free = budget - self.states.gpu - self.states.gathered - self.activation_fixed[ckpt]
        return int(free // self.activations[ckpt])  # the step's buffer fits: peak(1) did


def make_plan(cfg: Config, deepspeed: str, gpus: int, gpu_memory: float) -> Plan:
    """Build the model on meta and count it (a 7B config: a few seconds)."""
    from vlmtune.model.build import build_meta_model

    if gpus <= 0:
        raise UserError(f"--gpus {gpus}: give the number of GPUs the run will use (a positive integer, e.g. --gpus 8)")
    if gpu_memory <= 0:
        raise UserError(f"--gpu-memory {gpu_memory}: give each GPU's memory in GiB (e.g. --gpu-memory 80)")
    zero = zero_settings(deepspeed)
    if zero.stage == 3 and cfg.model.quantization is not None:
        raise UserError(f"{cfg.path}: quantization={cfg.model.quantization!r} (QLoRA) is not planned under ZeRO-3, "
                        "which partitions bitsandbytes weights as plain tensors; plan it with --deepspeed deepspeed_zero2")
    dtype = planned_dtype(cfg.model)
    llm = architecture_folder(cfg.model.llm_name_or_path, "llm_name_or_path")
    vision = architecture_folder(cfg.model.visual_encoder_name_or_path, "visual_encoder_name_or_path")
    model = build_meta_model(cfg.model, llm, vision, dtype)
    w = torch.finfo(dtype).bits // 8
    parts = count_parts(model, w)
    states = model_states(model, parts, zero, gpus, w)
    per_sample, fixed = {}, {}
    for ckpt in (False, True):
        one, two = (activation_bytes(model, cfg, b, w, ckpt) for b in (1, 2))
        per_sample[ckpt], fixed[ckpt] = two - one, 2 * one - two
    return Plan(cfg, zero, gpus, gpu_memory, dtype, parts, states, per_sample, fixed)


def planned_dtype(model: ModelConfig) -> torch.dtype:
    """The precision the run trains in on a GPU: the config's torch_dtype, 'auto' = bf16 (Ampere and later)."""
    from vlmtune.model.build import DTYPES

    return torch.bfloat16 if model.torch_dtype == "auto" else DTYPES[model.torch_dtype]


def accumulation(plan: Plan) -> tuple[int, int]:
    """(micro-batch, accumulative_counts) keeping gpus x batch_size x accumulative_counts: the largest divisor of
    the per-GPU batch that fits; (0, 0) when one sample does not fit."""
    per_gpu = plan.config.train.batch_size * plan.config.train.accumulative_counts
    fits = plan.largest_micro_batch()
    micro = max((b for b in range(1, min(fits, per_gpu) + 1) if per_gpu % b == 0), default=0)
    return micro, (per_gpu // micro if micro else 0)


def main(args) -> int:
    """CLI entry (`vlmtune train CFG --dry-run`): print the plan; exit 0 whether or not it fits."""
    cfg = load_config(args.config, parse_cfg_options(args.cfg_options))
    gpus = args.gpus if args.gpus is not None else _launch_gpus()
    plan = make_plan(cfg, args.deepspeed, gpus, args.gpu_memory)
    print(render(plan, *accumulation(plan)))
    return 0


def _launch_gpus() -> int:
    """The ranks `vlmtune train` would start: NPROC_PER_NODE x NNODES (vlmtune/launch.py), else 1."""
    try:
        return int(os.environ.get("NPROC_PER_NODE") or 1) * int(os.environ.get("NNODES") or 1)
    except ValueError:
        raise UserError("NPROC_PER_NODE and NNODES must be integers; or pass --gpus N") from None
