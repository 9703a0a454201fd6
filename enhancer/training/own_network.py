"""Put a trained network into a model file as one route's own network.

A route (checkpoint.ROUTES: "hevc", HEVC streams on the codec-aware path;
"blind", the blind path) gets a network of its own where one fine-tuned on it
alone gains more than the main one (``train --codec libx265``, ``train
--blind-only``). This copies the network and QP estimator of ``--network``
(an exported model file) into ``--into``'s file, with what it borrows from its
anchors (``<route>_references``), and writes the result to ``--write``; the
exit tables stay the file's until recalibrate measures the route again.

    python -m enhancer.training.own_network --into enhancer/weights/vqe-v5.pt \\
        --route blind --network runs/v15/vqe-v6-blind.pt --write runs/v15/cand.pt
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from enhancer.checkpoint import REFERENCES, ROUTES, ModelFile, load_model


def with_own_network(into: ModelFile, route: str, network: ModelFile, references: str) -> ModelFile:
    """``into`` with ``network``'s main network as ``route``'s own, borrowing ``references``
    (saving it refuses a network of another config)."""
    meta = into.meta | {
        f"{route}_references": references,
        f"{route}_network": network.meta.get("version", "?"),
    }
    own = into.own_networks | {route: (network.network, network.estimator)}
    return replace(into, own_networks=own, meta=meta)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--into", type=Path, required=True, help="the model file to add it to")
    ap.add_argument("--route", choices=ROUTES, required=True)
    ap.add_argument("--network", type=Path, required=True, help="exported model file")
    ap.add_argument("--references", choices=REFERENCES, default="decoded")
    ap.add_argument("--write", type=Path, required=True)
    args = ap.parse_args(argv)
    merged = with_own_network(
        load_model(args.into), args.route, load_model(args.network), args.references
    )
    merged.save(args.write)
    print(f"wrote {args.write}: own networks {', '.join(merged.own_networks)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
