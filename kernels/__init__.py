"""Triton kernels of grun_fast, installed as ``grun_fast.kernels``."""
import sys as _sys

if __name__ == "kernels":
    # Imported as top-level ``kernels``: a process started in a checkout has this folder on sys.path, where it
    # shadows Hugging Face's ``kernels`` distribution (a requirement of transformers >= 5.25, which imports it).
    # Hand the name over to that distribution when it is installed.
    import importlib.metadata as _metadata
    import importlib.util as _util

    try:
        _init = _metadata.distribution("kernels").locate_file("kernels/__init__.py")
    except _metadata.PackageNotFoundError:
        _init = None
    if _init is not None and _init.is_file():
        _spec = _util.spec_from_file_location("kernels", _init, submodule_search_locations=[str(_init.parent)])
        _module = _util.module_from_spec(_spec)
        _sys.modules["kernels"] = _module
        _spec.loader.exec_module(_module)
