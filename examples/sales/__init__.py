"""Sales per (store, UTC day): quantiles of the amounts, and their count, sum, mean and std."""
