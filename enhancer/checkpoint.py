"""Saving and loading the shipped model file: weights, config, estimator and exit policy."""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch

from enhancer.network import ModelConfig, QPEstimator, VQENet
from enhancer.policy import ExitPolicy

FORMAT = "vqe-model/2"
WEIGHTS_DIR = Path(__file__).parent / "weights"
DEFAULT_WEIGHTS = WEIGHTS_DIR / "vqe-v3.pt"


@dataclass
class ModelFile:
    """What a model file holds: the network, the QP-map estimator, the exit policy, meta."""

    network: VQENet
    estimator: QPEstimator
    policy: ExitPolicy | None = None
    meta: dict = field(default_factory=dict)


def save_model(
    path: Path, model: VQENet, estimator: QPEstimator, policy: ExitPolicy | None, meta: dict
) -> None:
    """Write a self-describing model file (fp16 weights keep it small)."""
    half = lambda sd: {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}  # noqa: E731
    blob = {
        "format": FORMAT,
        "config": model.cfg.to_dict(),
        "model": half(model.state_dict()),
        "estimator": half(estimator.state_dict()),
        "policy": policy.to_dict() if policy else None,
        "meta": meta,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(blob, tmp)
    tmp.replace(path)


def _read(path: str | Path | None, map_location: str = "cpu") -> dict:
    path = Path(path) if path else DEFAULT_WEIGHTS
    if not path.exists():
        raise FileNotFoundError(f"model weights not found: {path}")
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:  # not a torch file at all
        raise ValueError(f"{path} is not a vqe model file ({type(exc).__name__})") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ValueError(f"{path} is not a vqe model file (format {FORMAT})")
    return blob


def model_config(path: str | Path | None = None) -> ModelConfig:
    """The network's configuration in a model file, without building the network."""
    return ModelConfig.from_dict(_read(path)["config"])


def load_model(path: str | Path | None = None, map_location: str = "cpu") -> ModelFile:
    """The model file at ``path`` (default: the shipped weights), float32 on ``map_location``."""
    blob = _read(path, map_location)
    model = VQENet(ModelConfig.from_dict(blob["config"]))
    model.load_state_dict({k: v.float() for k, v in blob["model"].items()})
    est = QPEstimator()
    est.load_state_dict({k: v.float() for k, v in blob["estimator"].items()})
    policy = ExitPolicy.from_dict(blob["policy"]) if blob.get("policy") else None
    return ModelFile(model.eval(), est.eval(), policy, blob.get("meta", {}))
