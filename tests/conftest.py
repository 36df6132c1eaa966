import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/reference.py and shared test helpers
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1") or 1))
