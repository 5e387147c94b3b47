"""Offline, CPU-scale reproduction of the TDPO paper's controlled-sentiment experiment (§5.1, Fig. 3).

Run it with `python -m benchmarks.controlled_sentiment.run --output-dir outputs/controlled_sentiment`; see `run.py`.
"""
