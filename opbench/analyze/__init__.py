"""What a run adds up to: loading runs, composition, estimates, comparison, roofline, report."""
