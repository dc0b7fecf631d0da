"""Evaluation programs: question sets, answer generation, pairwise judging, leaderboards."""
