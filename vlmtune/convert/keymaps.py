"""Key maps between our LlavaModel's parameter names and the layouts other tools read. Pure data.

Our names are `LlavaModel.state_dict()` names after LoRA is merged (no peft wrappers):
    llm.model.layers.0.self_attn.q_proj.weight, llm.lm_head.weight,
    visual_encoder.embeddings.patch_embedding.weight (transformers >= 5: no `vision_model.` level),
    projector.model.0.weight, projector.model.2.weight (XTuner's ProjectorModel layout).

Each map is a tuple of (our prefix, their prefix) rules: a key takes the rule with the longest prefix it
starts with, and a key no rule matches is an error (never silently dropped). `weights.rename` applies
them; reading a layout back applies the same rules with each pair swapped (`weights.rename_either` takes
either naming). Causal LMs whose decoder is `model` and head `lm_head`
(Llama, Mistral, Qwen2/3, Gemma, Phi-3, ...) are covered; others fail with the unmatched keys named.
"""

# transformers 4.x (XTuner 0.2, haotian-liu/LLaVA, LLaVA-NeXT) builds CLIPVisionModel with a `vision_model.`
# level that transformers 5 dropped (5.x still reads it). Folders and checkpoints vlmtune writes carry the
# level, so XTuner and transformers 4.x read them; vlmtune reads either naming.
CLIP_VISION_MODEL: tuple[tuple[str, str], ...] = (("", "vision_model."),)  # visual_encoder/, merge --is-clip
CLIP_VISION_ADAPTER: tuple[tuple[str, str], ...] = (("base_model.model.", "base_model.model.vision_model."),)  # peft files

# XTuner's LLaVAModel.state_dict() (the `state_dict` of its iter_N.pth, the `module` of its DeepSpeed folder):
# LlavaModel names, LoRA keys with the adapter name (`lora_A.default.weight`), CLIP as transformers 4.x has it.
XTUNER_STATE_DICT: tuple[tuple[str, str], ...] = (
    ("visual_encoder.base_model.model.", "visual_encoder.base_model.model.vision_model."),
    ("visual_encoder.", "visual_encoder.vision_model."),
    ("llm.", "llm."),
    ("projector.", "projector."),
    ("image_newline", "image_newline"),  # AnyRes (XTuner's AnyResLLaVAModel keeps it at the top level too)
)

# transformers' LlavaForConditionalGeneration as stored on disk by llava-hf's checkpoints and transformers 4:
# transformers 5 reads these names through its own conversion mapping, so one folder serves both.
# Projector depth must be 2: Llava has exactly linear_1 -> act -> linear_2.
HUGGINGFACE_LLAVA: tuple[tuple[str, str], ...] = (
    ("llm.model.", "language_model.model."),
    ("llm.lm_head.", "language_model.lm_head."),
    ("visual_encoder.", "vision_tower.vision_model."),
    ("projector.model.0.", "multi_modal_projector.linear_1."),
    ("projector.model.2.", "multi_modal_projector.linear_2."),
)

# The same model's module names as transformers 5 builds it in memory (`state_dict()` of a loaded
# LlavaForConditionalGeneration): used to check every weight fits before saving and to read a folder back.
HUGGINGFACE_LLAVA_MODULES: tuple[tuple[str, str], ...] = (
    ("llm.model.", "model.language_model."),
    ("llm.lm_head.", "lm_head."),
    ("visual_encoder.", "model.vision_tower."),
    ("projector.model.0.", "model.multi_modal_projector.linear_1."),
    ("projector.model.2.", "model.multi_modal_projector.linear_2."),
)

# transformers' LlavaNextForConditionalGeneration (AnyRes): Llava's names and the row separator, on disk as
# llava-hf's llava-v1.6 checkpoints store it and in memory as transformers 5 builds it.
HUGGINGFACE_LLAVA_NEXT: tuple[tuple[str, str], ...] = (*HUGGINGFACE_LLAVA, ("image_newline", "image_newline"))
HUGGINGFACE_LLAVA_NEXT_MODULES: tuple[tuple[str, str], ...] = (
    *HUGGINGFACE_LLAVA_MODULES, ("image_newline", "model.image_newline"))

# haotian-liu/LLaVA's LlavaLlamaForCausalLM (one checkpoint: the LLM with the projector inside; the vision
# tower is stored only when it was trained, with `unfreeze_mm_vision_tower=True` so LLaVA keeps these
# weights instead of reloading `mm_vision_tower`). LLaVA runs on transformers 4, whose CLIPVisionModel has a
# `vision_model.` level. This is XTuner's `to_official_llava` map.
OFFICIAL_LLAVA: tuple[tuple[str, str], ...] = (
    ("llm.model.", "model."),
    ("llm.lm_head.", "lm_head."),
    ("visual_encoder.", "model.vision_tower.vision_tower.vision_model."),
    ("projector.model.", "model.mm_projector."),
)

# The `projector/` folder of XTuner's layout: a ProjectorModel whose keys are `model.0.weight`, ...
XTUNER_PROJECTOR: tuple[tuple[str, str], ...] = (("projector.", ""),)

# haotian-liu/LLaVA class and model_type per LLM model_type (LLaVA-1.5 has Llama and, later, Mistral;
# model_type "llava" is what the released llava-v1.5 checkpoints and XTuner's converter write).
OFFICIAL_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "llama": ("LlavaLlamaForCausalLM", "llava"),
    "mistral": ("LlavaMistralForCausalLM", "llava_mistral"),
}

# Folder names inside an xtuner-layout save dir (XTuner's names, read by its chat and by ours).
LLM_ADAPTER_DIR = "llm_adapter"
VISUAL_ENCODER_ADAPTER_DIR = "visual_encoder_adapter"
VISUAL_ENCODER_DIR = "visual_encoder"
PROJECTOR_DIR = "projector"
