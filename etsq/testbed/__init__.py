"""The testbed: a synthetic arithmetic task with a tiny policy and PRM trained on a CPU.

On it search measurably helps (a single sample is right well under half the time, 64 samples
almost always contain a right one, and the PRM tells right steps from wrong ones), so methods can be
compared on a laptop.  `arith` generates and verifies problems, `tokenizer` builds the shared
tokenizer, `train` trains both models, `build` caches and ships them, `evaluate` measures them.
"""
