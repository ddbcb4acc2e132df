"""``python -m metaperturb``: the same as the ``metaperturb`` command."""

from .cli import main

raise SystemExit(main())
