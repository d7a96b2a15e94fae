"""``python -m lmgen_fast.train``: train the embedded model (see :func:`main`)."""

from lmgen_fast.train.loop import main

raise SystemExit(main())
