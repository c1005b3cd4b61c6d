"""Subcommands of the fastdistil CLI, one module each."""
