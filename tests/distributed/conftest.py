"""pytest setup for the distributed tests: puts this folder on ``sys.path`` (for
``tt_dist_testing``, which the worker processes import too) and preloads the heavy
imports into the forkserver, so every multi-process test after the first starts in
well under a second instead of re-importing torch and TorchRec in each worker."""

import multiprocessing
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

# Only takes effect if the forkserver has not started yet in this pytest process.
multiprocessing.set_forkserver_preload(["tt_dist_testing"])
