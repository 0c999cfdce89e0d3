"""Building blocks of the models: networks, attention, encoders, distributions, EMA."""
