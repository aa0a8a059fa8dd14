"""The `vlmfix` command line: `main` (the parser and subcommands), `flags` (what every subcommand shares),
`eval`, `calibrate` and `demo` (their subcommands). Only the standard library loads until a command runs."""
