"""Load a Python file (an example of examples/, a generated model file) as a fresh module: each call makes a new
module object, so a test can patch it without touching another test's copy."""
import importlib.util
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_file(path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_example(filename: str, name: str = ""):
    """``examples/<filename>`` as a module named ``name`` (default ``<stem>_example``)."""
    return load_file(EXAMPLES / filename, name or Path(filename).stem + "_example")
