"""``sched``: the template's name for :mod:`seqlr` (the same objects), kept for checkouts.

Inside a checkout this package shadows the standard library's ``sched`` module (``make
install`` puts the project root first on every interpreter's path; nothing the project
imports uses the standard library's one: ``tests/test_import_sched.py`` checks it). An
installed copy (``pip install .``) sits behind the standard library's ``sched``: import
``seqlr`` there. Hydra configs of this template name ``sched.SequentialLR``.
"""

from seqlr import *  # noqa: F401,F403  (the public API, re-exported)
from seqlr import __all__  # noqa: F401
