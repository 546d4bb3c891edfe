import sys

from psq.cli import main

sys.exit(main())
