"""Torch side: side info -> tensors, the early-exit enhancement model, training, inference engine."""
