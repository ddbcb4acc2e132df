"""``python -m metaperturb.train``: the same as ``metaperturb train`` (and what torchrun runs)."""

from .cli import main

raise SystemExit(main())
