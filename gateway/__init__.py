"""mailgate: the daemon (config, lifecycle, protocol front-ends, CLI)."""
