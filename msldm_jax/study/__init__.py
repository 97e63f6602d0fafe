"""The study: MSLDM against its baselines and samplers against steps, as one resumable run
(`--mode=study`, configs/study.py)."""
