"""``python -m metapeft``: check the install (see :mod:`metapeft.selfcheck`)."""

from metapeft.selfcheck import main

raise SystemExit(main())
