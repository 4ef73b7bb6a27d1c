"""Training support for learned solvers: the ground-truth cache."""

from .gt_cache import GTCache, generate_gt, load_gt

__all__ = ["GTCache", "generate_gt", "load_gt"]
