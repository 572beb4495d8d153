"""``python -m dgq_utils.report``: run the notebook chain (see :mod:`dgq_utils.report.chain`)."""
from dgq_utils.report.chain import main

if __name__ == "__main__":
    raise SystemExit(main())
