"""What DeepSpeed ranks really hold: the check of `vlmtune train --dry-run` (vlmtune/plan.py).

Each rank builds the config's model as training does (model/build.py, weights from the folders), wraps it in
DeepSpeed with vlmtune's DeepSpeed config (micro-batch 1, accumulation 2), takes one optimizer step on a
synthetic one-image batch (so the optimizer states exist), runs one more forward and backward (inside an
accumulation window, where gradients are held) and then sums the bytes of every tensor it can reach, each
storage once:

    parameters  the module's weights (ZeRO-3: `ds_tensor` partitions and what is still whole; bitsandbytes'
                packed weights and their quantization statistics), DeepSpeed's 16-bit flat/offload copies
    gradients   `.grad` of the weights, DeepSpeed's gradient partitions and buffers, the fp32 master's `.grad`
    optimizer   DeepSpeed's fp32 master partitions and the torch optimizer's state (Adam moments, step)
    other       anything else DeepSpeed's optimizer holds (named, so nothing is hidden)

Process RSS is not used: on small models it measures the runtime, not the model.

    torchrun --nproc_per_node 2 -m vlmtune.engine.memory_census CFG --deepspeed deepspeed_zero3 --out census.json \
        [--cfg-options torch_dtype=bfloat16 ...]
"""
from __future__ import annotations

import argparse
import dataclasses
import json

import torch

from vlmtune.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX

PARAMETER_ATTRS = ("bit16_groups_flat", "param_buffer_of_bit16_for_cpu_offload_groups", "fp16_partitioned_groups_flat")
GRADIENT_ATTRS = ("averaged_gradients", "all_grad_tensors", "grad_partitions_flat_buffer", "ipg_buffer", "temp_grad_buffer_for_cpu_offload",
                  "temp_grad_buffer_for_gpu_offload", "__param_id_to_grad_partition")
OPTIMIZER_ATTRS = ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat")


class Census:
    """Bytes per component, each storage counted once (the first component that reaches it keeps it)."""

    def __init__(self):
        self.seen: set[tuple[int, int]] = set()
        self.bytes = {"parameters": 0, "gradients": 0, "optimizer": 0, "other": 0}
        self.other: dict[str, int] = {}

    def add(self, obj, component: str, name: str, depth: int = 0) -> None:
        """Every tensor reachable from `obj` (lists, dicts, tuples, a QuantState's fields), `.grad` as gradients."""
        if depth > 8 or obj is None:
            return
        if isinstance(obj, torch.Tensor):
            self._tensor(obj, component, name)
            if obj.grad is not None:
                self._tensor(obj.grad, "gradients", name + ".grad")
            if hasattr(obj, "ds_tensor"):  # ZeRO-3's partition of this parameter
                self.add(obj.ds_tensor, component, name + ".ds_tensor", depth + 1)
            if getattr(obj, "quant_state", None) is not None:  # bitsandbytes 4-bit: absmax, code, nested state
                self.add(vars(obj.quant_state), component, name + ".quant_state", depth + 1)
            if getattr(obj, "SCB", None) is not None:  # bitsandbytes 8-bit row scales
                self.add(obj.SCB, component, name + ".SCB", depth + 1)
        elif isinstance(obj, dict):
            for key, value in obj.items():
                self.add(value, component, f"{name}[{key}]", depth + 1)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                self.add(value, component, name, depth + 1)
        elif type(obj).__name__ == "QuantState":
            self.add(vars(obj), component, name, depth + 1)

    def _tensor(self, tensor: torch.Tensor, component: str, name: str) -> None:
        if tensor.device.type == "meta" or tensor.numel() == 0:
            return
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key in self.seen:
            return
        self.seen.add(key)
        self.bytes[component] += storage.nbytes()
        if component == "other":
            self.other[name] = self.other.get(name, 0) + storage.nbytes()


def component_of(attr: str) -> str:
    """Where an attribute of DeepSpeed's ZeRO optimizer belongs."""
    for component, names in (("parameters", PARAMETER_ATTRS), ("gradients", GRADIENT_ATTRS), ("optimizer", OPTIMIZER_ATTRS)):
        if any(attr.endswith(n) for n in names):
            return component
    return "other"


def census(engine) -> Census:
    """The tensors this rank holds, by component (module docstring)."""
    found = Census()
    for name, param in engine.module.named_parameters():
        found.add(param, "parameters", name)
    zero = engine.optimizer
    found.add(zero.optimizer.state, "optimizer", "optimizer.state")
    for attr, value in vars(zero).items():
        found.add(value, component_of(attr), attr)
    return found


def _batch(model, tokens: int = 32) -> dict[str, torch.Tensor]:
    """One sample: an image and `tokens` text ids, all text trained on."""
    size = model.visual_encoder.config.image_size
    ids = torch.randint(3, 100, (1, tokens))
    ids[0, 1] = IMAGE_TOKEN_INDEX
    labels = ids.clone()
    labels[0, :2] = IGNORE_INDEX
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels,
                pixel_values=torch.zeros(1, 3, size, size), image_sizes=torch.tensor([[size, size]]))


def measure(config: str, deepspeed_name: str, options: dict) -> dict:
    """Run the protocol of the module docstring on this rank; every rank's census, gathered (rank order)."""
    import deepspeed
    import torch.distributed as dist

    from vlmtune.config import load_config
    from vlmtune.distributed import init_distributed
    from vlmtune.engine.deepspeed_config import deepspeed_config
    from vlmtune.model.build import build_model, resolve_dtype

    info = init_distributed()
    cfg = load_config(config, options)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    train = dataclasses.replace(cfg.train, batch_size=1, accumulative_counts=2)
    ds = deepspeed_config(deepspeed_name, train, resolve_dtype(cfg.model.torch_dtype), info.world_size, info.device)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    batch = _batch(model)
    for micro in range(3):  # two micro-batches and a step, then the first micro-batch of the next step
        loss, count = engine(**batch)
        engine.backward(loss / count)
        if micro < 2:
            engine.step()
    found = census(engine)
    gathered = [None] * info.world_size
    dist.all_gather_object(gathered, {"bytes": found.bytes, "other": found.other})
    return {"config": config, "deepspeed": deepspeed_name, "world_size": info.world_size, "ranks": gathered}


def main() -> None:
    """`torchrun ... -m vlmtune.engine.memory_census CFG --deepspeed NAME --out FILE [--cfg-options K=V ...]`."""
    from vlmtune.config import parse_cfg_options
    from vlmtune.distributed import destroy_distributed

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("--deepspeed", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--cfg-options", nargs="+", default=[])
    args = p.parse_args()
    try:
        result = measure(args.config, args.deepspeed, parse_cfg_options(args.cfg_options))
        if torch.distributed.get_rank() == 0:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
