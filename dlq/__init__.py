"""Dead letters: the durable store of invocations that failed for good, for operators."""
