"""``python -m audiopetl ...`` (and ``torchrun -m audiopetl train ...``): the ``audiopetl`` command."""

from .cli.main import main

raise SystemExit(main())
