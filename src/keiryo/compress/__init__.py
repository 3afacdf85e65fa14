"""Lightweighting: quantization, pruning, distillation. Each function takes a model and returns a model."""
