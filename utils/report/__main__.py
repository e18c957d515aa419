"""`python -m utils.report`: see `utils.report.build`."""
import sys

from utils.report.build import main

sys.exit(main())
