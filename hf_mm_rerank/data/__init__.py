"""The data path: cells (:mod:`.inputs`), the row schema (:mod:`.schema`), featurizers (:mod:`.featurizers`,
:mod:`.multi_vector_featurizer`), collators, streams, the image pipeline and dataset validation.

Imports nothing else of hf_mm_rerank.
"""
