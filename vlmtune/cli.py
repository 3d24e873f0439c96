"""The `vlmtune` command: each subcommand parses its flags here and calls one function elsewhere.

No logic lives here beyond argument parsing, turning errors into exit codes and deciding, once for every
command, whether it runs as several processes (`_launch`): a UserError prints one line and exits 2, a crash
prints its traceback and exits 1, and torchrun's exit code (that of its ranks) is passed through.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from vlmtune import quiet
from vlmtune.errors import UserError


def _add_model_args(p: argparse.ArgumentParser, model_optional: bool = False) -> None:
    """Flags shared by chat and mmbench: how to assemble a trained model for inference (as XTuner's)."""
    p.add_argument("model_name_or_path", nargs="?" if model_optional else None, help="LLM folder or hub id (the base LLM for LoRA, or a merged/full LLM), "
                   "or a `convert --save-format huggingface` folder")
    p.add_argument("--adapter", help="LLM LoRA adapter folder (llm_adapter/ of a converted model)")
    p.add_argument("--llava", help="folder written by `vlmtune convert pth_to_hf` (projector/, llm_adapter/, ...)")
    p.add_argument("--visual-encoder", help="CLIP vision encoder folder or hub id")
    p.add_argument("--visual-select-layer", type=int, help="CLIP layer to take features from; default: the training config's, else -2")
    p.add_argument("--prompt-template", help="template name (see docs/templates.md); default: the one the model was trained with")
    p.add_argument("--system", default="", help="system text")
    p.add_argument("--bits", type=int, choices=[4, 8], help="load the LLM quantized")
    p.add_argument("--torch-dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the model folder (InternLM2)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")


def build_parser() -> argparse.ArgumentParser:
    """The whole command tree."""
    parser = argparse.ArgumentParser(prog="vlmtune", description="Train, convert, chat with and evaluate LLaVA-style models.")
    parser.add_argument("--version", action="version", version=f"vlmtune {importlib.import_module('vlmtune').__version__}")
    parser.add_argument("--verbose", action="store_true",
                        help="show the libraries' known start-up notices too (also VLMTUNE_VERBOSE=1; see vlmtune/quiet.py)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("train", help="pretrain or finetune from a config (DeepSpeed)")
    p.add_argument("config", help="config file or shipped config name (`vlmtune list-cfg`)")
    p.add_argument("--deepspeed", default="deepspeed_zero2", help="DeepSpeed config name (deepspeed_zero1/2/2_offload/3/3_offload) or JSON path")
    p.add_argument("--work-dir", help="default ./work_dirs/<config name>")
    p.add_argument("--resume", help="checkpoint to resume from, or 'auto' for the latest in the work dir")
    p.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE", help="override config values")
    p.add_argument("--launcher", choices=["none", "slurm"], default="none",
                   help="slurm reads SLURM_* variables; NPROC_PER_NODE/NNODES/NODE_RANK/ADDR/PORT re-launch through torchrun")
    p.add_argument("--seed", type=int, help="override the config's seed")
    p.add_argument("--dry-run", action="store_true", help="print the per-GPU memory plan (model built on the meta "
                   "device from config.json files) and exit; nothing is launched (vlmtune/plan.py)")
    p.add_argument("--gpus", type=int, help="--dry-run: GPUs of the run (default NPROC_PER_NODE x NNODES, else 1)")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="--dry-run: GiB per GPU (default 80)")
    p.set_defaults(target="vlmtune.train:main")

    conv = sub.add_parser("convert", help="pth_to_hf or merge").add_subparsers(dest="convert", metavar="ACTION", required=True)
    p = conv.add_parser("pth_to_hf", help="a training checkpoint -> HF folders (xtuner / huggingface / official layout)")
    p.add_argument("config", nargs="?", help="config (path or name); default: the one saved in the checkpoint")
    p.add_argument("pth", help="iter_N.pth file or ZeRO checkpoint directory")
    p.add_argument("save_dir")
    p.add_argument("--save-format", choices=["xtuner", "huggingface", "official"], default="xtuner")
    p.add_argument("--fp32", action="store_true", help="save in float32 instead of the training dtype")
    p.add_argument("--max-shard-size", default="2GB", help="weights are written as safetensors shards of this size")
    p.add_argument("--trust-remote-code", action="store_true")
    p.set_defaults(target="vlmtune.convert.pth_to_hf:main")
    p = conv.add_parser("merge", help="merge a LoRA adapter into its base LLM (or CLIP with --is-clip)")
    p.add_argument("model_name_or_path", help="base model folder or hub id")
    p.add_argument("adapter_name_or_path")
    p.add_argument("save_dir")
    p.add_argument("--is-clip", "--vision", dest="is_clip", action="store_true",
                   help="the base is a vision encoder (CLIP, SigLIP: model/vision.py); --is-clip is XTuner's name")
    p.add_argument("--max-shard-size", default="2GB")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--trust-remote-code", action="store_true")
    p.set_defaults(target="vlmtune.convert.merge:main")

    p = sub.add_parser("chat", help="chat with a trained model about images")
    _add_model_args(p)
    p.add_argument("--image", action="append", help="image file to talk about; repeat for several images (their "
                   "<image> tags go in front, or where the first prompt writes them, one per image)")
    p.add_argument("--prompt", action="append", help="answer this prompt and exit (repeatable: one conversation)")
    p.add_argument("--batch", help="JSONL of {image, prompt} lines; answers are written as JSONL to --output")
    p.add_argument("--output", help="output JSONL for --batch (default stdout)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=float, default=0.75)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--stop-words", nargs="*", default=[])
    p.add_argument("--no-streamer", action="store_true")
    p.set_defaults(target="vlmtune.chat:main")

    p = sub.add_parser("serve", help="an OpenAI-compatible chat-completions endpoint and a web chat page")
    _add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument("--max-batch-size", type=int, default=8, help="concurrent requests generated together")
    p.add_argument("--max-image-pixels", type=int, default=4096 * 4096)
    p.add_argument("--max-images", type=int, default=8, help="images per request")
    p.add_argument("--allow-local-images", help="accept file:// image URLs inside this folder")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a generation may take")
    p.add_argument("--model-name", help="the model id in /v1/models (default: the model folder's name)")
    p.set_defaults(target="vlmtune.serve.app:main")

    p = sub.add_parser("mmbench", help="MMBench / CCBench evaluation (VLMEvalKit-compatible)")
    _add_model_args(p, model_optional=True)  # not needed with --predictions
    p.add_argument("--data-path", required=True, help="MMBench/CCBench TSV")
    p.add_argument("--work-dir", default="./work_dirs/mmbench")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--matcher", choices=["vlmevalkit", "xtuner"], default="vlmevalkit")
    p.add_argument("--predictions", help="re-score this predictions .xlsx without loading a model")
    p.add_argument("--pad-image-to-square", action=argparse.BooleanOptionalAction,
                   help="default: as the model was trained (its saved config; LLaVA-1.5 finetunes pad)")
    p.set_defaults(target="vlmtune.eval.mmbench:main")

    p = sub.add_parser("eval", help="VLMEvalKit benchmarks (multiple choice, yes/no, VQA), scored as VLMEvalKit scores them")
    _add_model_args(p, model_optional=True)  # not needed with --predictions; --max-new-tokens: default per benchmark
    p.add_argument("--data-path", nargs="+", required=True, help="benchmark TSVs named as VLMEvalKit names them "
                   "(MME.tsv, POPE.tsv, TextVQA_VAL.tsv...; docs/eval.md); the model is loaded once for all")
    p.add_argument("--dataset", nargs="+", help="the benchmark of each --data-path, for files named otherwise")
    p.add_argument("--work-dir", default="./work_dirs/eval")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--predictions", nargs="+", help="re-score these predictions files (one per --data-path, same "
                   "order) without loading a model")
    p.add_argument("--pad-image-to-square", action=argparse.BooleanOptionalAction,
                   help="default: as the model was trained (its saved config; LLaVA-1.5 finetunes pad)")
    p.set_defaults(target="vlmtune.eval.evaluate:main")

    data = sub.add_parser("data", help="check or prepare LLaVA data").add_subparsers(dest="data", metavar="ACTION", required=True)
    p = data.add_parser("check", help="find every problem in a LLaVA JSON dataset before training")
    p.add_argument("data_path")
    p.add_argument("--image-folder", required=True)
    p.add_argument("--config", help="take tokenizer, template, max_length from this config")
    p.add_argument("--tokenizer", help="tokenizer folder for token-length statistics")
    p.add_argument("--prompt-template")
    p.add_argument("--max-length", type=int, help="default: the config's max_length, else 2048")
    p.add_argument("--visual-encoder", help="the vision encoder whose tokens per image count in the lengths (default: --config's)")
    p.add_argument("--image-length", type=int, help="tokens per image, instead of reading them from the encoder's config")
    p.add_argument("--report", help="JSON report path (default <data>.check.json)")
    p.add_argument("--write-clean", help="write the good records to this JSON file")
    p.add_argument("--workers", type=int, help="processes (default all cores)")
    p.set_defaults(target="vlmtune.data.check:main")
    p = data.add_parser("show", help="samples exactly as training tokenizes them, trained spans marked (xtuner log-dataset)")
    p.add_argument("config", help="config file or shipped config name")
    p.add_argument("--index", type=int, nargs="+", help="dataset indices to show (default 0)")
    p.add_argument("--work-dir", help="the run's work dir, for the shared tokenization cache (default ./work_dirs/<config name>)")
    p.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE", help="override config values")
    p.add_argument("--color", choices=["auto", "always", "never"], default="auto", help="colour the trained spans")
    p.set_defaults(target="vlmtune.data.show:main")
    p = data.add_parser("prepare", help="verify the LLaVA download layout and fix OCR-VQA image formats")
    p.add_argument("root", help="the LLaVA data folder")
    p.add_argument("--dry-run", action="store_true")
    p.set_defaults(target="vlmtune.data.prepare:main")

    p = sub.add_parser("list-cfg", help="list shipped configs")
    p.add_argument("-p", "--pattern", help="only names containing this")
    p.set_defaults(target="vlmtune.configs_cli:list_cfg")
    p = sub.add_parser("copy-cfg", help="copy a shipped config to edit it")
    p.add_argument("config_name")
    p.add_argument("save_dir")
    p.set_defaults(target="vlmtune.configs_cli:copy_cfg")
    p = sub.add_parser("make-tiny", help="build tiny offline models + example data (for the quickstart and tests)")
    p.add_argument("root", nargs="?", default="./work_dirs/tiny")
    p.add_argument("--arch", choices=["llama", "qwen2"], default="llama")
    p.set_defaults(target="vlmtune.configs_cli:make_tiny")
    return parser


def _resolve(target: str):
    """The function behind a subcommand; a clear error for one that is not built yet."""
    module_name, func = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            raise UserError(f"this subcommand is not built yet ({module_name}); see the open issues") from None
        raise
    return getattr(module, func)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    quiet.install(args.verbose)  # before transformers, bitsandbytes or DeepSpeed are imported
    args.argv = argv  # the command as typed (mmbench records it in args.json)
    if args.command == "train" and args.dry_run:  # the memory plan: config files only, no torchrun, DeepSpeed or data
        args.target = "vlmtune.plan:main"
    try:
        code = _launch(args, argv)
        if code is None:
            code = _resolve(args.target)(args)
    except UserError as e:
        _say(f"vlmtune: error: {e}")
        return 2
    except KeyboardInterrupt:
        _say("vlmtune: interrupted")
        return 130
    return int(code or 0)


def _launch(args, argv: list[str]) -> int | None:
    """The one place that starts a command's other processes (train, and mmbench and eval when they generate): torchrun's
    exit code when NPROC_PER_NODE/NNODES ask for several (vlmtune/launch.py), else None: run in this process.

    The command's cheap checks come first, here and before the heavy stack is imported: a bad config, path or
    flag is one line before torchrun and DeepSpeed start, not one per rank."""
    if args.command == "train" and args.dry_run:
        return None
    if args.command == "train":
        from vlmtune.config import load_config, parse_cfg_options
        from vlmtune.engine.deepspeed_config import check_stage
        from vlmtune.paths import check_config_paths

        cfg = load_config(args.config, parse_cfg_options(args.cfg_options))
        check_config_paths(cfg)
        check_stage(cfg.model, args.deepspeed)
        if args.resume:  # a global batch the new number of ranks cannot keep, or another model: one line, before torchrun
            _check_resume(cfg, args)
    elif args.command == "mmbench" and not args.predictions:  # re-scoring --predictions is one process
        from vlmtune.eval.mmbench import check_args

        check_args(args)
    elif args.command == "eval" and not args.predictions:
        from vlmtune.eval.evaluate import check_args, load_all
        from vlmtune.launch import torchrun_command

        check_args(args)
        if torchrun_command(argv) is not None:  # a bad data file: one line before torchrun, not one per rank
            load_all(args.data_path, args.dataset)
    else:
        return None
    from vlmtune.launch import relaunch, setup_slurm

    code = relaunch(argv)
    if code is None and args.command == "train" and args.launcher == "slurm":
        setup_slurm()  # srun started this process as one rank: tell torch which
    return code


def _check_resume(cfg, args) -> None:
    """What `train` checks of its checkpoint on every rank, checked once before torchrun: the global batch on the
    launch's number of ranks, and (on the model built on the meta device, in seconds; not for remote-code LLMs,
    which only the ranks build) the trained parameters."""
    from vlmtune.engine.checkpoint import check_trained_parameters, find_resume, resume_accumulation
    from vlmtune.launch import launch_world_size

    resume_from = find_resume(cfg.work_dir(args.work_dir), args.resume)
    if resume_from is None:
        return
    resume_accumulation(resume_from, cfg, launch_world_size())
    if not cfg.model.trust_remote_code:
        from vlmtune.model.build import build_meta_model, resolve_dtype

        model = build_meta_model(cfg.model, cfg.model.llm_name_or_path, cfg.model.visual_encoder_name_or_path,
                                 resolve_dtype(cfg.model.torch_dtype))
        check_trained_parameters(resume_from, model)


def _say(line: str) -> None:
    """One line on stderr in one write: ranks sharing the pipe (torchrun) then never splice their lines."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
