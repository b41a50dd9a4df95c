"""The data audit behind `classifier check-data`: findings across splits, likely label issues and their figures."""
