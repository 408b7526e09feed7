"""Evaluation: the paper's metrics per taxonomic rank (FID/KID, LPIPS, BioCLIP score), per-rank accuracy, reports."""
