"""``python -m dgq_utils.protocol`` (see :mod:`dgq_utils.protocol.cli`)."""
from dgq_utils.protocol.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
