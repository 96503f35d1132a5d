#!/usr/bin/env python3
"""Publish a training run's weights as a Hugging Face Hub model repository; ``python hub/publish.py --help``
lists the options, :mod:`timm_svb.hub.publish` has the work.

    python hub/publish.py RUN_DIR --repo-id timm-svb/MODEL.TAG --dry-run OUT_DIR  # build and check only
    python hub/publish.py RUN_DIR --repo-id timm-svb/MODEL.TAG --require-eval     # ... push, record
"""

import sys

from timm_svb.hub.publish import main

if __name__ == "__main__":
    sys.exit(main())
