"""The `npcd` subcommands, one module each (registered in npcd.cli.COMMANDS)."""
