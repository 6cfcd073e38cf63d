import sys

from harness.runners.cli import main

sys.exit(main())
