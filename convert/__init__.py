"""Checkpoint conversion: PyTorch/HF safetensors (official and -hf layouts) <-> Flax params, and Orbax."""
