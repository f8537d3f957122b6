"""Test support: ComfyUI location, tiny models, the real-server harness."""
