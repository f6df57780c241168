"""Differential fuzzing of the frame walker and the header-block scanner (hyperframe, hpack)."""
