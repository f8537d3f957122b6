"""Development support for the tests, scripts and benchmarks (never imported by the pack).

- ``pack``: imports this repository as the package ``concept_attention``;
- ``comfy_env``: ComfyUI as a library (``start``: the one start-up every entry point calls);
- ``tiny_models``: tiny seeded random SD1.5/SDXL-architecture models and the one seeded init;
- ``server`` / ``workflows``: a real ComfyUI server on 127.0.0.1 and API graphs to send it;
- ``bench``: the benchmarks' models, timing and tables;
- ``custom_nodes/concept_test_nodes``: a test-only node pack that loads the tiny models.

Entry points put this folder's parent (``dev/``) on ``sys.path`` (pytest through ``pythonpath``).
"""
