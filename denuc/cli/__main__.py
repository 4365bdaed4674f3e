import sys

from denuc.cli import main

sys.exit(main())
