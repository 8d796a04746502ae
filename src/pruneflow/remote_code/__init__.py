"""Configuration and modeling code copied into every checkpoint whose layers have different widths.

The two modules import only torch and transformers (never pruneflow), so a folder holding them
loads anywhere with `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`: Hugging
Face's mechanism for a model class it does not ship (`auto_map` in config.json). pruneflow itself
registers the same classes with the Auto classes and resizes layers with the same function, so the
code a user runs is the code the pipeline was tested with.
"""

from pathlib import Path

CODE_FILES = ("configuration_pruneflow.py", "modeling_pruneflow.py")
CODE_DIR = Path(__file__).parent
