"""Model code written into a saved `projector/` folder so `AutoModel.from_pretrained(dir, trust_remote_code=True)`
loads it as XTuner's released projectors load (same config keys, same `model.N.weight` names)."""
