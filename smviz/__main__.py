"""`python -m smviz` (and `torchrun -m smviz`): the `smviz` command line."""

from smviz.cli import main

raise SystemExit(main())
