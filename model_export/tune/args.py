"""Command-line forms of the tuner's settings, shared by `recserve tune` and `recserve simulate-tune`."""
from __future__ import annotations

import argparse


def pairs(text: str, what: str) -> dict[str, str]:
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        k, eq, v = part.partition("=")
        if not eq or not k.strip():
            raise argparse.ArgumentTypeError(f"{what}: expected NAME=VALUE[,NAME=VALUE...], got {part!r}")
        out[k.strip()] = v.strip()
    return out


def floats(text: str) -> dict[str, float]:
    try:
        return {k: float(v) for k, v in pairs(text, "weights").items()}
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def box(text: str) -> dict[str, tuple[float, float]]:
    out = {}
    for k, v in pairs(text, "search").items():
        lo, colon, hi = v.partition(":")
        try:
            out[k] = (float(lo), float(hi))
        except ValueError:
            raise argparse.ArgumentTypeError(f"search: {k}={v}: expected LO:HI") from None
        if not colon:
            raise argparse.ArgumentTypeError(f"search: {k}={v}: expected LO:HI")
    return out


def add_evidence_args(p: argparse.ArgumentParser) -> None:
    """How the tuner weighs evidence: shared by `recserve tune` and `recserve simulate-tune`."""
    p.add_argument("--confirm-rounds", type=int, default=2,
                   help="rounds a candidate is re-tested on fresh users before promotion (0: promote at once)")
    p.add_argument("--control", type=floats, default=None,
                   help="the server's own control weights, e.g. click=1,like=0.5: lets the first promotion be "
                        "guarded (rolled back if they beat it)")
    p.add_argument("--cuped", action=argparse.BooleanOptionalAction, default=True,
                   help="adjust each list's reward by its user's rewards in earlier rounds (variance reduction)")


def settings(args: argparse.Namespace):
    """TuneSettings from parsed arguments (engine.cli.tune's names)."""
    from model_export.tune.reward import RewardSpec
    from model_export.tune.tuner import TuneSettings

    return TuneSettings(search=args.search, fixed=args.fixed, init=args.init, init_std=args.init_std,
                        stage=args.stage, arms=args.arms,
                        share=args.share, min_impressions=args.min_impressions, max_wait_s=args.max_wait,
                        confidence=args.confidence, reward=RewardSpec(args.reward, args.discount),
                        method=args.method, min_std=args.min_std, scale=args.scale,
                        surrogate=args.surrogate, seed=args.seed, confirm_rounds=args.confirm_rounds,
                        cuped=args.cuped, control=args.control)
