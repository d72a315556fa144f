"""`python -m moeguard.cli ...`"""

import sys

from moeguard.cli import main

sys.exit(main())
