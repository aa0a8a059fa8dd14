import sys

from vlmfix.cli.main import main

sys.exit(main())
