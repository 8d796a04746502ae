"""pruneflow: reproducible structural pruning and recovery of LLMs."""

from pruneflow.errors import PruneflowError

__all__ = ["PruneflowError", "load_pruned", "prune", "save_pruned"]
__version__ = "0.1.0"


def load_pruned(path, **kwargs):
    """Load a pruneflow checkpoint (vanilla or per-layer widths); see `pruneflow.checkpoint`."""
    from pruneflow.checkpoint import load_pruned as _load_pruned

    return _load_pruned(path, **kwargs)


def save_pruned(model, path, **kwargs):
    """Save a (possibly pruned) model so `load_pruned` restores identical logits."""
    from pruneflow.checkpoint import save_pruned as _save_pruned

    return _save_pruned(model, path, **kwargs)


def prune(model, tokenizer, calibration_texts, *, criterion="obs", ratio=0.2, params=None, servable=False,
          device=None):
    """Prune `model` in place: `ratio` of all parameters removed by `criterion`, what stays re-fitted on
    windows of `calibration_texts`; returns a `PruneResult` (measured ratio, summary, scores). `params`:
    a params.yaml path, a mapping of its sections, or None (the defaults). See `pruneflow.oneshot.prune`;
    torch loads on first use, not on `import pruneflow`."""
    import importlib  # by name: the stages' source dependencies (pipeline.code_deps) need not include it

    return importlib.import_module("pruneflow.oneshot").prune(
        model, tokenizer, calibration_texts, criterion=criterion, ratio=ratio, params=params, servable=servable,
        device=device)
