"""``python -m sheafdist``: the command line."""

from .cli import main

raise SystemExit(main())
