"""psq's server side: the broker that routes frames and the aggregator that owns the statistics.

Never imports torch.
"""
