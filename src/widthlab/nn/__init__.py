"""Building blocks with no knowledge of any width method."""
