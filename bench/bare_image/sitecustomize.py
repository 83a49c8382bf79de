"""The bare GPU image's gaps on a machine that has more: hides modules from every Python started
with this folder on ``PYTHONPATH``.

    PYTHONPATH=bench/bare_image python -m bench.gpu --dry-run

``CCS_HIDE_MODULES`` (comma list; default ``DEFAULT``) names what to hide: a module and its
submodules then import as if their package were not installed (``ModuleNotFoundError``, and
``importlib.util.find_spec`` gives None); ``cv2.optflow`` (a submodule of OpenCV's native
module, present only with opencv-contrib) is also taken off ``cv2`` once ``cv2`` is imported
from this Python's site-packages (the machine's own OpenCV; a cv2 from another folder on the
path, such as the one ``bench.kit`` installs, keeps it).
Every finder already on ``sys.meta_path`` is wrapped; finders added later are not.
``tests/bench/test_gpu.py`` runs the dry run of ``bench.gpu`` under it: a stage that imports what
the GPU machines lack without a skip fails ``make test``.
"""
import os
import sys
import sysconfig

DEFAULT = "av,nvidia.dali,cv2.optflow,pytorch_metric_learning"
HIDDEN = tuple(filter(None, os.environ.get("CCS_HIDE_MODULES", DEFAULT).split(",")))
CV2_HIDDEN = tuple(h.split(".", 1)[1] for h in HIDDEN if h.startswith("cv2."))
SITE = tuple({os.path.realpath(sysconfig.get_paths()[k]) + os.sep for k in ("purelib", "platlib")})


def hidden(name: str) -> bool:
    return any(name == h or name.startswith(h + ".") for h in HIDDEN)


def _strip_cv2(module) -> None:
    for attr in CV2_HIDDEN:
        if hasattr(module, attr):
            delattr(module, attr)
        for key in [k for k in sys.modules if k == f"cv2.{attr}" or k.startswith(f"cv2.{attr}.")]:
            del sys.modules[key]


class _AfterExec:
    """A loader that strips the hidden cv2 submodules once cv2's package has run."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _strip_cv2(sys.modules.get("cv2", module))

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _Hiding:
    def __init__(self, finder):
        self._finder = finder

    def find_spec(self, name, path=None, target=None):
        if hidden(name) or not hasattr(self._finder, "find_spec"):
            return None
        spec = self._finder.find_spec(name, path, target)
        if (spec is not None and name == "cv2" and CV2_HIDDEN and spec.loader is not None
                and spec.submodule_search_locations is not None
                and os.path.realpath(spec.origin or "").startswith(SITE)):
            spec.loader = _AfterExec(spec.loader)
        return spec

    def __getattr__(self, name):
        return getattr(self._finder, name)


sys.meta_path[:] = [_Hiding(f) for f in sys.meta_path]
for _name in [k for k in sys.modules if hidden(k)]:
    del sys.modules[_name]
