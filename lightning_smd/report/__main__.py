"""``python -m lightning_smd.report RUN``: figures and summary tables of a logged run."""

import sys

from lightning_smd.report.figures import main

if __name__ == "__main__":
    sys.exit(main())
