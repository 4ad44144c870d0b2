"""The mixture lab: ablation grids over blends, phases and schedules, their report, and a fitted mixture."""
