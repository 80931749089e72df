"""What runs: manifests, recipes, the Ray Data plan, sinks and the CLI."""
