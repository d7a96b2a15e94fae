"""Triton kernels, installed as ``lmgen_fast.kernels`` (never as a bare ``kernels`` package).

Where the repository root is on ``sys.path`` (``python -m ...`` or pytest started from a
checkout), ``import kernels`` finds this folder first. The package index has a ``kernels``
package too, which transformers (5.25 and later) depends on and imports as soon as it is
installed: it would get these sources instead and fail. So, imported under that bare name,
this module hands the name over to the installed package, or fails as a missing one would.
"""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != _checkout]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is None:
        raise ModuleNotFoundError("No module named 'kernels' (this checkout's kernels/ "
                                  "folder is lmgen_fast.kernels)", name="kernels")
    _module = importlib.util.module_from_spec(_spec)
    # The import system returns what sys.modules holds once this module has run.
    sys.modules["kernels"] = _module
    _spec.loader.exec_module(_module)
