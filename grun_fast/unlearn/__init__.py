"""GRUN training: losses, the Trainer subclass, the unlearn() API and the CLI command."""
