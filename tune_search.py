"""Hyperparameter sweep with Ray Tune: `python tune_search.py [--config NAME|FILE] [--set k=v ...]`.

The same as `t2i tune`. The sweep file (default: the built-in `default`) names a base training
config and a [space] of hyperparameters. Running the same command again resumes an interrupted
sweep. The last line printed is one JSON object: best hyperparameters, metric, config file and
checkpoint.
"""

import sys

from t2i.cli import tune_main

if __name__ == "__main__":
    sys.exit(tune_main())
