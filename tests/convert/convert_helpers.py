"""Checkpoints of the tiny models, their conversions, and chat helpers shared by the convert/chat/loading tests.

Fixtures are imported by tests/convert/conftest.py and by tests/test_chat.py / tests/test_loading.py; what
they build is cached on disk under the session's base temp dir, so every importer shares one conversion.

A checkpoint here is what the trainer writes (`vlmtune-ckpt-v1`: the trainable parameters by LlavaModel name,
the resolved config text), with every trainable parameter moved well off its initial value (LoRA B starts at 0,
so an untouched adapter would hide a merge that does nothing). Variants:
    lora        Llama, LoRA on the LLM and on CLIP, pad to square (tiny_llava_finetune_lora)
    qwen2       Qwen2 LLM with LoRA, CLIP frozen: the case XTuner's huggingface export refuses
    qlora       as lora with the LLM 4-bit (nf4) while training: converted onto the full-precision LLM
    full        Llama and CLIP trained fully (no LoRA)
    projector   CLIP and LLM frozen, no LoRA: only the projector trained (nothing to merge: exact exports)
    siglip      a SigLIP encoder (no CLS token: 'full' features, 729 per image), LLM and encoder frozen, no LoRA
    siglip_lora SigLIP with LoRA on the LLM and on the encoder
    anyres      AnyRes (LLaVA-NeXT tiling, image_newline), LLM and CLIP frozen, no LoRA
    anyres_lora AnyRes with LoRA on the LLM and on CLIP
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vlmtune.cli import main as cli_main
from vlmtune.config import load_config
from vlmtune.weights import FORMAT
from vlmtune.model.anyres import DEFAULT_PINPOINTS as ANYRES_PINPOINTS
from vlmtune.model.build import build_model

IMAGE = Path(__file__).resolve().parents[2] / "vlmtune" / "assets" / "example" / "images" / "chelsea.jpg"  # 320x213
QUESTION = "What is in the image?"
MAX_NEW = 12
# Logit tolerance between two float32 computations of the same model (merged vs unmerged LoRA, our splice vs
# transformers'): image features here reach ~1e2 and the logits ~3.5 (the tiny LLM is initialised with std 0.1,
# tiny.INIT_RANGE), and float32 rounding alone moves the logits by up to 9.2e-4 (measured against a float64 run
# of the `lora` variant). A wrong key, layer or projector moves them by > 1 (a wrong CLIP layer: 5.6).
LOGIT_ATOL = 3e-3


def variant_options(name: str, tiny) -> dict:
    """--cfg-options of each checkpoint variant over tiny_llava_finetune_lora."""
    if name == "lora":
        return {}
    if name == "qwen2":
        from vlmtune.tiny import make_tiny

        make_tiny(tiny.root, arch="qwen2")  # llm_qwen2/ beside the llama; CLIP and data are reused
        return {"llm_name_or_path": str(tiny.root / "llm_qwen2"), "visual_encoder_lora": None}
    if name == "qlora":
        return {"quantization": "4bit"}
    if name == "full":
        return {"llm_lora": None, "visual_encoder_lora": None, "freeze_llm": False, "freeze_visual_encoder": False}
    if name == "projector":
        return {"llm_lora": None, "visual_encoder_lora": None}
    if name == "siglip":
        return {"visual_encoder_name_or_path": str(tiny.siglip), "llm_lora": None, "visual_encoder_lora": None}
    if name == "siglip_lora":
        return {"visual_encoder_name_or_path": str(tiny.siglip)}
    if name in ("anyres", "anyres_lora"):
        lora = {} if name == "anyres_lora" else {"llm_lora": None, "visual_encoder_lora": None}
        return {"image_grid_pinpoints": [list(p) for p in ANYRES_PINPOINTS], "pad_image_to_square": False, **lora}
    raise KeyError(name)


def write_checkpoint(path: Path, options: dict, seed: int = 0) -> Path:
    """A trainer-format checkpoint of tiny_llava_finetune_lora + `options`, trainable weights perturbed."""
    cfg = load_config("tiny_llava_finetune_lora", options)
    torch.manual_seed(seed)
    model = build_model(cfg.model, for_training=False)
    state = {n: (p.detach() + 0.3 * torch.randn_like(p)).clone() for n, p in model.named_parameters() if p.requires_grad}
    torch.save({"format": FORMAT, "state_dict": state, "config_text": cfg.text, "config_name": cfg.name, "step": 1}, path)
    return path


@pytest.fixture(scope="session")
def checkpoint(tiny, tmp_path_factory):
    """checkpoint(variant) -> path of its iter_1.pth (built on first use)."""
    root = tmp_path_factory.getbasetemp() / "vlmtune_ckpt"
    root.mkdir(exist_ok=True)

    def get(variant: str) -> Path:
        path = root / f"{variant}_iter_1.pth"
        if not path.is_file():
            write_checkpoint(path, variant_options(variant, tiny))
        return path

    return get


@pytest.fixture(scope="session")
def converted(checkpoint, tmp_path_factory):
    """converted(variant, save_format) -> folder written by `vlmtune convert pth_to_hf` (once per pair)."""
    root = tmp_path_factory.getbasetemp() / "vlmtune_converted"
    root.mkdir(exist_ok=True)

    def get(variant: str, save_format: str) -> Path:
        out = root / f"{variant}_{save_format}"
        if not (out / "vlmtune_config.py").is_file():  # written last: a folder with it is complete
            assert cli_main(["convert", "pth_to_hf", str(checkpoint(variant)), str(out), "--save-format", save_format]) == 0
        return out

    return get


@pytest.fixture(scope="session")
def truth(checkpoint):
    """truth(variant) -> the checkpoint's LlavaModel, loaded the way convert loads it (the reference)."""
    from vlmtune.convert.pth_to_hf import load_trained_model
    from vlmtune.weights import load_trained_weights

    made = {}

    def get(variant: str):
        if variant not in made:
            state, cfg = load_trained_weights(checkpoint(variant))
            made[variant] = (load_trained_model(cfg, state, "test", torch.float32), cfg)
        return made[variant]

    return get


# ---- chat helpers ------------------------------------------------------------------------------------------


def chat_generator(*argv: str):
    """The Generator `vlmtune chat ARGV` would use (float32 on the CPU)."""
    from vlmtune.cli import build_parser
    from vlmtune.loading import load_generator

    return load_generator(build_parser().parse_args(["chat", *argv, "--torch-dtype", "float32", "--device", "cpu"]))


def one_turn_ids(generator, question: str = QUESTION) -> list[int]:
    """Prompt ids of one turn about an image, as chat builds them."""
    from vlmtune.constants import DEFAULT_IMAGE_TOKEN

    return generator.prompt_ids([(f"{DEFAULT_IMAGE_TOKEN}\n{question}", None)])


def chat_tokens(generator, question: str = QUESTION, max_new: int = MAX_NEW) -> list[int]:
    """Greedy new ids (unstripped) of one turn about IMAGE, through chat's generation path."""
    from vlmtune.data.image import load_image

    inputs = generator.embed([one_turn_ids(generator, question)], generator.encode_images([load_image(IMAGE)]))
    return generator.generate_embeds(inputs, max_new_tokens=max_new, do_sample=False)[0].tolist()


def prompt_logits(generator, question: str = QUESTION) -> torch.Tensor:
    """Logits [L, V] of the one-turn prompt about IMAGE."""
    from vlmtune.data.image import load_image

    inputs = generator.embed([one_turn_ids(generator, question)], generator.encode_images([load_image(IMAGE)]))
    with torch.no_grad():
        return generator.model.llm(**inputs).logits[0]


def hf_greedy(folder, max_new: int = MAX_NEW, pixel_values: torch.Tensor | None = None):
    """(new ids, first-step logits) from plain transformers on IMAGE + QUESTION through the saved processor
    and chat template; `pixel_values` [1, 3, H, W] replaces the processor's pixels when given."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from vlmtune.data.image import load_image

    model, info = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    processor = AutoProcessor.from_pretrained(folder)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=load_image(IMAGE), text=text, return_tensors="pt", add_special_tokens=False)
    if pixel_values is not None:
        assert pixel_values.shape == inputs["pixel_values"].shape
        inputs["pixel_values"] = pixel_values
    out = model.eval().generate(**inputs, max_new_tokens=max_new, do_sample=False, output_logits=True,
                                return_dict_in_generate=True)
    return out.sequences[0, inputs["input_ids"].shape[1]:].tolist(), out.logits[0][0]


def error_line(capsys) -> str:
    """The CLI's one-line error (library warnings on stderr aside)."""
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("vlmtune: error:")]
    assert len(lines) == 1, lines
    return lines[0]
