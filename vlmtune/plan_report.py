"""The text `vlmtune train CFG --dry-run` prints for a vlmtune.plan.Plan."""
from __future__ import annotations

GiB = 2**30


def _gib(n: int) -> str:
    return f"{n / GiB:8.2f}"


def render(plan, micro: int, acc: int) -> str:
    """Parts, per-GPU model states (and host memory with offload), activations, the largest micro-batch and the
    accumulation that keeps the global batch (`micro`, `acc`: vlmtune.plan.accumulation; `plan`: a vlmtune.plan.Plan)."""
    cfg, s, zero = plan.config, plan.states, plan.zero
    offload = ", ".join(k for k, on in (("optimizer offload", zero.offload_optimizer), ("param offload", zero.offload_param)) if on)
    lines = [f"memory plan: {cfg.name} | {zero.name} (ZeRO-{zero.stage}{', ' + offload if offload else ''}) | "
             f"{plan.gpus} GPU(s) x {plan.gpu_memory:g} GiB | {str(plan.dtype).removeprefix('torch.')} | GiB per GPU",
             "", f"{'part':<16}{'parameters':>15}{'trained':>15}  frozen storage GiB"]
    for part in plan.parts:
        lines.append(f"{part.name:<16}{part.params:>15,}{part.trained:>15,}  {_gib(part.frozen_bytes)}")
    lines += ["", f"{'model states':<40}{'GPU':>8}{'host':>9}",
              f"{'  parameters':<40}{_gib(s.parameters)} {_gib(s.host_parameters)}",
              f"{'  gradients':<40}{_gib(s.gradients)} {_gib(s.host_gradients)}",
              f"{'  optimizer (fp32 master + Adam moments)':<40}{_gib(s.optimizer)} {_gib(s.host_optimizer)}",
              f"{'  total':<40}{_gib(s.gpu)} {_gib(s.host)}",
              f"{'  DeepSpeed estimator (GPU)':<40}{_gib(s.deepspeed_estimate)}",
              f"{'transient: fp32 gradients at the step':<40}{_gib(s.step_buffer)}",
              f"{'transient: ZeRO-3 gathered layer':<40}{_gib(s.gathered)}", ""]
    b, ckpt = cfg.train.batch_size, cfg.model.use_gradient_checkpointing
    lines.append(f"activations, micro-batch {b} x max_length {cfg.data.max_length} (image: {_image_note(plan)}):")
    for on in (True, False):
        mark = "  <- config" if on == ckpt else ""
        lines.append(f"  gradient checkpointing {'on ' if on else 'off'}  {_gib(plan.activation(b, on))}"
                     f"   peak {_gib(plan.peak(b, on))}   largest micro-batch {plan.largest_micro_batch(on):>4}{mark}")
    global_batch = plan.gpus * b * cfg.train.accumulative_counts
    verdict = "fits" if plan.peak(b) <= plan.gpu_memory * GiB else "does NOT fit"
    lines += ["", f"config: batch_size={b} accumulative_counts={cfg.train.accumulative_counts} -> peak "
              f"{plan.peak(b) / GiB:.2f} GiB: {verdict} in {plan.gpu_memory:g} GiB"]
    if micro:
        lines.append(f"keeps the global batch {global_batch} ({plan.gpus} x batch x accumulation): "
                     f"batch_size={micro} accumulative_counts={acc}")
    else:
        lines.append("not even one sample fits: use a higher ZeRO stage, offload, gradient checkpointing, more GPUs "
                     "or a shorter max_length")
    lines.append("(not counted: the CUDA context, communication buffers, allocator fragmentation; docs/training.md)")
    return "\n".join(lines)


def _image_note(plan) -> str:
    return "AnyRes, its largest grid" if plan.config.model.image_grid_pinpoints else "one per sample"
