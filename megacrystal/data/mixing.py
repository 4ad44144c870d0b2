"""Online data mixing: a phase's blend weights adapt to each dataset's training loss while the run goes.

Every `every` steps of the phase, each dataset d gets an excess loss e_d = L_d - ref_d, where L_d is its mean
token loss over the steps since the last update (a moving average across updates when `smoothing` > 0) and
ref_d the reference (the first window's loss, 0, or a loss per dataset; only DoReMi's per-dataset reference
clips the excess at 0). Then one of two rules:
- `eg`, exponentiated gradient as in DoReMi (Xie et al. 2023, "DoReMi: Optimizing Data Mixtures Speeds Up
  Language Model Pretraining", Algorithm 1): w <- normalize(w * exp(eta * e)), then (1 - eps) w + eps / n.
- `exp3`, after ODM (Albalak et al. 2023, "Efficient Online Data Mixing For Language Model Pre-Training"):
  w = (1 - eps) softmax(eta * R) + eps / n, R the smoothed reward (here the excess loss). ODM draws one
  domain per batch and divides its reward by its probability (bandit feedback); here every dataset has rows
  in every window (full information), so the reward is used as it is.
With `exploration: decay`, eps at an update t steps into the phase is ODM's K * eps_t, eps_t = min(1/K,
sqrt(ln K / (K t))) for K datasets (its Exp3 updater), at least `epsilon`; ODM also uses eps_t as its step size,
on a cumulative importance-weighted reward, while here `eta` stays as set on the smoothed excess loss.
The result is rounded to multiples of 1/grid summing to exactly 1. The losses come from rows every rank
holds, summed in float64 in batch order, so the ranks of one run agree bit for bit; runs at other layouts
see losses that differ in the last digits, and the rounding makes their weights (and so every sampling
decision) the same unless a weight falls within that difference of a rounding boundary.
"""
from __future__ import annotations

import math

from megacrystal.schedule.plan import MixingSpec

from .errors import DataError


def quantize(weights: dict[str, float], grid: int) -> dict[str, float]:
    """Weights as multiples of 1/grid summing to 1: floors, then the largest remainders (ties by name) get one more."""
    names = sorted(weights)
    total = math.fsum(weights.values())
    scaled = [weights[n] / total * grid for n in names]
    units = [math.floor(x) for x in scaled]
    by_remainder = sorted(range(len(names)), key=lambda i: (units[i] - scaled[i], i))
    for i in by_remainder[:grid - sum(units)]:
        units[i] += 1
    return {n: u / grid for n, u in zip(names, units)}


def _mix_uniform(weights: dict[str, float], epsilon: float) -> dict[str, float]:
    n = len(weights)
    return {name: (1.0 - epsilon) * w + epsilon / n for name, w in weights.items()}


def _softmax(logits: dict[str, float]) -> dict[str, float]:
    top = max(logits.values())  # shifted, so no exp overflows
    exps = {name: math.exp(x - top) for name, x in logits.items()}
    total = math.fsum(exps.values())
    return {name: x / total for name, x in exps.items()}


def uniform_share(spec: MixingSpec, datasets: int, steps: int) -> float:
    """The share of the uniform blend mixed in at an update `steps` steps into the phase."""
    if spec.exploration == "fixed":
        return spec.epsilon
    return max(spec.epsilon, min(1.0, math.sqrt(datasets * math.log(datasets) / steps)))


def eg_step(weights: dict[str, float], excess: dict[str, float], eta: float, epsilon: float) -> dict[str, float]:
    """DoReMi's update: normalize(w * exp(eta * excess)), mixed with epsilon of the uniform blend (not rounded)."""
    alive = {name: math.log(w) + eta * excess[name] for name, w in weights.items() if w > 0}
    moved = _softmax(alive)
    return _mix_uniform({name: moved.get(name, 0.0) for name in weights}, epsilon)


def exp3_weights(reward: dict[str, float], eta: float, epsilon: float) -> dict[str, float]:
    """ODM's weights: softmax(eta * reward), mixed with epsilon of the uniform blend (not rounded)."""
    return _mix_uniform(_softmax({name: eta * r for name, r in reward.items()}), epsilon)


class OnlineMixer:
    """One phase's mixing state: current weights, the open window's sums, smoothed losses and references."""

    def __init__(self, spec: MixingSpec, weights: dict[str, float]):
        self.spec = spec
        self.names = sorted(weights)
        self.initial = {n: float(weights[n]) for n in self.names}
        self.weights = dict(self.initial)
        self.window = {n: [0.0, 0.0] for n in self.names}  # (loss sum, tokens) since the last update
        self.window_steps = 0
        self.smoothed: dict[str, float | None] = dict.fromkeys(self.names)
        if isinstance(spec.reference, str):
            self.reference = dict.fromkeys(self.names, 0.0 if spec.reference == "none" else None)
        else:
            self.reference = {n: float(spec.reference[n]) for n in self.names}
        self.updates = 0

    def observe(self, sums: dict[str, tuple[float, float]]) -> bool:
        """Add one step's (loss sum, tokens) per dataset; True once the window holds `every` steps."""
        for name, (loss, tokens) in sums.items():
            if name not in self.window:
                raise DataError(f"dataset {name!r} has training rows but is not in the mixed blend {self.names}")
            acc = self.window[name]
            acc[0] += loss
            acc[1] += tokens
        self.window_steps += 1
        return self.window_steps >= self.spec.every

    def excess(self) -> dict[str, float]:
        """Each dataset's smoothed loss minus its reference (0 while either is unknown)."""
        clip = not isinstance(self.spec.reference, str)
        out = {}
        for n in self.names:
            loss, ref = self.smoothed[n], self.reference[n]
            e = 0.0 if loss is None or ref is None else loss - ref
            out[n] = max(e, 0.0) if clip else e
        return out

    def update(self) -> dict[str, float]:
        """Close the window and return the new weights (multiples of 1/grid summing to 1)."""
        s = self.spec
        for n in self.names:
            loss, tokens = self.window[n]
            if tokens > 0:  # a dataset with no rows in the window keeps its smoothed loss
                mean, before = loss / tokens, self.smoothed[n]
                self.smoothed[n] = mean if before is None else s.smoothing * before + (1.0 - s.smoothing) * mean
                if self.reference[n] is None:  # reference "first": the first window this dataset was seen in
                    self.reference[n] = self.smoothed[n]
        excess = self.excess()
        epsilon = uniform_share(s, len(self.names), (self.updates + 1) * s.every)
        raw = eg_step(self.weights, excess, s.eta, epsilon) if s.rule == "eg" else \
            exp3_weights(excess, s.eta, epsilon)
        self.weights = quantize(raw, s.grid)
        self.window = {n: [0.0, 0.0] for n in self.names}
        self.window_steps = 0
        self.updates += 1
        return dict(self.weights)

    def state_dict(self) -> dict:
        """JSON-serializable state (Python floats round-trip through JSON exactly)."""
        return {"spec": self.spec.to_json(), "initial": dict(self.initial), "weights": dict(self.weights),
                "window": {n: list(v) for n, v in self.window.items()}, "window_steps": self.window_steps,
                "smoothed": dict(self.smoothed), "reference": dict(self.reference), "updates": self.updates}

    @classmethod
    def from_state(cls, state: dict) -> OnlineMixer:
        """The mixer a state_dict describes."""
        try:
            mixer = cls(MixingSpec(**state["spec"]), state["initial"])
            mixer.weights = {n: float(w) for n, w in state["weights"].items()}
            mixer.window = {n: [float(v[0]), float(v[1])] for n, v in state["window"].items()}
            mixer.window_steps = int(state["window_steps"])
            mixer.smoothed = dict(state["smoothed"])
            mixer.reference = dict(state["reference"])
            mixer.updates = int(state["updates"])
        except (KeyError, TypeError) as err:
            raise DataError(f"sampler state: the online mixing state is incomplete ({err})") from None
        return mixer
