import sys

from splitlora.cli import main

sys.exit(main())
