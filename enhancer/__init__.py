"""Torch side: side info -> tensors, the early-exit model, training, inference engine."""
