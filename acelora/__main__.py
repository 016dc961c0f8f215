import sys

from acelora.cli import main

sys.exit(main())
