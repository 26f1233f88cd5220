"""``python -m endor_gds ...`` is ``endor-gds ...`` (for ``torchrun -m endor_gds``)."""

import sys

from endor_gds.cli import main

if __name__ == "__main__":
    sys.exit(main())
