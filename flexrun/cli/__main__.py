import sys

from flexrun.cli.main import main

sys.exit(main())
