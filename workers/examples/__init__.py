"""Short, runnable examples of embedding psq in one's own training code."""
