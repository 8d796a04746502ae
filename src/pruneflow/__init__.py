"""pruneflow: reproducible structural pruning and recovery of LLMs."""

from pruneflow.errors import PruneflowError

__all__ = ["PruneflowError", "load_pruned", "save_pruned"]
__version__ = "0.1.0"


def load_pruned(path, **kwargs):
    """Load a pruneflow checkpoint (vanilla or per-layer widths); see `pruneflow.checkpoint`."""
    from pruneflow.checkpoint import load_pruned as _load_pruned

    return _load_pruned(path, **kwargs)


def save_pruned(model, path, **kwargs):
    """Save a (possibly pruned) model so `load_pruned` restores identical logits."""
    from pruneflow.checkpoint import save_pruned as _save_pruned

    return _save_pruned(model, path, **kwargs)
