"""Retrieval: the core (:mod:`.core`: encode, score, stable top-k, groups), the evaluators and ranking metrics
(:mod:`.evaluation`, the ``evaluate`` module in ``metrics/``), hard-negative mining and retrieve-then-rerank.
"""
