"""One module per pipeline stage; each is runnable as `python -m pruneflow.stages.<name>`."""

STAGES = (
    "prepare_model",
    "calibrate",
    "cache_activations",
    "score",
    "prune",
    "export_gguf",
    "recover",
    "evaluate",
    "report",
)
