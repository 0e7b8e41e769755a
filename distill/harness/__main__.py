"""``python -m distill.harness``: see :mod:`distill.harness.cli`."""

from distill.harness.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
