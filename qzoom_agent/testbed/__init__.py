"""The testbed: a small Qwen2.5-VL trained from scratch on SynthHR-mini, shipped with the package."""
from .model import (QZOOM_DIR, WEIGHTS_DIR, TestbedArch, build_testbed, load_testbed, load_testbed_hf,  # noqa: F401
                    load_testbed_qzoom, save_testbed, testbed_config, testbed_qzoom_config)
from .tokenizer import build_testbed_tokenizer, chat_template  # noqa: F401
