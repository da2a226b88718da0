"""Whether a GPU is visible: tests of what happens on a machine without one are skipped on the GPU machine."""

from __future__ import annotations

import pytest
import torch

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour on a machine without a GPU")
