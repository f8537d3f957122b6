"""Small world: procedural scenes with ground truth, and an evaluator that reads them back."""
