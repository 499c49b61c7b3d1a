"""driftloop's shared core: settings, data contracts and the CLI."""
