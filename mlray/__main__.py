import sys

from mlray.cli import main

sys.exit(main())
