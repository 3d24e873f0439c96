"""`vlmtune train`: the whole run, top to bottom.

    config -> process group -> tokenizer, image processor, model (+ pretrained_pth) -> dataset, sampler,
    loader -> DeepSpeed engine (AdamW, warmup + cosine) -> resume? -> engine/trainer.fit -> teardown
"""
from __future__ import annotations

import functools
import random
from pathlib import Path

import numpy as np
import torch

from vlmtune.config import Config, load_config, parse_cfg_options
from vlmtune.data.collate import collate, collate_packed
from vlmtune.data.dataset import build_dataset, cache_dir
from vlmtune.data.image import ImagePreprocessor, load_image
from vlmtune.data.llava_json import RecordError
from vlmtune.data.sampler import BatchSampler, PackedBatchSampler
from vlmtune.data.templates import get_template
from vlmtune.distributed import DistInfo, destroy_distributed, init_distributed
from vlmtune.engine import checkpoint
from vlmtune.engine.deepspeed_config import deepspeed_config, zero_stage
from vlmtune.engine.metrics import get_logger
from vlmtune.engine.trainer import TrainState, fit, lr_lambda
from vlmtune.errors import UserError
from vlmtune.eval.benchmarks import load_benchmarks
from vlmtune.eval.in_training import BenchmarkEval
from vlmtune.inference import Generator
from vlmtune.model.build import build_model, load_tokenizer, resolve_dtype
from vlmtune.model.vision import load_image_processor
from vlmtune.weights import load_into_model, load_trained_weights


def main(args) -> int:
    """CLI entry: train in this process (vlmtune.cli has re-launched it under torchrun, or mapped srun's variables)."""
    options = parse_cfg_options(args.cfg_options)
    if args.seed is not None:
        options["seed"] = args.seed
    cfg = load_config(args.config, options)
    work_dir = cfg.work_dir(args.work_dir)
    train(cfg, work_dir, args.deepspeed, args.resume)
    return 0


def train(cfg: Config, work_dir: Path, deepspeed_name: str, resume: str | None) -> TrainState:
    """Run the config to its end (or from a checkpoint); the process group is always torn down."""
    info = init_distributed()
    try:
        return _train(cfg, work_dir, deepspeed_name, resume, info)
    finally:
        destroy_distributed()


def _train(cfg: Config, work_dir: Path, deepspeed_name: str, resume: str | None, info: DistInfo) -> TrainState:
    import deepspeed

    work_dir.mkdir(parents=True, exist_ok=True)
    logger = get_logger(work_dir, info.is_main)
    if info.is_main:
        (work_dir / f"{cfg.name}.py").write_text(cfg.text)  # the resolved config, next to the checkpoints
    _seed(cfg.train.seed + info.rank)
    logger.info(f"config {cfg.path} -> work dir {work_dir}, {info.world_size} process(es) on {info.device}")

    # read a previous stage's weights first: a bad or hostile file stops the run before anything is built
    pretrained = load_trained_weights(cfg.train.pretrained_pth)[0] if cfg.train.pretrained_pth else None
    benchmarks = load_benchmarks(cfg)  # evaluation_benchmarks, checked before the model (as before torchrun)
    tokenizer = load_tokenizer(cfg.model.llm_name_or_path, cfg.model.trust_remote_code)
    preprocess = ImagePreprocessor(load_image_processor(cfg.model.visual_encoder_name_or_path), cfg.data.pad_image_to_square,
                                   cfg.data.image_preprocess, cfg.model.image_grid_pinpoints)
    model = build_model(cfg.model)
    image_length = model.image_length
    if pretrained is not None:
        _load_pretrained(model, pretrained, cfg.train.pretrained_pth, logger)
    trainable = [p for p in model.parameters() if p.requires_grad]
    logger.info(f"trainable parameters: {sum(p.numel() for p in trainable):,} of {sum(p.numel() for p in model.parameters()):,}")

    dataset, report = build_dataset(cfg.data, tokenizer, preprocess, image_length, cache_dir(cfg.data, work_dir),
                                    model.anyres)
    logger.info(f"data {cfg.data.data_path}: {report.summary()}")
    _preflight(cfg, report)
    resume_from = checkpoint.find_resume(work_dir, resume) if resume else None
    universal = None
    if resume_from is not None:  # the checkpoint's global batch is kept, whatever the number of ranks now
        checkpoint.check_trained_parameters(resume_from, model)
        cfg, saved_world = checkpoint.keep_global_batch(cfg, resume_from, info.world_size, logger)
        if saved_world is not None and saved_world != info.world_size:  # ZeRO shards made for other ranks
            universal = checkpoint.universal_folder(resume_from, info, {n for n, _ in model.named_parameters()})
    sampler, collate_fn = _batching(cfg, dataset, info)
    # The loader's own generator: starting an epoch then draws nothing from the global RNG (dropout), so a run
    # resumed mid-epoch sees the same dropout masks as an uninterrupted one.
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=cfg.train.dataloader_num_workers,
        collate_fn=functools.partial(collate_fn, pad_token_id=tokenizer.pad_token_id),
        persistent_workers=False, pin_memory=info.device.type == "cuda", generator=torch.Generator(),
    )

    total_steps = cfg.train.max_steps or cfg.train.max_epochs * sampler.steps_per_epoch()
    optimizer = torch.optim.AdamW(trainable, lr=cfg.train.lr, betas=cfg.train.betas, weight_decay=cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, cfg.train.warmup_ratio))
    ds_config = deepspeed_config(deepspeed_name, cfg.train, resolve_dtype(cfg.model.torch_dtype), info.world_size, info.device,
                                 load_universal=universal is not None)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)

    state = TrainState()
    if resume_from is not None:
        state = TrainState(**checkpoint.load_resume_state(engine, resume_from, info, universal))
        logger.info(f"resumed from {resume_from} at step {state.step}" + (f" ({universal.name})" if universal else ""))
    elif resume == "auto":
        logger.info(f"--resume auto: no checkpoint in {work_dir}, starting fresh")

    lockstep = zero_stage(deepspeed_name) == 3 and info.world_size > 1  # weights partitioned: ranks generate together
    scorer = BenchmarkEval(benchmarks, work_dir, lockstep) if benchmarks else None
    evaluate = _evaluator(cfg, engine.module, tokenizer, preprocess, image_length, scorer, lockstep, logger)
    state = fit(engine, loader, sampler, cfg, info, work_dir, state, total_steps, model.image_lengths, evaluate, logger)
    logger.info(f"done: {state.step} steps, {state.samples_seen} samples, {state.skipped} skipped; checkpoints in {work_dir}")
    return state


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _batching(cfg: Config, dataset, info: DistInfo):
    """(batch sampler, collate function): padded batches of `batch_size` samples, or with
    `pack_to_max_length` one packed sequence of at most `max_packed_length` tokens per micro-batch; both order
    the epoch by optimizer-step batches (data/sampler.py)."""
    if not cfg.data.pack_to_max_length:
        sampler = BatchSampler(dataset.modality_lengths, cfg.train.batch_size, info.world_size, info.rank,
                               cfg.train.seed, cfg.data.group_by_length, cfg.train.accumulative_counts)
        return sampler, collate
    budget = cfg.data.max_packed_length or cfg.train.batch_size * cfg.data.max_length
    if budget < cfg.data.max_length:
        raise UserError(f"{cfg.path}: max_packed_length={budget} is below max_length={cfg.data.max_length}; "
                        f"a sample of max_length tokens must fit in a pack")
    if cfg.model.trust_remote_code:  # packing relies on transformers' own masking (model/llava.py)
        raise UserError(f"{cfg.path}: pack_to_max_length needs an LLM implemented in transformers, "
                        f"not remote code (trust_remote_code=True); set pack_to_max_length=False")
    return PackedBatchSampler(dataset.modality_lengths, budget, info.world_size, info.rank, cfg.train.seed,
                              accumulative_counts=cfg.train.accumulative_counts), collate_packed


def _preflight(cfg: Config, report) -> None:
    """Refuse to start when too much of the data was dropped, pointing at `data check`."""
    if report.kept == 0:
        raise UserError(f"{cfg.data.data_path}: no trainable record ({report.summary()}); run `vlmtune data check` for details")
    dropped = report.total - report.kept
    if dropped > cfg.data.max_bad_sample_fraction * report.total:
        raise UserError(
            f"{cfg.data.data_path}: {dropped} of {report.total} records cannot be trained on "
            f"(over max_bad_sample_fraction={cfg.data.max_bad_sample_fraction}): {report.summary()}; "
            f"run `vlmtune data check {cfg.data.data_path} --image-folder {cfg.data.image_folder}` for details"
        )


def _load_pretrained(model, state_dict: dict, path: str, logger) -> None:
    """Load a previous stage's trained weights (pretrain projector, ...) and say what it covered."""
    uncovered = load_into_model(model, state_dict, path)
    logger.info(f"pretrained_pth {path}: loaded {len(state_dict)} tensors; "
                f"{len(uncovered)} trainable tensors start fresh (e.g. LoRA)" if uncovered else f"pretrained_pth {path}: loaded {len(state_dict)} tensors")


def _evaluator(cfg: Config, model, tokenizer, preprocess, image_length: int, scorer: BenchmarkEval | None,
               lockstep: bool, logger):
    """XTuner's EvaluateChatHook (answers for evaluation_images x evaluation_inputs, logged) and the
    evaluation_benchmarks subsets (`scorer`, eval/in_training.py), both through one Generator on every rank
    (ZeRO-3 needs all ranks in each forward: `lockstep` makes a rank that finished its answer keep stepping with
    the others, transformers' synced_gpus); rank 0 logs. The function returns the benchmarks' headline numbers
    (eval/summary.py rows; on rank 0) for the trainer to record; None without anything to evaluate."""
    if not cfg.train.evaluation_inputs and scorer is None:
        return None
    try:
        images = [load_image(p) for p in cfg.train.evaluation_images if cfg.train.evaluation_inputs] or [None]
    except RecordError as e:
        raise UserError(f"{cfg.path}: evaluation_images: {e.detail}; fix the path or set evaluation_images = []") from None
    generator = Generator(model, tokenizer, get_template(cfg.data.prompt_template), preprocess, image_length, cfg.data.system)

    def evaluate(step: int) -> list[dict]:
        model.eval()
        for image_path, image in zip(cfg.train.evaluation_images or ["(no image)"], images):
            for question in cfg.train.evaluation_inputs:
                answer = generator.answer(question, image, max_new_tokens=cfg.train.evaluation_max_new_tokens,
                                          **({"synced_gpus": True} if lockstep else {}))
                logger.info(f"eval step {step} | {Path(image_path).name} | {question!r} -> {answer!r}")
        scores = scorer(generator, step) if scorer is not None else []
        for row in scores:
            logger.info(f"eval step {step} | {row['benchmark']} {row['metric']} = {row['value']:.4f} (of {row['full']:g})")
        model.train()
        return scores

    return evaluate
