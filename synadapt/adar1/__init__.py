"""AdaR1 (arXiv 2504.21659): a short-CoT model by SFT, a long/short weight merge, and bi-level preference DPO.

- :mod:`synadapt.adar1.merge` — streaming θ = α·θ_long + (1−α)·θ_short over safetensors shards.
- :mod:`synadapt.adar1.preferences` — group- and instance-level preference pairs, train/eval dedupe.
- :mod:`synadapt.adar1.train` — stage configs and the TRL SFT / DPO trainer builders.

The Ray wiring lives in ``jobs/train_sft.py``, ``jobs/merge.py``, ``jobs/build_preferences.py``, ``jobs/train_dpo.py``.
"""
from __future__ import annotations
