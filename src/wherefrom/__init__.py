"""wherefrom: which training examples made a language model say this?

The modules moved into layer packages (``wherefrom.core``, ``models``, ``curvature``, ``engine``,
``methods``, ``studies``, ``cli``). Scripts written against the flat layout (``from wherefrom.api import
Attributor``, ``from wherefrom.tiny import save_tiny``) keep working: each old name is the new module
itself (same object, so ``isinstance`` and monkeypatching agree) and importing it warns once with a
:class:`DeprecationWarning` naming the new home. ``wherefrom.models`` and ``wherefrom.methods`` are
packages now, so their old flat contents are at ``wherefrom.models.loading`` and
``wherefrom.methods.registry``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    **{name: f"core.{name}" for name in ("data", "encoding", "task", "tracking", "gradients", "store", "scoring")},
    **{name: f"engine.{name}" for name in ("api", "run")},
    **{name: f"models.{name}" for name in ("tiny", "finetune")},
    **{name: f"methods.{name}" for name in ("projection", "tracin", "representation", "lexical")},
    **{
        name: f"studies.{name}"
        for name in (
            "bench",
            "benchtasks",
            "generated",
            "diagnose",
            "metrics",
            "demo",
            "peers",
            "groundtruth",
            "analyses",
        )
    },
}
"""Old flat module name -> its module in the layer packages (the move of the architecture issue)."""


class MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves ``wherefrom.<old>[.sub]`` to ``wherefrom.<new>[.sub]`` (see :data:`MOVED`)."""

    @staticmethod
    def new_name(fullname: str) -> str | None:
        head, _, rest = fullname.removeprefix("wherefrom.").partition(".")
        if not fullname.startswith("wherefrom.") or head not in MOVED:
            return None
        return f"wherefrom.{MOVED[head]}" + (f".{rest}" if rest else "")

    def find_spec(self, fullname, path=None, target=None):
        return importlib.util.spec_from_loader(fullname, self) if self.new_name(fullname) else None

    def create_module(self, spec):
        new = self.new_name(spec.name)
        warnings.warn(f"{spec.name} moved to {new}; import it from there", DeprecationWarning, stacklevel=2)
        return importlib.import_module(new)

    def exec_module(self, module):
        """Nothing to run: the module was imported under its new name."""


if not any(isinstance(finder, MovedModules) for finder in sys.meta_path):
    sys.meta_path.append(MovedModules())
