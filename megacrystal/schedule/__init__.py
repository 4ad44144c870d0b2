"""Run schedule: phases, token budgets, blend weights and learning rate; pure Python, no torch."""
from megacrystal.schedule.lr import LRSegment, lr_at
from megacrystal.schedule.plan import PhaseBoundary, PhaseRounding, PhaseSpec, RunPlan

__all__ = ["LRSegment", "PhaseBoundary", "PhaseRounding", "PhaseSpec", "RunPlan", "lr_at"]
