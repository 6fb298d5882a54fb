"""`python -m kubellm_operator [--namespace NS | --all-namespaces] ...` (same as `kubellm operator`)."""

import sys

from kubellm_operator.main import main

sys.exit(main(sys.argv[1:]))
