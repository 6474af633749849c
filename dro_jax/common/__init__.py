"""What every stage shares: the user-error type, atomic output files, run directories and result tables."""
