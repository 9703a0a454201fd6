"""Saving and loading the shipped model file: weights, config, estimators and exit policy.

A model file is a dict (torch.save, read with ``weights_only``) whose ``format``
is ``vqe-model/<version>``. Version 3 holds ``config``, ``model`` and
``estimator`` (the network's config and the fp16 state dicts of it and its
QP-map estimator), ``policy`` (ExitPolicy.to_dict, or None), ``pixel_qp``
(the pixel CRF estimate's config and fp16 state dict, or None) and ``meta``;
optionally ``<route>_model`` and ``<route>_estimator``: a network of the same
config for one route through the engine (ROUTES: "hevc", HEVC streams on the
codec-aware path, in vqe-v5.pt; "blind", the blind path), where a network of
its own gains more than the main one (a vqe that does not know them uses the
one network for every stream).
Version 2 (vqe-v3.pt) kept the pixel CRF estimate base64 inside the policy's
flat layout: ``load_model`` reads both, ``save_model`` writes version 3, and a
file of a newer version is refused.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch

from enhancer.network import ModelConfig, QPEstimator, VQENet
from enhancer.pixel_qp import PixelQP
from enhancer.policy import ExitPolicy

FORMAT_NAME = "vqe-model"
FORMAT_VERSION = 3
FORMAT = f"{FORMAT_NAME}/{FORMAT_VERSION}"
OLDEST_VERSION = 2  # vqe-v3.pt
WEIGHTS_DIR = Path(__file__).parent / "weights"
DEFAULT_WEIGHTS = WEIGHTS_DIR / "vqe-v5.pt"
REFERENCES = ("decoded", "enhanced")  # what a network borrows from its anchors (meta)
# Routes through the engine that may have a network of their own: HEVC streams on the
# codec-aware path (the codec's name as the reader gives it), and the blind path.
ROUTES = ("hevc", "blind")


Networks = tuple[VQENet, QPEstimator]


@dataclass
class ModelFile:
    """What a model file holds: the network, the QP-map estimator, the exit policy, meta,
    the pixel CRF estimate of the blind path (empty where the file has none) and the
    networks of the routes that have their own (``own_networks``)."""

    network: VQENet
    estimator: QPEstimator
    policy: ExitPolicy | None = None
    meta: dict = field(default_factory=dict)
    pixel_qp: PixelQP = field(default_factory=PixelQP)
    # route (of ROUTES) -> the network and estimator its frames get
    own_networks: dict[str, Networks] = field(default_factory=dict)

    def references(self, route: str = "") -> str:
        """What the main network (or ``route``'s own) borrows from its anchors: meta
        ``references`` (``<route>_references``), "decoded" where the file says nothing."""
        key = f"{route}_references" if route else "references"
        refs = self.meta.get(key, "decoded")
        if refs not in REFERENCES:
            raise ValueError(f"model file: {key} must be one of {REFERENCES}, not {refs!r}")
        return refs

    def save(self, path: str | Path) -> None:
        """Write it back (as ``save_model``, in the current format)."""
        save_model(
            path,
            self.network,
            self.estimator,
            self.policy,
            self.meta,
            self.pixel_qp,
            self.own_networks,
        )


def save_model(
    path: str | Path,
    model: VQENet,
    estimator: QPEstimator,
    policy: ExitPolicy | None,
    meta: dict,
    pixel_qp: PixelQP | None = None,
    own_networks: dict[str, Networks] | None = None,
) -> None:
    """Write a self-describing model file (fp16 weights keep it small); ``own_networks``:
    route (of ROUTES) -> the network and estimator its frames get (of ``model``'s config)."""
    half = lambda sd: {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}  # noqa: E731
    blob = {
        "format": FORMAT,
        "config": model.cfg.to_dict(),
        "model": half(model.state_dict()),
        "estimator": half(estimator.state_dict()),
        "policy": policy.to_dict() if policy else None,
        "pixel_qp": pixel_qp.to_state() if pixel_qp else None,
        "meta": meta,
    }
    for route, (network, est) in (own_networks or {}).items():
        if route not in ROUTES:
            raise ValueError(f"unknown route {route!r} for a network (one of {ROUTES})")
        if network.cfg != model.cfg:
            raise ValueError(f"the {route} network must have the main network's config")
        blob[f"{route}_model"], blob[f"{route}_estimator"] = (
            half(network.state_dict()),
            half(est.state_dict()),
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(blob, tmp)
    tmp.replace(path)


def _version(fmt) -> int | None:
    """The version of a ``vqe-model/<version>`` format string (None for anything else)."""
    name, _, version = str(fmt).partition("/")
    return int(version) if name == FORMAT_NAME and version.isdigit() else None


def _read(path: str | Path | None, map_location: str = "cpu") -> dict:
    path = Path(path) if path else DEFAULT_WEIGHTS
    if not path.exists():
        raise FileNotFoundError(f"model weights not found: {path}")
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:  # not a torch file at all
        raise ValueError(f"{path} is not a vqe model file ({type(exc).__name__})") from None
    version = _version(blob.get("format")) if isinstance(blob, dict) else None
    if version is None or version < OLDEST_VERSION:
        raise ValueError(
            f"{path} is not a vqe model file (format {FORMAT_NAME}/{OLDEST_VERSION} to {FORMAT})"
        )
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path} is a model file of format {blob['format']}, newer than this vqe reads"
            f" ({FORMAT} at most): upgrade vqe to load it"
        )
    return blob


def model_config(path: str | Path | None = None) -> ModelConfig:
    """The network's configuration in a model file, without building the network."""
    return ModelConfig.from_dict(_read(path)["config"])


def load_model(path: str | Path | None = None, map_location: str = "cpu") -> ModelFile:
    """The model file at ``path`` (default: the shipped weights), float32 on ``map_location``."""
    blob = _read(path, map_location)
    cfg = ModelConfig.from_dict(blob["config"])
    model, est = _networks(cfg, blob, "")
    policy = dict(blob.get("policy") or {})
    if "pixel_qp" in blob:  # format 3
        pixel_qp = PixelQP.from_state(blob["pixel_qp"])
    else:  # format 2: base64 in the policy
        pixel_qp = PixelQP.from_dict(policy.pop("blind_qp", None))
    policy = ExitPolicy.from_dict(policy) if policy else None
    routes = [r for r in ROUTES if f"{r}_model" in blob]
    return ModelFile(
        model,
        est,
        policy,
        blob.get("meta", {}),
        pixel_qp,
        {route: _networks(cfg, blob, f"{route}_") for route in routes},
    )


def _networks(cfg: ModelConfig, blob: dict, prefix: str) -> Networks:
    """The network and estimator stored under ``<prefix>model``/``<prefix>estimator``,
    float32, in eval mode."""
    model, est = VQENet(cfg), QPEstimator()
    model.load_state_dict({k: v.float() for k, v in blob[f"{prefix}model"].items()})
    est.load_state_dict({k: v.float() for k, v in blob[f"{prefix}estimator"].items()})
    return model.eval(), est.eval()
