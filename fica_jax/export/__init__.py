"""Export: `model_export` (a run's checkpoint -> safetensors), `torch_runtime` (avatars in PyTorch)."""
