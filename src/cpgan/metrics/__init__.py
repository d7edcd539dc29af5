"""Evaluation metrics: FID, Inception Score, R-precision (two protocols) and semantic object accuracy.

All functions work on features / probabilities / codes / detections; networks that produce them live
elsewhere (``cpgan.interop.inception`` for Inception-v3, the shapes evaluator, the DAMSM encoders).
"""

from cpgan.metrics.fid import FeatureStats, fid_from_features, fid_from_stats, frechet_distance
from cpgan.metrics.inception_score import InceptionScoreAccumulator, inception_score, softmax_float64
from cpgan.metrics.r_precision import (
    cosine_scores,
    fold_mean_std,
    r_precision_batch,
    r_precision_dmgan,
    retrieval_hits,
    sample_negatives,
)
from cpgan.metrics.soa import SOAAccumulator, soa_scores

__all__ = [
    "FeatureStats",
    "fid_from_features",
    "fid_from_stats",
    "frechet_distance",
    "InceptionScoreAccumulator",
    "inception_score",
    "softmax_float64",
    "cosine_scores",
    "fold_mean_std",
    "r_precision_batch",
    "r_precision_dmgan",
    "retrieval_hits",
    "sample_negatives",
    "SOAAccumulator",
    "soa_scores",
]
