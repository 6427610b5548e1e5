"""The worker loop and the profiling engine."""

import os

# trainplan never downloads: models are built from configs, with no weights. Some libraries
# reach for the Hugging Face Hub on import all the same (bitsandbytes' CPU backend asks
# `kernels` for a hub kernel on CPUs with AVX512-BF16, which checks its publisher online).
# Offline, they fall back at once; an operator who wants otherwise sets the variable.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
