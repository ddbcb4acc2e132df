"""metaperturb."""
