"""HTML reports and plots, from the analysis' tables."""
