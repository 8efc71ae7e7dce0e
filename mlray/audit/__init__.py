"""``mlray audit``: find the label errors of a manifest (``mlray.audit.job``).

Floors: folds and suspicion (numpy), work (the Ray tasks), job (the command),
report (the HTML page). ``mlray.audit(...)`` is the job's function: importing
this package puts the package itself at ``mlray.audit``, so the package is made
callable as that function, whichever of the two a caller meets first.
"""

from __future__ import annotations

import sys
import types


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from mlray.audit.job import audit

        return audit(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
