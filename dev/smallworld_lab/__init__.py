"""The toy world's measuring harness: read-out, metrics, experiments, pretraining and reports.

Imports the pack (as ``concept_attention``, see ``devkit.pack``) and is never imported by it; the
demo world the nodes ship (scenes, the base model and its weights) stays in the pack's
``smallworld/``. Entry points: ``benchmarks/smallworld_disendiff.py``, ``pretrain_smallworld.py``,
``localisation_smallworld.py``; described in ``docs/toy_world.md``.
"""
